// libFuzzer target: kraken.v1 GenerateRequest bytes, as a stranger sends them to the gRPC port:
// parsed as the service parses them, translated (FromProto) and validated against the test
// tokenizer. Every input ends in a request or an error, never a crash.
//   build-fuzz/server/generate_request_fuzzer server/fuzz/corpus/generate
#include <cstdint>
#include <cstdlib>

#include "server/request_proto.h"
#include "tokenizer/fuzz/fuzz_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace {

const kraken::tokenizer::Tokenizer& Tok() {
  return kraken::tokenizer::FuzzTokenizer();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kraken::v1::GenerateRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;  // the server refuses it unread
  kraken::core::RequestLimits limits{.context_length = 1024, .vocab_size = Tok().vocab_size(), .eos_token_id = 0};
  auto params = kraken::core::ValidateGeneration(kraken::server::FromProto(req), limits, Tok());
  if (!params.ok() && params.status().code() != absl::StatusCode::kInvalidArgument) std::abort();
  return 0;
}
