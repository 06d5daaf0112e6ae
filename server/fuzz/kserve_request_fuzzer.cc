// libFuzzer target: KServe v2 ModelInferRequest bytes, as a stranger sends them to the gRPC port.
// The first byte picks what the rest is: 0, a serialized ModelInferRequest (any tensors, raw or
// typed contents, any shapes); otherwise the `sampling_parameters` JSON of a request that is
// well formed but for it. Every input ends in a request or an error (never a crash), and a read
// request is validated against the test tokenizer as the server would.
//   build-fuzz/server/kserve_request_fuzzer -dict=openai/fuzz/json.dict server/fuzz/corpus/kserve
#include <cstdint>
#include <cstdlib>
#include <string>

#include "server/kserve_request.h"
#include "tokenizer/fuzz/fuzz_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace {

const kraken::tokenizer::Tokenizer& Tok() {
  return kraken::tokenizer::FuzzTokenizer();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  inference::ModelInferRequest req;
  if (data[0] == 0) {
    if (!req.ParseFromArray(data + 1, static_cast<int>(size - 1))) return 0;  // the server refuses it unread
  } else {
    req.set_model_name("m");
    auto* text = req.add_inputs();
    text->set_name("text_input");
    text->set_datatype("BYTES");
    text->add_shape(1);
    text->mutable_contents()->add_bytes_contents("And God said");
    auto* sampling = req.add_inputs();
    sampling->set_name("sampling_parameters");
    sampling->set_datatype("BYTES");
    sampling->add_shape(1);
    sampling->mutable_contents()->add_bytes_contents(std::string(reinterpret_cast<const char*>(data + 1), size - 1));
  }
  auto parsed = kraken::server::ParseKserveRequest(req);
  if (!parsed.ok()) return 0;
  kraken::core::RequestLimits limits{.context_length = 1024, .vocab_size = Tok().vocab_size(), .eos_token_id = 0};
  (void)kraken::core::ValidateGeneration(parsed->generation, limits, Tok(), kraken::server::kKserveFields);
  return 0;
}
