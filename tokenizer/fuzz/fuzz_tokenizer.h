// The tokenizer every libFuzzer target reads with: KRAKEN_FUZZ_TOKENIZER names its tokenizer.json
// (default: the committed test tokenizer, relative to the checkout). Loaded once; a file that
// cannot be loaded aborts the fuzzer at its first input.
#pragma once

#include <cstdlib>

#include "tokenizer/tokenizer.h"

namespace kraken::tokenizer {

inline const Tokenizer& FuzzTokenizer() {
  static const Tokenizer* t = [] {
    const char* path = std::getenv("KRAKEN_FUZZ_TOKENIZER");
    auto r = Tokenizer::FromFile(path != nullptr ? path : "tests/data/tokenizers/mixed-4k/tokenizer.json");
    if (!r.ok()) std::abort();
    return r->release();
  }();
  return *t;
}

}  // namespace kraken::tokenizer
