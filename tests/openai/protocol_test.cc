// The OpenAI completions wire format (openai/protocol.h) as a pure function: what a body becomes
// in the core's terms, and the exact refusal for each kind of bad body; the HTTP status and the
// error object a failure turns into.
#include "openai/protocol.h"

#include <gtest/gtest.h>

#include <string>

namespace kraken::openai {
namespace {

std::string Refusal(const std::string& body) {
  auto r = ParseCompletionRequest(body, 1024);
  EXPECT_FALSE(r.ok()) << body;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << body;
  return std::string(r.status().message());
}

TEST(ParseCompletionRequest, CarriesEveryFieldIntoTheCoresTerms) {
  auto r = ParseCompletionRequest(
      R"({"model":"m","prompt":"In the beginning","max_tokens":7,"temperature":0.5,"top_p":0.9,"top_k":40,
          "min_p":0.05,"seed":11,"stop":["\n","LORD"],"stop_token_ids":[3],"n":2,"logprobs":2,"echo":true,
          "presence_penalty":0.25,"frequency_penalty":0.5,"repetition_penalty":1.1,"ignore_eos":true,
          "min_tokens":2,"skip_special_tokens":false,"priority":-1,"user":"u","stream":true,
          "stream_options":{"include_usage":true}})",
      1024);
  ASSERT_TRUE(r.ok()) << r.status();
  const core::GenerationRequest& g = r->generation;
  EXPECT_EQ(r->model, "m");
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_FALSE(r->continuous_usage);
  EXPECT_EQ(g.text, "In the beginning");
  EXPECT_FALSE(g.token_ids.has_value());
  EXPECT_EQ(g.max_tokens, 7);
  EXPECT_EQ(g.temperature, 0.5);
  EXPECT_EQ(g.top_p, 0.9);
  EXPECT_EQ(g.top_k, 40);
  EXPECT_EQ(g.min_p, 0.05);
  EXPECT_EQ(g.seed, 11u);
  EXPECT_EQ(g.stop, (std::vector<std::string>{"\n", "LORD"}));
  EXPECT_EQ(g.stop_token_ids, std::vector<int64_t>{3});
  EXPECT_EQ(g.n, 2);
  EXPECT_TRUE(g.logprobs);
  EXPECT_EQ(g.top_logprobs, 2);
  EXPECT_TRUE(g.echo);
  EXPECT_TRUE(g.prompt_logprobs) << "echo with logprobs scores the prompt too";
  EXPECT_EQ(g.presence_penalty, 0.25);
  EXPECT_EQ(g.frequency_penalty, 0.5);
  EXPECT_EQ(g.repetition_penalty, 1.1);
  EXPECT_TRUE(g.ignore_eos);
  EXPECT_EQ(g.min_tokens, 2);
  EXPECT_EQ(g.skip_special_tokens, false);
  EXPECT_EQ(g.priority, -1);
}

TEST(ParseCompletionRequest, TokenIdsAndUnsetFields) {
  auto r = ParseCompletionRequest(R"({"prompt":[1,2,3]})", 1024);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generation.token_ids, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_FALSE(r->generation.text.has_value());
  EXPECT_FALSE(r->generation.max_tokens.has_value());
  EXPECT_FALSE(r->generation.temperature.has_value());
  EXPECT_FALSE(r->generation.logprobs);
  EXPECT_FALSE(r->stream);
  EXPECT_FALSE(r->model.has_value());
  // max_tokens null: as many as the context allows.
  auto all = ParseCompletionRequest(R"({"prompt":"a","max_tokens":null})", 1024);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->generation.max_tokens, 1024);
}

TEST(ParseCompletionRequest, ABooleanLogprobsReadsAsPydanticServersReadIt) {
  auto yes = ParseCompletionRequest(R"({"prompt":"a","logprobs":true})", 1024);
  ASSERT_TRUE(yes.ok()) << yes.status();
  EXPECT_TRUE(yes->generation.logprobs);
  EXPECT_EQ(yes->generation.top_logprobs, 1);
  auto no = ParseCompletionRequest(R"({"prompt":"a","logprobs":false})", 1024);
  ASSERT_TRUE(no.ok()) << no.status();
  EXPECT_TRUE(no->generation.logprobs);  // 0: the chosen token's logprob, no alternatives
  EXPECT_EQ(no->generation.top_logprobs, 0);
  EXPECT_EQ(Refusal(R"({"prompt":"a","logprobs":"2"})"), "field 'logprobs' must be an integer, got string \"2\"");
}

TEST(ParseCompletionRequest, RefusalsNameTheFieldAndTheValue) {
  EXPECT_EQ(Refusal("[1]"), "the request body must be a JSON object, got array [1]");
  EXPECT_EQ(Refusal(R"({"prompt":"a","temprature":1})"),
            "field 'temprature' is not a field of the completions API (did you mean 'temperature'?)");
  EXPECT_EQ(Refusal(R"({"prompt":"a","max_tokens":"7"})"), "field 'max_tokens' must be an integer, got string \"7\"");
  EXPECT_EQ(Refusal(R"({"prompt":"a","prompt":"b"})"), "the request body: duplicate key 'prompt'");
  EXPECT_EQ(Refusal(R"({"prompt":"a","max_tokens":18446744073709551616})"),
            "field 'max_tokens' must be an integer in [-2^63, 2^63), got 1.8446744073709552e+19 (too large)");
  EXPECT_EQ(Refusal(R"({"prompt":["a",5]})"),
            "field 'prompt[1]' must be a string or an array of token ids, got number 5");
  EXPECT_EQ(Refusal(R"({"prompt":[[1],[2,"x"]]})"),
            "field 'prompt[1][1]' must be an integer token id, got string \"x\"");
  std::string many = R"({"prompt":[)";
  for (int i = 0; i <= kMaxPromptsPerRequest; ++i) many += i ? R"(,"a")" : R"("a")";
  EXPECT_EQ(Refusal(many + "]}"), "field 'prompt' holds 1025 prompts; at most 1024 per request");
}

TEST(ParseCompletionRequest, APromptArrayIsOneGenerationPerPromptWithTheSharedFields) {
  auto r = ParseCompletionRequest(R"({"prompt":["a","bc",[7,8]],"max_tokens":3,"n":2,"seed":5,"logprobs":1})", 64);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->generations.size(), 3u);
  EXPECT_EQ(r->generations[0].text, "a");
  EXPECT_EQ(r->generations[1].text, "bc");
  EXPECT_FALSE(r->generations[2].text.has_value());
  EXPECT_EQ(r->generations[2].token_ids, (std::vector<int64_t>{7, 8}));
  for (const auto& g : r->generations) {
    EXPECT_EQ(g.max_tokens, 3);
    EXPECT_EQ(g.n, 2);
    EXPECT_EQ(g.seed, 5u);
    EXPECT_EQ(g.top_logprobs, 1);
  }
  EXPECT_EQ(r->generation.text, "a") << "the first prompt's request";
  // One prompt, however spelt, is one generation.
  for (const char* body : {R"({"prompt":"a"})", R"({"prompt":["a"]})", R"({"prompt":[[3]]})", R"({"prompt":[3]})"}) {
    auto one = ParseCompletionRequest(body, 64);
    ASSERT_TRUE(one.ok()) << body;
    EXPECT_EQ(one->generations.size(), 1u) << body;
  }
}

TEST(ParseChatRequest, MessagesKeepTheirOrderAndTheFieldsReachTheCore) {
  auto r =
      ParseChatRequest(R"({"messages":[{"role":"user","content":"hi","name":"a"},{"role":"assistant","content":null}],)"
                       R"("max_tokens":9,"max_completion_tokens":4,"logprobs":true,"top_logprobs":3,"n":2,)"
                       R"("add_generation_prompt":false,"stream":true,"logit_bias":{"7":-100}})",
                       64);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->messages.size(), 2u);
  EXPECT_EQ(r->messages[0].dump(), R"({"role":"user","content":"hi","name":"a"})") << "the order as sent";
  const core::GenerationRequest& g = r->completion.generation;
  EXPECT_EQ(g.max_tokens, 4) << "max_completion_tokens wins";
  EXPECT_TRUE(g.logprobs);
  EXPECT_EQ(g.top_logprobs, 3);
  EXPECT_EQ(g.n, 2);
  EXPECT_FALSE(g.add_special_tokens) << "the template writes its own BOS";
  EXPECT_FALSE(r->add_generation_prompt);
  EXPECT_TRUE(r->completion.stream);
  ASSERT_EQ(g.logit_bias.size(), 1u);
  EXPECT_EQ(ParseChatRequest(R"({"messages":[{"role":"user","content":"x"}],"echo":true})", 64).status().message(),
            "field 'echo' is not a field of the chat completions API (did you mean 'seed'?)");
  EXPECT_EQ(ParseChatRequest(R"({"messages":[{"role":"user","content":"x"}],"logprobs":2})", 64).status().message(),
            "field 'logprobs' must be true or false, got number 2");
  EXPECT_EQ(
      ParseChatRequest(R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}})", 64)
          .status()
          .message(),
      R"(field 'response_format' may only be {"type": "text"} (no guided decoding here), got object {"type":"json_object"})");
}

TEST(ParseCompletionRequest, NestingPastTheLimitIsRefusedWithoutRecursion) {
  const int depth = 200000;
  const std::string deep = R"({"prompt":)" + std::string(depth, '[') + std::string(depth, ']') + "}";
  const std::string why = Refusal(deep);
  EXPECT_NE(why.find("32"), std::string::npos) << why.substr(0, 300);
  EXPECT_LT(why.size(), 400u) << "the message quotes a short preview, not the value";
}

TEST(HttpStatus, EachCodeHasItsStatus) {
  EXPECT_EQ(HttpStatus(absl::InvalidArgumentError("x")), 400);
  EXPECT_EQ(HttpStatus(absl::UnauthenticatedError("x")), 401);
  EXPECT_EQ(HttpStatus(absl::NotFoundError("x")), 404);
  EXPECT_EQ(HttpStatus(absl::DeadlineExceededError("x")), 408);
  EXPECT_EQ(HttpStatus(absl::ResourceExhaustedError("x")), 429);
  EXPECT_EQ(HttpStatus(absl::CancelledError("x")), 499);
  EXPECT_EQ(HttpStatus(absl::UnavailableError("x")), 503);
  EXPECT_EQ(HttpStatus(absl::AbortedError("x")), 503);
  EXPECT_EQ(HttpStatus(absl::InternalError("x")), 500);
}

TEST(ErrorObject, NamesTheParameterTheStatusCarries) {
  const nlohmann::json e = ErrorObject(FieldError("top_p", "must be in (0, 1], got ", 1.5), 400);
  EXPECT_EQ(e["error"]["message"], "field 'top_p' must be in (0, 1], got 1.5");
  EXPECT_EQ(e["error"]["param"], "top_p");
  EXPECT_EQ(e["error"]["type"], "invalid_request_error");
  const nlohmann::json full = ErrorObject(absl::ResourceExhaustedError("the waiting queue is full"), 429);
  EXPECT_TRUE(full["error"]["param"].is_null());
  // The field is data: a message that merely starts like one names no parameter.
  EXPECT_TRUE(ErrorObject(absl::InvalidArgumentError("field 'x' is text only"), 400)["error"]["param"].is_null());
  EXPECT_EQ(ErrorObject(WithField(absl::NotFoundError("no such model"), "model"), 404)["error"]["param"], "model");
}

TEST(Dump, HalfACharacterBecomesTheReplacementCharacter) {
  EXPECT_EQ(Dump(nlohmann::json{{"text", std::string("a\xE2\x80")}}), "{\"text\":\"a\xEF\xBF\xBD\"}");
}

}  // namespace
}  // namespace kraken::openai
