// The one validation of a generation request (core/validation.h), without a server: what a valid
// request becomes, and each refusal's exact message (field, limit, value), in both protocols'
// spellings.
#include "core/validation.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "tests/core/test_tokenizer.h"

namespace kraken::core {
namespace {

const tokenizer::Tokenizer& Tok() {
  return KjvTokenizer();
}

RequestLimits Limits() {
  return {.context_length = 64, .vocab_size = 4096, .eos_token_id = 0};
}

std::string Refusal(const GenerationRequest& g, const FieldNames& names = {}) {
  auto r = ValidateGeneration(g, Limits(), Tok(), names);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(r.status().message());
}

TEST(ValidateGeneration, AValidRequestBecomesTheCoresParams) {
  GenerationRequest g{.text = "In the beginning",
                      .max_tokens = 5,
                      .temperature = 0.5,
                      .seed = 9,
                      .stop = {"LORD"},
                      .top_logprobs = 2,
                      .n = 3};
  auto p = ValidateGeneration(g, Limits(), Tok());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->prompt, Tok().Encode("In the beginning").value());
  EXPECT_EQ(p->prompt_text, "In the beginning");
  EXPECT_EQ(p->max_tokens, 5u);
  EXPECT_FALSE(p->clamped);
  EXPECT_EQ(p->sampling.temperature, 0.5f);
  EXPECT_EQ(p->sampling.seed, 9u);
  EXPECT_EQ(p->sampling.top_logprobs, 2);
  EXPECT_TRUE(p->logprobs) << "top_logprobs implies logprobs";
  EXPECT_EQ(p->stop, std::vector<std::string>{"LORD"});
  EXPECT_EQ(p->stop_token_ids, std::vector<int32_t>{0}) << "EOS stops unless ignored";
  EXPECT_EQ(p->n, 3u);
}

TEST(ValidateGeneration, MaxTokensPastTheContextIsClampedAndUnsetFieldsTakeTheDefaults) {
  GenerationRequest g{.token_ids = std::vector<int64_t>{1, 2, 3, 4}, .max_tokens = 1000, .ignore_eos = true};
  auto p = ValidateGeneration(g, Limits(), Tok());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->max_tokens, 60u);
  EXPECT_TRUE(p->clamped);
  EXPECT_TRUE(p->stop_token_ids.empty());
  EXPECT_EQ(p->sampling.temperature, 1.f);
  EXPECT_EQ(p->n, 1u);
  auto defaults = ValidateGeneration({.text = "a"}, Limits(), Tok());
  ASSERT_TRUE(defaults.ok());
  EXPECT_EQ(defaults->max_tokens, 63u) << "the default 128 fitted to the context of 64";
}

TEST(ValidateGeneration, RefusalsNameTheFieldTheLimitAndTheValue) {
  EXPECT_EQ(Refusal({.text = "a", .top_p = 1.5}), "field 'top_p' must be in (0, 1], got 1.5");
  EXPECT_EQ(Refusal({.token_ids = std::vector<int64_t>{1, 4096}}),
            "field 'token_ids[1]' must be in [0, 4096), got 4096");
  EXPECT_EQ(Refusal({.text = "a", .token_ids = std::vector<int64_t>{1}}),
            "field 'text' and 'token_ids' must not both be given");
  EXPECT_EQ(Refusal({}), "field 'prompt' must be set: give 'text' or 'token_ids'");
  EXPECT_EQ(Refusal({.text = "a", .top_logprobs = 21}), "field 'top_logprobs' must be in [0, 20], got 21");
  EXPECT_EQ(Refusal({.text = "a", .n = 17}), "field 'n' must be in [1, 16], got 17");
  EXPECT_EQ(Refusal({.text = "a", .stop = std::vector<std::string>(17, "x")}),
            "field 'stop' may hold at most 16 strings, got 17");
  EXPECT_EQ(Refusal({.text = "a", .max_tokens = -1}), "field 'max_tokens' must be >= 0, got -1");
  // The front-end's own spelling of the fields whose names differ (here the completions API's).
  EXPECT_EQ(Refusal({.text = "a", .top_logprobs = 21}, {.top_logprobs = "logprobs"}),
            "field 'logprobs' must be in [0, 20], got 21");
  EXPECT_EQ(Refusal({.text = "a", .max_tokens = 1, .min_tokens = 2}, {.min_tokens = "min_new_tokens"}),
            "field 'min_new_tokens' must be <= max_tokens (1 after fitting the context), got 2");
  EXPECT_EQ(Refusal({.token_ids = std::vector<int64_t>{1, -3}}, {.token_ids = "prompt"}),
            "field 'prompt[1]' must be in [0, 4096), got -3");
  EXPECT_EQ(Refusal({.text = "a", .logit_bias = {{4096, 1.0}}}),
            "field 'logit_bias' holds token 4096, outside the vocabulary [0, 4096)");
  EXPECT_EQ(Refusal({.text = "a", .logit_bias = {{7, -100.5}}}),
            "field 'logit_bias' gives token 7 the bias -100.5; biases must be in [-100, 100]");
  EXPECT_EQ(Refusal({.text = "a", .logit_bias = {{7, std::nan("")}}}),
            "field 'logit_bias' gives token 7 the bias nan; biases must be in [-100, 100]");
  std::vector<std::pair<int64_t, double>> many;
  for (int i = 0; i < 301; ++i) many.emplace_back(i, 1.0);
  EXPECT_EQ(Refusal({.text = "a", .logit_bias = many}), "field 'logit_bias' may hold at most 300 tokens, got 301");
}

TEST(ValidateGeneration, LogitBiasesReachTheParamsInTokenOrder) {
  auto p = ValidateGeneration({.text = "a", .logit_bias = {{9, -100.0}, {2, 0.5}, {4095, 100.0}, {9, 50.0}}},
                              RequestLimits{.context_length = 64, .vocab_size = 4096}, KjvTokenizer());
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->logit_bias.size(), 3u);
  EXPECT_EQ(p->logit_bias[0].token, 2);
  EXPECT_EQ(p->logit_bias[0].bias, 0.5f);
  EXPECT_EQ(p->logit_bias[1].token, 9);
  EXPECT_EQ(p->logit_bias[1].bias, 50.f) << "one bias per token: the last given";
  EXPECT_EQ(p->logit_bias[2].token, 4095);
  EXPECT_EQ(p->logit_bias[2].bias, 100.f);
}

}  // namespace
}  // namespace kraken::core
