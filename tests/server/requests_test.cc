// The gRPC APIs' request readers as pure functions: kraken.v1's FromProto copies exactly what the
// client set, and the KServe reader turns both of Triton's LLM interfaces into the core's terms and
// refuses each leniency by name.
#include <gtest/gtest.h>

#include <string>

#include "server/kserve_request.h"
#include "server/request_proto.h"

namespace kraken::server {
namespace {

TEST(FromProto, CopiesWhatTheClientSetAndLeavesTheRestUnset) {
  kraken::v1::GenerateRequest req;
  req.set_request_id("r1");
  req.set_text("In the beginning");
  req.set_max_tokens(7);
  req.set_temperature(0.5f);
  req.set_top_k(40);
  req.set_seed(11);
  req.add_stop("LORD");
  req.add_stop_token_ids(3);
  req.set_top_logprobs(2);
  req.set_n(2);
  req.set_prompt_logprobs(true);
  const core::GenerationRequest g = FromProto(req);
  EXPECT_EQ(g.request_id, "r1");
  EXPECT_EQ(g.text, "In the beginning");
  EXPECT_FALSE(g.token_ids.has_value());
  EXPECT_EQ(g.max_tokens, 7);
  EXPECT_EQ(g.temperature, 0.5);
  EXPECT_EQ(g.top_k, 40);
  EXPECT_EQ(g.seed, 11u);
  EXPECT_EQ(g.stop, std::vector<std::string>{"LORD"});
  EXPECT_EQ(g.stop_token_ids, std::vector<int64_t>{3});
  EXPECT_EQ(g.top_logprobs, 2);
  EXPECT_EQ(g.n, 2);
  EXPECT_TRUE(g.prompt_logprobs);
  EXPECT_FALSE(g.top_p.has_value());
  EXPECT_FALSE(g.min_p.has_value());
  EXPECT_FALSE(g.skip_special_tokens.has_value());
  kraken::v1::GenerateRequest ids;
  ids.mutable_token_ids()->add_ids(5);
  ids.mutable_token_ids()->add_ids(6);
  EXPECT_EQ(FromProto(ids).token_ids, (std::vector<int64_t>{5, 6}));
  EXPECT_FALSE(FromProto(ids).text.has_value());
}

inference::ModelInferRequest::InferInputTensor* Input(inference::ModelInferRequest* r, const std::string& name,
                                                      const std::string& datatype) {
  auto* in = r->add_inputs();
  in->set_name(name);
  in->set_datatype(datatype);
  in->add_shape(1);
  return in;
}

std::string Refusal(const inference::ModelInferRequest& r) {
  auto k = ParseKserveRequest(r);
  EXPECT_FALSE(k.ok());
  EXPECT_EQ(k.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(k.status().message());
}

TEST(ParseKserveRequest, TheTensorRtLlmInterface) {
  inference::ModelInferRequest r;
  Input(&r, "text_input", "BYTES")->mutable_contents()->add_bytes_contents("And God said,");
  Input(&r, "max_tokens", "INT32")->mutable_contents()->add_int_contents(20);
  Input(&r, "temperature", "FP32")->mutable_contents()->add_fp32_contents(0.8f);
  Input(&r, "random_seed", "UINT64")->mutable_contents()->add_uint64_contents(7);
  Input(&r, "stream", "BOOL")->mutable_contents()->add_bool_contents(true);
  Input(&r, "return_log_probs", "BOOL")->mutable_contents()->add_bool_contents(true);
  auto k = ParseKserveRequest(r);
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->interface, KserveInterface::kTensorRtLlm);
  EXPECT_EQ(k->generation.text, "And God said,");
  EXPECT_EQ(k->generation.max_tokens, 20);
  EXPECT_FLOAT_EQ(static_cast<float>(*k->generation.temperature), 0.8f);
  EXPECT_EQ(k->generation.seed, 7u);
  EXPECT_TRUE(k->stream);
  EXPECT_TRUE(k->log_probs);
}

TEST(ParseKserveRequest, TheVllmInterface) {
  inference::ModelInferRequest r;
  Input(&r, "text_input", "BYTES")->mutable_contents()->add_bytes_contents("Blessed are the");
  Input(&r, "sampling_parameters", "BYTES")
      ->mutable_contents()
      ->add_bytes_contents(R"({"max_tokens":"12","temperature":0,"stop":["LORD"],"seed":3})");
  Input(&r, "exclude_input_in_output", "BOOL")->mutable_contents()->add_bool_contents(true);
  auto k = ParseKserveRequest(r);
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->interface, KserveInterface::kVllm);
  EXPECT_EQ(k->generation.max_tokens, 12) << "numbers may come as strings, as that backend takes them";
  EXPECT_EQ(k->generation.temperature, 0.0);
  EXPECT_EQ(k->generation.stop, std::vector<std::string>{"LORD"});
  EXPECT_EQ(k->generation.seed, 3u);
  EXPECT_TRUE(k->exclude_input);
}

TEST(ParseKserveRequest, RefusesEachLeniencyByName) {
  inference::ModelInferRequest unknown;
  Input(&unknown, "text_input", "BYTES")->mutable_contents()->add_bytes_contents("a");
  Input(&unknown, "max_token", "INT32")->mutable_contents()->add_int_contents(1);
  EXPECT_EQ(Refusal(unknown), "input 'max_token' is not an input of this model (did you mean 'max_tokens'?)");
  inference::ModelInferRequest boolean;
  Input(&boolean, "text_input", "BYTES")->mutable_contents()->add_bytes_contents("a");
  Input(&boolean, "max_tokens", "BOOL")->mutable_contents()->add_bool_contents(true);
  EXPECT_EQ(Refusal(boolean), "input 'max_tokens' must have a numeric datatype (INT32), got BOOL");
  inference::ModelInferRequest both;
  Input(&both, "text_input", "BYTES")->mutable_contents()->add_bytes_contents("a");
  both.add_raw_input_contents(std::string("\1\0\0\0a", 5));
  EXPECT_EQ(Refusal(both), "input 'text_input' has both raw_input_contents and typed contents; give one of them");
  inference::ModelInferRequest stops;
  Input(&stops, "text_input", "BYTES")->mutable_contents()->add_bytes_contents("a");
  Input(&stops, "sampling_parameters", "BYTES")->mutable_contents()->add_bytes_contents(R"({"stop":["a",1]})");
  EXPECT_EQ(Refusal(stops), "field 'sampling_parameters.stop[1]' must be a string, got number 1");
  inference::ModelInferRequest batch;
  auto* in = Input(&batch, "text_input", "BYTES");
  in->add_shape(2);
  in->mutable_contents()->add_bytes_contents("a");
  in->mutable_contents()->add_bytes_contents("b");
  EXPECT_EQ(Refusal(batch), "input 'text_input' holds 2 prompts; this server takes one prompt per request");
}

}  // namespace
}  // namespace kraken::server
