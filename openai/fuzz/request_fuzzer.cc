// libFuzzer target: any bytes as a /v1/completions body. The parser must answer every input with
// a request or an error, never crash or walk the input recursively: its error's OpenAI object is
// built and serialized, and a parsed request is validated against the test tokenizer as the
// server would (tokenizing its prompt, checking its stops). Run with the JSON dictionary, which
// builds deep nesting, huge numbers and bad UTF-8:
//   build-fuzz/openai/openai_request_fuzzer -dict=openai/fuzz/json.dict openai/fuzz/corpus/completions
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "openai/protocol.h"
#include "tokenizer/fuzz/fuzz_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace {

const kraken::tokenizer::Tokenizer& Tok() {
  return kraken::tokenizer::FuzzTokenizer();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  auto parsed = kraken::openai::ParseCompletionRequest(body, /*context_length=*/1024);
  if (!parsed.ok()) {
    if (parsed.status().code() != absl::StatusCode::kInvalidArgument) std::abort();  // a bad body is a 400
    const int status = kraken::openai::HttpStatus(parsed.status());
    (void)kraken::openai::Dump(kraken::openai::ErrorObject(parsed.status(), status));
    return 0;
  }
  kraken::core::RequestLimits limits{.context_length = 1024, .vocab_size = Tok().vocab_size(), .eos_token_id = 0};
  auto params = kraken::core::ValidateGeneration(parsed->generation, limits, Tok(), kraken::openai::kCompletionFields);
  if (!params.ok()) (void)kraken::openai::Dump(kraken::openai::ErrorObject(params.status(), 400));
  return 0;
}
