#include "engine/model_config.h"

#include <gtest/gtest.h>

#include "tests/engine/test_util.h"

namespace kraken::engine {
namespace {

std::string Err(const std::string& json) {
  auto r = ParseModelConfig(json);
  return r.ok() ? "" : std::string(r.status().message());
}

TEST(ModelConfig, ParsesKrakenWithDefaults) {
  auto c = ParseModelConfig(R"({"model_type":"kraken","n_layer":12,"n_embd":504,"kraken_degree":4,
                               "n_head_per_sublayer":3,"vocab_size":50304,"n_positions":1024})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, Architecture::kKraken);
  EXPECT_EQ(c->kraken_degree, 4);
  EXPECT_EQ(c->head_dim(), 168);
  EXPECT_EQ(c->ffn_hidden, 1008);  // ffn_expansion defaults to 2
  EXPECT_FALSE(c->bias);
  EXPECT_FLOAT_EQ(c->layer_norm_epsilon, 1e-5f);
  // docs/kraken.md "Released configurations": 125M 4-way has 124.5M parameters.
  EXPECT_NEAR(c->ParameterCount() / 1e6, 124.5, 0.05);
}

TEST(ModelConfig, ReleasedConfigurationsHaveThePapersParameterCounts) {
  struct R {
    int L, N, h, d;
    double params_m;
  } rows[] = {{12, 2, 6, 678, 124.0}, {12, 4, 3, 504, 124.5}, {12, 6, 2, 418, 123.2},
              {24, 2, 8, 888, 350.0}, {24, 4, 4, 644, 353.4}, {24, 4, 4, 960, 760.9}};
  for (const R& r : rows) {
    const std::string j =
        StrCat(R"({"model_type":"kraken","n_layer":)", r.L, R"(,"n_embd":)", r.d, R"(,"kraken_degree":)", r.N,
               R"(,"n_head_per_sublayer":)", r.h, R"(,"vocab_size":50304,"n_positions":1024})");
    auto c = ParseModelConfig(j);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_NEAR(c->ParameterCount() / 1e6, r.params_m, 0.05) << j;
  }
}

TEST(ModelConfig, ParsesHuggingFaceGpt2) {
  auto c = LoadModelConfig(testing::TestModelDir("gpt2-f32"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, Architecture::kGpt2);
  EXPECT_EQ(c->ffn_hidden, 4 * c->n_embd);  // n_inner: null
  EXPECT_TRUE(c->bias);
  EXPECT_EQ(c->eos_token_ids, std::vector<int>{255});
  // GPT-2 124M: 124,439,808 parameters (tied embedding counted once).
  auto g = ParseModelConfig(R"({"model_type":"gpt2","n_layer":12,"n_embd":768,"n_head":12,
                               "vocab_size":50257,"n_positions":1024})");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->ParameterCount(), 124439808);
}

TEST(ModelConfig, TheWorldSplitAndTheKvBytesPerTokenAreTheModels) {
  auto k = ParseModelConfig(R"({"model_type":"kraken","n_layer":12,"n_embd":504,"kraken_degree":4,
                               "n_head_per_sublayer":3,"vocab_size":50304,"n_positions":1024})");
  ASSERT_TRUE(k.ok());
  EXPECT_TRUE(k->CheckWorldSize(1).ok());
  EXPECT_TRUE(k->CheckWorldSize(4).ok());
  EXPECT_EQ(k->CheckWorldSize(8).message(),
            "the model's Kraken degree N = 4 is not a multiple of the world size 8: each worker must hold whole "
            "sub-layers");
  // K and V, 12 layers, 4 sub-layers of width 504, BF16, over 2 ranks: 2 * 2 * 12 * 504 * 4 / 2.
  EXPECT_EQ(k->KvBytesPerToken(2, 2), 48384);
  auto g = ParseModelConfig(R"({"model_type":"gpt2","n_layer":12,"n_embd":768,"n_head":12,
                               "vocab_size":50257,"n_positions":1024})");
  ASSERT_TRUE(g.ok());
  EXPECT_TRUE(g->CheckWorldSize(4).ok());
  EXPECT_EQ(g->CheckWorldSize(5).message(),
            "the model's n_head 12 is not a multiple of the world size 5: each worker must hold whole heads");
  EXPECT_EQ(g->KvBytesPerToken(4, 4), 2 * 4 * 12 * 768 / 4);  // F32, the width sharded 4 ways
}

TEST(ModelConfig, ErrorsNameTheFieldAndValue) {
  EXPECT_EQ(Err("not json"), "config.json: not valid JSON (at byte 2)");
  EXPECT_EQ(Err("[1, 2]"), "config.json: not a JSON object");
  EXPECT_EQ(Err(R"({"model_type":"gpt2","model_type":"kraken"})"), "config.json: duplicate key 'model_type'");
  // Deep nesting is refused by the streaming pass before any tree is built (no recursion).
  EXPECT_EQ(Err("{\"x\":" + std::string(100000, '[') + std::string(100000, ']') + "}"),
            "config.json: JSON nests deeper than 32 levels");
  EXPECT_EQ(Err(R"({"model_type":"llama"})"),
            "config.json: field 'model_type' is 'llama'; expected one of 'kraken', 'gpt2', 'parallel_block'");
  EXPECT_EQ(Err(R"({"model_type":"kraken","n_layer":0})"), "config.json: field 'n_layer' (0) must be in [1, 1024]");
  EXPECT_EQ(Err(R"({"model_type":"kraken","n_layer":2,"n_embd":"wide"})"),
            "config.json: field 'n_embd' must be an integer, got \"wide\"");
  EXPECT_EQ(Err(R"({"model_type":"kraken","n_layer":2,"n_embd":678,"vocab_size":10,"n_positions":8,
                   "kraken_degree":2,"n_head_per_sublayer":4})"),
            "config.json: field 'n_embd' (678) must be divisible by 'n_head_per_sublayer' (4)");
  EXPECT_EQ(Err(R"({"model_type":"kraken","n_layer":2,"n_embd":8,"vocab_size":10,"n_positions":8,
                   "n_head_per_sublayer":2})"),
            "config.json: missing required field 'kraken_degree'");
  EXPECT_EQ(Err(R"({"model_type":"gpt2","n_layer":2,"n_embd":8,"n_head":2,"vocab_size":10,"n_positions":8,
                   "activation_function":"relu"})"),
            "config.json: field 'activation_function' is 'relu'; only the tanh GELU ('gelu_new', "
            "'gelu_pytorch_tanh') is supported");
  EXPECT_EQ(Err(R"({"model_type":"gpt2","n_layer":2,"n_embd":8,"n_head":2,"vocab_size":10,"n_positions":8,
                   "eos_token_id":50256})"),
            "config.json: field 'eos_token_id' must hold token ids in [0, 10), got 50256");
  EXPECT_EQ(Err(R"({"model_type":"parallel_block","n_layer":2,"n_embd":8,"n_head":2,"vocab_size":10,
                   "n_positions":8,"layer_norm_epsilon":-1})"),
            "config.json: field 'layer_norm_epsilon' (-1) must be in [1e-12, 1]");
}

TEST(ModelConfig, MissingFileIsNotFound) {
  auto c = LoadModelConfig("/nonexistent-dir");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kraken::engine
