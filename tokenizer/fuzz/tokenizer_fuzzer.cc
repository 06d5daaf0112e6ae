// libFuzzer target: any byte string through Encode (invalid UTF-8 must give an error, never a
// crash), the ids back through Decode and the streaming detokenizer (which must agree), and the
// bytes reinterpreted as token ids through both decoders.
//   run: build-fuzz/tokenizer/tokenizer_fuzzer tokenizer/fuzz/corpus/encode
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tokenizer/detokenizer.h"
#include "tokenizer/fuzz/fuzz_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace {

const kraken::tokenizer::Tokenizer& Tok() {
  return kraken::tokenizer::FuzzTokenizer();
}

void CheckStreaming(const std::vector<int32_t>& ids, bool skip) {
  const auto& t = Tok();
  auto whole = t.Decode(ids, skip);
  if (!whole.ok()) return;
  kraken::tokenizer::IncrementalDetokenizer d(t, skip);
  std::string streamed;
  for (int32_t id : ids) {
    if (!d.Add(id, &streamed).ok()) std::abort();
  }
  d.Finish(&streamed);
  if (streamed != *whole) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& t = Tok();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto ids = t.Encode(text);
  if (ids.ok()) {
    auto back = t.Decode(*ids, /*skip_special=*/false);
    if (!back.ok() || *back != text) std::abort();  // valid UTF-8 round-trips exactly
    CheckStreaming(*ids, false);
  }
  std::vector<int32_t> raw(size / 2);
  for (size_t i = 0; i < raw.size(); ++i) {
    uint16_t v;
    std::memcpy(&v, data + 2 * i, 2);
    raw[i] = v % (t.vocab_size() + 2) - 1;  // includes -1 and vocab_size: invalid ids
  }
  CheckStreaming(raw, true);
  CheckStreaming(raw, false);
  return 0;
}
