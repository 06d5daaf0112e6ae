// The bundled kraken-kjv-4way model's tokenizer, loaded once, for the core's unit tests
// (KRAKEN_SOURCE_DIR names the source tree; the working directory otherwise).
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "tokenizer/tokenizer.h"

namespace kraken::core {

inline const tokenizer::Tokenizer& KjvTokenizer() {
  static const auto tok = [] {
    const char* root = std::getenv("KRAKEN_SOURCE_DIR");
    auto t = tokenizer::Tokenizer::FromModelDir(std::string(root ? root : ".") + "/models/kraken-kjv-4way");
    EXPECT_TRUE(t.ok()) << t.status();
    return std::move(*t);
  }();
  return *tok;
}

}  // namespace kraken::core
