// Each committed test model against the PyTorch reference's golden file (logits and every named
// intermediate), and the engine's own invariants: chunked prefill, token-by-token decode,
// scattered KV blocks and batching with other sequences all give the same bits as one prefill.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <numeric>
#include <random>
#include <thread>
#include <tuple>

#include "engine/cpu/kernels.h"
#include "engine/model.h"
#include "tests/engine/in_process_group.h"
#include "tests/engine/test_util.h"

namespace kraken::engine {
namespace {

using testing::Compare;
using testing::Golden;

// F32 tolerance from the issue: max |engine - reference| <= 1e-4 * max |reference logit|.
// BF16/F16 models store rounded weights but compute in F32 exactly like the reference (which
// widens the same stored values), so the same tolerance applies to them.
constexpr double kRelTol = 1e-4;
// On the levels with BF16 products (KRAKEN_CPU_ISA=amx or avx512bf16) a BF16 model's GEMMs round
// their activations to BF16 (engine/cpu/gemm_kernels.cc), a different product from the
// reference's: measured up to 4.6e-3 of the largest logit (kraken-n4-bf16) and 2.5e-3 in the
// intermediates.
constexpr double kRelTolBf16Activations = 1e-2;

// The reference tolerance for `model` on the active kernel level.
double RelTol(const std::string& model) {
  const bool bf16_products = cpu::Kernels().bf16_pairs && model.ends_with("-bf16");
  return bf16_products ? kRelTolBf16Activations : kRelTol;
}

struct Fixture {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<KvCache> kv;
  LocalCommunicator comm;
};

Fixture Load(const std::string& name, int max_tokens = 64, int num_blocks = 64, int block_size = 16, int threads = 0,
             DType kv_dtype = DType::kF32) {
  Fixture f;
  auto b = CreateBackend({.device = Device::Cpu(), .threads = threads});
  EXPECT_TRUE(b.ok()) << b.status();
  f.backend = std::move(b).value();
  auto m = LoadModel(name.find('/') != std::string::npos ? name : testing::TestModelDir(name), f.backend.get(),
                     {.max_tokens = max_tokens, .max_seqs = 8, .max_logit_rows = max_tokens});
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return f;
  f.model = std::move(m).value();
  auto kv = KvCache::Create(*f.backend, f.model->kv_layout(),
                            {.num_blocks = num_blocks, .block_size = block_size, .dtype = kv_dtype});
  EXPECT_TRUE(kv.ok()) << kv.status();
  f.kv = std::make_unique<KvCache>(std::move(kv).value());
  return f;
}

std::vector<int32_t> Iota(int n, int first = 0) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

// Runs `tokens` through the model in chunks of `chunk`, returning all logits [T, V].
std::vector<float> RunChunked(Fixture& f, const std::vector<int32_t>& tokens, int chunk,
                              const std::vector<int32_t>& table) {
  const int V = f.model->config().vocab_size;
  std::vector<float> logits;
  for (size_t begin = 0; begin < tokens.size(); begin += chunk) {
    const size_t n = std::min<size_t>(chunk, tokens.size() - begin);
    SequenceInput s{.tokens = {tokens.data() + begin, n},
                    .start_pos = static_cast<int32_t>(begin),
                    .block_table = table,
                    .all_logits = true};
    auto r = f.model->Forward({.seqs = {&s, 1}}, *f.kv, f.comm);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return {};
    EXPECT_EQ(r->rows, static_cast<int>(n));
    logits.insert(logits.end(), r->logits, r->logits + n * V);
  }
  return logits;
}

class GoldenModel : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenModel, LogitsAndIntermediatesMatchTheReference) {
  const std::string name = GetParam();
  Golden g(testing::TestModelDir(name));
  ASSERT_TRUE(g.ok());
  Fixture f = Load(name);
  ASSERT_NE(f.model, nullptr);
  const std::vector<int32_t> tokens = g.Ints("tokens");
  const int T = static_cast<int>(tokens.size());

  // Collect the engine's intermediates by their golden names.
  std::map<std::string, std::vector<float>> seen;
  f.model->set_tensor_callback([&](std::string_view n, int layer, int sub, Mat m) {
    std::string key = "trace." + std::string(n);
    if (layer >= 0) key += ".l" + std::to_string(layer);
    if (sub >= 0) key += ".s" + std::to_string(sub);
    std::vector<float>& v = seen[key];
    v.clear();
    for (int r = 0; r < m.rows; ++r) v.insert(v.end(), m.Row(r), m.Row(r) + m.cols);
  });
  const std::vector<float> logits = RunChunked(f, tokens, T, Iota(4));
  f.model->set_tensor_callback(nullptr);

  std::vector<int64_t> shape;
  const std::vector<float> want = g.Floats("logits", &shape);
  ASSERT_EQ(logits.size(), want.size());
  const auto d = Compare(logits.data(), want.data(), want.size());
  EXPECT_LE(d.max_abs, RelTol(name) * d.max_ref)
      << name << ": logits differ by " << d.max_abs << " (max |logit| " << d.max_ref << ")";
  std::printf("[ %s ] logits: max |diff| %.3g, max |logit| %.3g\n", name.c_str(), d.max_abs, d.max_ref);

  // Every intermediate the reference recorded must exist in the engine and agree.
  int compared = 0;
  for (const auto& [tname, info] : g.file().tensors()) {
    if (tname.rfind("trace.", 0) != 0) continue;
    SCOPED_TRACE(tname);
    auto it = seen.find(tname);
    ASSERT_NE(it, seen.end()) << "the engine never produced " << tname;
    const std::vector<float> ref = g.Floats(tname);
    ASSERT_EQ(it->second.size(), ref.size());
    const auto td = Compare(it->second.data(), ref.data(), ref.size());
    EXPECT_LE(td.max_abs, RelTol(name) * std::max(1.0, td.max_ref)) << "max |diff| " << td.max_abs;
    ++compared;
  }
  EXPECT_GE(compared, 8);

  if (g.Has("hf_logits")) {  // GPT-2: also Hugging Face transformers' own forward
    const std::vector<float> hf = g.Floats("hf_logits");
    const auto hd = Compare(logits.data(), hf.data(), hf.size());
    EXPECT_LE(hd.max_abs, RelTol(name) * hd.max_ref) << "vs GPT2LMHeadModel: " << hd.max_abs;
    std::printf("[ %s ] vs transformers GPT2LMHeadModel: max |diff| %.3g\n", name.c_str(), hd.max_abs);
  }
}

INSTANTIATE_TEST_SUITE_P(TestModels, GoldenModel, ::testing::ValuesIn(testing::kTestModels),
                         testing::TestModelParamName);

// The invariances hold exactly within each KV-cache dtype: a 16-bit entry is rounded once, when
// written, whatever the chunking, batch or block placement.
class GoldenModelKv : public ::testing::TestWithParam<std::tuple<std::string, DType>> {};

TEST_P(GoldenModelKv, ChunkingDecodingScatteringAndBatchingChangeNoBits) {
  const auto [name, kv_dtype] = GetParam();
  Golden g(testing::TestModelDir(name));
  const std::vector<int32_t> tokens = g.Ints("tokens");
  const int T = static_cast<int>(tokens.size());
  const uint32_t seed = testing::TestSeed();
  SCOPED_TRACE(StrCat("seed ", seed, ", KV ", DTypeName(kv_dtype)));
  std::mt19937 rng(seed);

  Fixture f = Load(name, 64, 64, 16, 0, kv_dtype);
  ASSERT_NE(f.model, nullptr);
  const std::vector<float> full = RunChunked(f, tokens, T, Iota(4));
  const size_t bytes = full.size() * sizeof(float);
  EXPECT_EQ(0, std::memcmp(full.data(), RunChunked(f, tokens, 5, Iota(4)).data(), bytes)) << "chunks of 5";
  EXPECT_EQ(0, std::memcmp(full.data(), RunChunked(f, tokens, 1, Iota(4)).data(), bytes)) << "decode";

  // Scattered physical blocks and a different thread count: same bits.
  Fixture scattered = Load(name, 64, 64, /*block_size=*/16, /*threads=*/1, kv_dtype);
  std::vector<int32_t> table = Iota(64);
  std::shuffle(table.begin(), table.end(), rng);
  EXPECT_EQ(0, std::memcmp(full.data(), RunChunked(scattered, tokens, 11, table).data(), bytes))
      << "scattered blocks, one thread";
  // Another block size changes where the online softmax rescales, so only the reference
  // tolerance applies (against the reference itself with an F32 cache).
  Fixture small = Load(name, 64, 64, /*block_size=*/3, 0, kv_dtype);
  const std::vector<float> small_logits = RunChunked(small, tokens, 11, table);
  const std::vector<float> want = kv_dtype == DType::kF32 ? g.Floats("logits") : full;
  const auto d = Compare(small_logits.data(), want.data(), want.size());
  EXPECT_LE(d.max_abs, RelTol(name) * d.max_ref) << "block size 3";

  // Batched with unrelated sequences at different positions (prefill and decode mixed).
  const int V = f.model->config().vocab_size;
  std::vector<int32_t> other1(9), other2(1);
  for (auto& t : other1) t = static_cast<int32_t>(rng() % V);
  other2[0] = static_cast<int32_t>(rng() % V);
  const std::vector<int32_t> t1 = Iota(4, 10), t2 = Iota(4, 20), t0 = Iota(4, 30);
  // Give sequence 2 some history first.
  std::vector<int32_t> hist(13);
  for (auto& t : hist) t = static_cast<int32_t>(rng() % V);
  SequenceInput h{.tokens = hist, .start_pos = 0, .block_table = t2};
  ASSERT_TRUE(f.model->Forward({.seqs = {&h, 1}}, *f.kv, f.comm).ok());
  const int split = 20;
  SequenceInput first{.tokens = {tokens.data(), split}, .start_pos = 0, .block_table = t0, .all_logits = true};
  SequenceInput a{.tokens = other1, .start_pos = 0, .block_table = t1, .all_logits = true};
  SequenceInput b{.tokens = other2, .start_pos = 13, .block_table = t2};
  std::vector<float> batched;
  {
    SequenceInput seqs[] = {a, first, b};
    auto r = f.model->Forward({.seqs = seqs}, *f.kv, f.comm);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->rows, 9 + split + 1);
    batched.assign(r->logits + 9 * V, r->logits + (9 + split) * V);
  }
  SequenceInput rest{.tokens = {tokens.data() + split, static_cast<size_t>(T - split)},
                     .start_pos = split,
                     .block_table = t0,
                     .all_logits = true};
  {
    SequenceInput seqs[] = {b, rest};  // b again at a later position, now in front
    b.start_pos = 14;
    seqs[0] = b;
    auto r = f.model->Forward({.seqs = seqs}, *f.kv, f.comm);
    ASSERT_TRUE(r.ok()) << r.status();
    batched.insert(batched.end(), r->logits + V, r->logits + (1 + T - split) * V);
  }
  EXPECT_EQ(0, std::memcmp(full.data(), batched.data(), bytes)) << "batched with other sequences";
}

INSTANTIATE_TEST_SUITE_P(TestModels, GoldenModelKv,
                         ::testing::Combine(::testing::ValuesIn(testing::kTestModels),
                                            ::testing::Values(DType::kF32, DType::kBF16, DType::kF16)),
                         [](const auto& p) {
                           return testing::TestModelParamName({std::get<0>(p.param), p.index}) + "_" +
                                  std::string(DTypeName(std::get<1>(p.param)));
                         });

// log_softmax of each row of `logits` [rows, V], in double.
std::vector<double> LogSoftmax(const std::vector<float>& logits, int V) {
  std::vector<double> out(logits.size());
  for (size_t r = 0; r < logits.size() / V; ++r) {
    const float* x = logits.data() + r * V;
    const double mx = *std::max_element(x, x + V);
    double sum = 0;
    for (int i = 0; i < V; ++i) sum += std::exp(x[i] - mx);
    const double lse = mx + std::log(sum);
    for (int i = 0; i < V; ++i) out[r * V + i] = x[i] - lse;
  }
  return out;
}

// Bounds on what a 16-bit KV cache changes: the largest logprob difference from an F32 cache over
// every position and vocabulary entry of the golden prompts (docs/api.md "Memory" gives the figures).
constexpr double kMaxLogprobDiffBf16 = 0.05, kMaxLogprobDiffF16 = 0.01;
// On the BF16-product levels a BF16 model's activations are rounded to BF16 at every GEMM, so a change in
// the KV cache's last bits can move an activation by a whole BF16 step: the cache dtypes then
// differ by what BF16 activations differ by (measured up to 0.11, kraken-n4-bf16).
constexpr double kMaxLogprobDiffBf16Activations = 0.25;

TEST_P(GoldenModel, SixteenBitKvCacheStaysNearTheF32Cache) {
  const std::string name = GetParam();
  Golden g(testing::TestModelDir(name));
  const std::vector<int32_t> tokens = g.Ints("tokens");
  const int T = static_cast<int>(tokens.size());
  Fixture f32 = Load(name);
  ASSERT_NE(f32.model, nullptr);
  const int V = f32.model->config().vocab_size;
  const std::vector<double> want = LogSoftmax(RunChunked(f32, tokens, T, Iota(4)), V);
  for (const DType dtype : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    Fixture f = Load(name, 64, 64, 16, 0, dtype);
    ASSERT_NE(f.model, nullptr);
    const std::vector<double> got = LogSoftmax(RunChunked(f, tokens, T, Iota(4)), V);
    ASSERT_EQ(got.size(), want.size());
    double max_diff = 0;
    int top1_same = 0;
    for (size_t i = 0; i < got.size(); ++i) max_diff = std::max(max_diff, std::fabs(got[i] - want[i]));
    for (int r = 0; r < T; ++r) {
      const auto row = [&](const std::vector<double>& v) { return v.begin() + static_cast<int64_t>(r) * V; };
      top1_same +=
          std::max_element(row(got), row(got) + V) - row(got) == std::max_element(row(want), row(want) + V) - row(want);
    }
    std::printf("[ %s ] KV %s vs F32: max |logprob diff| %.3g over %d positions x %d tokens; top-1 same at %d/%d\n",
                name.c_str(), std::string(DTypeName(dtype)).c_str(), max_diff, T, V, top1_same, T);
    EXPECT_GT(max_diff, 0.0) << "a 16-bit cache that changes nothing is not rounding";
    const double bound = RelTol(name) == kRelTolBf16Activations ? kMaxLogprobDiffBf16Activations
                         : dtype == DType::kBF16                ? kMaxLogprobDiffBf16
                                                                : kMaxLogprobDiffF16;
    EXPECT_LE(max_diff, bound);
  }
}

struct WorldCase {
  std::string model;
  int world;
};

class ShardedWorld : public ::testing::TestWithParam<WorldCase> {};

// W shards in W threads, joined by in-process collectives, reproduce the golden logits: the
// shard split only changes floating-point summation order (docs/kraken.md "Mapping to devices").
TEST_P(ShardedWorld, ShardsTogetherMatchTheReference) {
  const auto [name, W] = GetParam();
  Golden g(testing::TestModelDir(name));
  const std::vector<int32_t> tokens = g.Ints("tokens");
  const int T = static_cast<int>(tokens.size());
  testing::InProcessGroup group(W);
  std::vector<std::vector<float>> logits(W);
  std::vector<std::string> errors(W);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < W; ++rank) {
    threads.emplace_back([&, rank] {
      auto backend = CreateBackend({.device = Device::Cpu(), .threads = 1});
      auto model = LoadModel(testing::TestModelDir(name), backend->get(),
                             {.max_tokens = T,
                              .max_seqs = 1,
                              .max_logit_rows = T,
                              .rank = rank,
                              .world_size = W,
                              .compute_logits = rank == 0});
      if (!model.ok()) {
        errors[rank] = std::string(model.status().message());
        return;
      }
      auto kv = KvCache::Create(**backend, (*model)->kv_layout(), {.num_blocks = 8});
      auto comm = group.Member(rank);
      const std::vector<int32_t> table = Iota(8);
      // Prefill the first 30 tokens, then decode the rest one by one: collectives at every step.
      for (int begin = 0; begin < T; begin += begin < 30 ? 30 : 1) {
        const int n = begin < 30 ? 30 : 1;
        SequenceInput s{.tokens = {tokens.data() + begin, static_cast<size_t>(n)},
                        .start_pos = begin,
                        .block_table = table,
                        .all_logits = true};
        auto r = (*model)->Forward({.seqs = {&s, 1}}, *kv, *comm);
        if (!r.ok()) {
          errors[rank] = std::string(r.status().message());
          return;
        }
        if (rank == 0) logits[0].insert(logits[0].end(), r->logits, r->logits + n * r->vocab);
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  const std::vector<float> want = g.Floats("logits");
  ASSERT_EQ(logits[0].size(), want.size());
  const auto d = Compare(logits[0].data(), want.data(), want.size());
  EXPECT_LE(d.max_abs, RelTol(name) * d.max_ref) << name << " over " << W << " ranks: max |diff| " << d.max_abs;
  std::printf("[ %s, W=%d ] logits: max |diff| %.3g\n", name.c_str(), W, d.max_abs);
}

INSTANTIATE_TEST_SUITE_P(Worlds, ShardedWorld,
                         ::testing::Values(WorldCase{"kraken-n2-h113-f32", 2}, WorldCase{"kraken-n4-bias-f32", 2},
                                           WorldCase{"kraken-n4-bias-f32", 4}, WorldCase{"kraken-n4-bf16", 4},
                                           WorldCase{"gpt2-f32", 2}, WorldCase{"gpt2-bf16", 4},
                                           WorldCase{"parallel-block-f16-sharded", 3}),
                         [](const auto& param_info) {
                           std::string s = param_info.param.model + "_W" + std::to_string(param_info.param.world);
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

TEST(ModelInputs, InvalidStepsAreRejectedWithPreciseErrors) {
  Fixture f = Load("kraken-n4-bf16", /*max_tokens=*/16, /*num_blocks=*/8);
  ASSERT_NE(f.model, nullptr);
  const std::vector<int32_t> table = Iota(8), ok_tokens = {1, 2, 3};
  auto err = [&](SequenceInput s) {
    auto r = f.model->Forward({.seqs = {&s, 1}}, *f.kv, f.comm);
    return r.ok() ? std::string() : std::string(r.status().message());
  };
  EXPECT_EQ(err({.tokens = ok_tokens, .start_pos = 0, .block_table = table}), "");
  const std::vector<int32_t> bad_token = {1, 256, 3};
  EXPECT_EQ(err({.tokens = bad_token, .start_pos = 0, .block_table = table}),
            "sequence 0: token 1 = 256 is outside the vocabulary [0, 256)");
  const std::vector<int32_t> negative = {-1};
  EXPECT_EQ(err({.tokens = negative, .start_pos = 0, .block_table = table}),
            "sequence 0: token 0 = -1 is outside the vocabulary [0, 256)");
  EXPECT_EQ(err({.tokens = {}, .start_pos = 0, .block_table = table}),
            "sequence 0: 'tokens' is empty; a step adds at least one token");
  EXPECT_EQ(err({.tokens = ok_tokens, .start_pos = 62, .block_table = table}),
            "sequence 0: positions up to 64 exceed the context length (n_positions = 64)");
  EXPECT_EQ(err({.tokens = ok_tokens, .start_pos = 30, .block_table = {table.data(), 2}}),
            "sequence 0: 'block_table' has 2 blocks; 3 are needed for 33 tokens of block size 16");
  const std::vector<int32_t> bad_table = {0, 9};
  EXPECT_EQ(err({.tokens = ok_tokens, .start_pos = 15, .block_table = bad_table}),
            "sequence 0: block_table[1] = 9 is outside [0, 8)");
  const std::vector<int32_t> many(17, 1);
  EXPECT_EQ(err({.tokens = many, .start_pos = 0, .block_table = table}),
            "batch has 17 new tokens; the limit (max_tokens) is 16");
  // Two sequences writing the same block, or one reading a block another writes: refused.
  const std::vector<int32_t> t0 = {0}, t1 = {0}, shared_prefix = {0, 1};
  SequenceInput a{.tokens = ok_tokens, .start_pos = 0, .block_table = t0};
  SequenceInput b{.tokens = ok_tokens, .start_pos = 0, .block_table = t1};
  SequenceInput pair[] = {a, b};
  EXPECT_EQ(f.model->Forward({.seqs = pair}, *f.kv, f.comm).status().message(),
            "sequences 0 and 1 both write KV block 0");
  SequenceInput reader{.tokens = ok_tokens, .start_pos = 16, .block_table = shared_prefix};
  SequenceInput mixed[] = {a, reader};
  EXPECT_EQ(f.model->Forward({.seqs = mixed}, *f.kv, f.comm).status().message(),
            "sequence 1 reads KV block 0 that sequence 0 writes in the same step");
  auto none = f.model->Forward({}, *f.kv, f.comm);
  EXPECT_EQ(none.status().message(), "batch has no sequences");
  // After all those rejections the model still computes the same thing.
  EXPECT_EQ(err({.tokens = ok_tokens, .start_pos = 0, .block_table = table}), "");
}

TEST(ModelLoading, MissingOrMisshapenTensorsAndBadShardsAreReported) {
  auto b = CreateBackend({});
  ASSERT_TRUE(b.ok());
  auto m = LoadModel(testing::TestModelDir("kraken-n4-bf16"), b->get(), {.world_size = 3});
  ASSERT_FALSE(m.ok());
  EXPECT_NE(std::string(m.status().message()).find("kraken_degree 4 cannot be split over a world of size 3"),
            std::string::npos)
      << m.status();
  m = LoadModel(testing::TestModelDir("gpt2-f32"), b->get(), {.world_size = 3});
  ASSERT_FALSE(m.ok());
  EXPECT_NE(std::string(m.status().message()).find("n_head 4 cannot be split"), std::string::npos) << m.status();
  m = LoadModel("/nonexistent", b->get(), {});
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  auto cuda = CreateBackend({.device = Device::Cuda(0)});
  ASSERT_FALSE(cuda.ok());
  EXPECT_EQ(cuda.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(std::string(cuda.status().message()).find("built without CUDA"), std::string::npos);
}

TEST(ModelSharding, ShardsSplitTheWeightsAndKvCache) {
  auto b = CreateBackend({});
  ASSERT_TRUE(b.ok());
  for (int rank = 0; rank < 2; ++rank) {
    auto m = LoadModel(testing::TestModelDir("kraken-n4-bf16"), b->get(), {.rank = rank, .world_size = 2});
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ((*m)->kv_layout().slots, 3 * 2);  // L layers x N/W sub-layers
    auto g = LoadModel(testing::TestModelDir("gpt2-f32"), b->get(), {.rank = rank, .world_size = 2});
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_EQ((*g)->kv_layout().heads, 2);  // 4 heads over 2 ranks
  }
  auto whole = LoadModel(testing::TestModelDir("kraken-n4-bf16"), b->get(), {});
  auto half = LoadModel(testing::TestModelDir("kraken-n4-bf16"), b->get(), {.rank = 1, .world_size = 2});
  ASSERT_TRUE(whole.ok() && half.ok());
  EXPECT_LT((*half)->weight_bytes(), (*whole)->weight_bytes());
}

// Weights are held once, in their stored dtype: the tied wte serves both the embedding and the
// LM head. What a shard holds is the checkpoint's bytes, plus the F32 widening of the 1-D tensors
// and wpe, plus the zero rows that pad each matrix to whole 32-row panels -- well under one more copy of wte.
TEST(ModelMemory, WeightsAreHeldOnceInTheirStoredDtype) {
  auto b = CreateBackend({.device = Device::Cpu(), .threads = 1});
  ASSERT_TRUE(b.ok());
  std::vector<std::string> dirs = {testing::SourceDir() + "/models/gpt2-kjv",
                                   testing::SourceDir() + "/models/kraken-kjv-4way"};
  for (const char* m : {"gpt2-f32", "gpt2-bf16", "kraken-n4-bf16", "parallel-block-f16-sharded"}) {
    dirs.push_back(testing::TestModelDir(m));
  }
  for (const std::string& dir : dirs) {
    SCOPED_TRACE(dir);
    auto ckpt = Checkpoint::Open(dir);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    int64_t low = 0, padding = 0, wte_bytes = 0;
    for (const std::string& name : (*ckpt)->Names()) {
      const TensorInfo* t = (*ckpt)->Find(name);
      if (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")) continue;  // buffers, not weights
      if (name == "lm_head.weight") continue;                                             // tied: wte's twin
      const bool vector = t->shape.size() == 1 || name.ends_with("wpe.weight");
      low += vector ? t->numel() * 4 : static_cast<int64_t>(t->nbytes);
      if (!vector) {
        // The output features are padded to 32, and so are the input features of a BF16 weight
        // the BF16-product levels pair-interleave; which axis holds the outputs depends on the layout.
        const bool pairs = t->dtype == DType::kBF16 && cpu::Kernels().bf16_pairs;
        auto up = [](int64_t n) { return (n + 31) / 32 * 32; };
        auto extra = [&](int64_t out, int64_t in) { return up(out) * (pairs ? up(in) : in) - out * in; };
        padding += std::max(extra(t->shape[0], t->shape[1]), extra(t->shape[1], t->shape[0])) *
                   static_cast<int64_t>(DTypeSize(t->dtype));
      }
      if (name.ends_with("wte.weight")) wte_bytes = t->numel() * 4;
    }
    ASSERT_GT(wte_bytes, 0);
    // For the bundled models the bound also tells a second (F32) copy of wte from padding.
    if (dir.find("/models/") != std::string::npos && dir.find("/tests/") == std::string::npos) {
      ASSERT_LT(padding, wte_bytes);
    }
    auto model = LoadModel(dir, b->get(), {.max_tokens = 16, .max_seqs = 2, .max_logit_rows = 16});
    ASSERT_TRUE(model.ok()) << model.status();
    EXPECT_GE((*model)->weight_bytes(), low);
    EXPECT_LE((*model)->weight_bytes(), low + padding);
    EXPECT_GT((*model)->activation_bytes(), 0);
  }
}

// Greedy decoding on the bundled (trained, BF16) models, whose "auto" KV cache is BF16: the
// 16-bit caches follow the F32 cache's greedy choice over the whole 256-token context when fed
// the F32 run's tokens (teacher forcing), and the free-running sequences are reported.
TEST(KvCacheDType, GreedyDecodingOnTheBundledModelsFollowsTheF32Cache) {
  for (const char* model : {"gpt2-kjv", "kraken-kjv-4way"}) {
    const std::string dir = testing::SourceDir() + "/models/" + model;
    // Greedy continuation of a fixed 8-token prompt, with the cache of `dtype`: the tokens, and
    // for `forced` (teacher forcing) the argmax at each position of that sequence instead.
    auto run = [&](DType dtype, const std::vector<int32_t>* forced) {
      Fixture f = Load(dir, 256, 16, 16, 0, dtype);
      EXPECT_NE(f.model, nullptr);
      const int n = f.model->config().n_positions, V = f.model->config().vocab_size;
      std::vector<int32_t> seq = {40, 120, 33, 101, 7, 64, 90, 12}, argmax;
      const std::vector<int32_t> table = Iota(16);
      int pos = 0;
      std::vector<int32_t> step(seq);
      while (pos + static_cast<int>(step.size()) <= n) {
        SequenceInput s{.tokens = step, .start_pos = pos, .block_table = table};
        auto r = f.model->Forward({.seqs = {&s, 1}}, *f.kv, f.comm);
        EXPECT_TRUE(r.ok()) << r.status();
        if (!r.ok()) break;
        pos += static_cast<int>(step.size());
        const int next = static_cast<int>(std::max_element(r->logits, r->logits + V) - r->logits);
        argmax.push_back(next);
        if (pos == n) break;
        const int32_t fed = forced != nullptr ? (*forced)[pos] : next;
        if (forced == nullptr) seq.push_back(next);
        step = {fed};
      }
      return forced != nullptr ? argmax : seq;
    };
    const std::vector<int32_t> f32 = run(DType::kF32, nullptr);
    ASSERT_EQ(f32.size(), 256u);
    std::vector<int32_t> want_argmax(f32.begin() + 8, f32.end());
    for (const DType dtype : {DType::kBF16, DType::kF16}) {
      SCOPED_TRACE(StrCat(model, " KV ", DTypeName(dtype)));
      const std::vector<int32_t> forced = run(dtype, &f32);
      ASSERT_EQ(forced.size(), 249u);  // argmax after the prompt, then after each of 248 tokens
      int same = 0;
      for (size_t i = 0; i + 1 < forced.size(); ++i) same += forced[i] == want_argmax[i];
      const std::vector<int32_t> free = run(dtype, nullptr);
      size_t prefix = 0;
      while (prefix < free.size() && free[prefix] == f32[prefix]) ++prefix;
      std::printf(
          "[ %s ] KV %s: greedy choice same as F32 at %d/248 forced positions; free run identical for "
          "%zu/256 tokens\n",
          model, std::string(DTypeName(dtype)).c_str(), same, prefix);
      EXPECT_GE(same, 244) << "over 98% of greedy choices must match the F32 cache's";
    }
  }
}

// "auto" is the checkpoint's own dtype; a directory without weights falls back to what its
// config.json declares, then to F32.
TEST(KvCacheDType, WeightDTypeIsTheEmbeddingsStoredDType) {
  auto dtype = [](const std::string& dir) {
    auto d = WeightDType(dir);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? *d : DType::kU8;
  };
  EXPECT_EQ(dtype(testing::SourceDir() + "/models/gpt2-kjv"), DType::kBF16);
  EXPECT_EQ(dtype(testing::TestModelDir("gpt2-f32")), DType::kF32);
  EXPECT_EQ(dtype(testing::TestModelDir("parallel-block-f16-sharded")), DType::kF16);
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "config-only-model";
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(testing::SourceDir() + "/models/gpt2-kjv/config.json", dir / "config.json",
                             std::filesystem::copy_options::overwrite_existing);
  EXPECT_EQ(dtype(dir.string()), DType::kBF16);  // its "torch_dtype": "bfloat16"
  std::filesystem::copy_file(testing::TestModelDir("gpt2-f32") + "/config.json", dir / "config.json",
                             std::filesystem::copy_options::overwrite_existing);
  EXPECT_EQ(dtype(dir.string()), DType::kF32);  // "dtype": "float32"
  EXPECT_TRUE(absl::IsNotFound(WeightDType(dir.string() + "/absent").status()));
}

// A 16-bit pool: each slot's K and V take block_elems * num_blocks 2-byte entries, back to back;
// a write to one slot rounds into exactly its bytes and leaves the others alone.
TEST(KvCacheDType, SlotsOfA16BitPoolAreSizedByTheDTypeAndDisjoint) {
  auto b = CreateBackend({.device = Device::Cpu(), .threads = 1});
  ASSERT_TRUE(b.ok());
  const KvLayout layout{.slots = 3, .heads = 2, .head_dim = 5};
  auto kv = KvCache::Create(**b, layout, {.num_blocks = 4, .block_size = 3, .dtype = DType::kBF16});
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ(kv->bytes(), 2 * 3 * 2 * 5 * 3 * 4 * 2);
  EXPECT_EQ(KvCache::BytesPerBlock(layout, 3, DType::kF16), 2 * 3 * 2 * 5 * 3 * 2);
  EXPECT_EQ(KvCache::BytesPerBlock(layout, 3, DType::kF32), 2 * 3 * 2 * 5 * 3 * 4);
  const int64_t slot_bytes = 2 * 5 * 3 * 4 * 2;  // heads * head_dim * block_size * blocks * 2 B
  const auto* k0 = static_cast<const uint8_t*>(kv->slot(0).k);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(kv->slot(i).dtype, DType::kBF16);
    EXPECT_EQ(static_cast<const uint8_t*>(kv->slot(i).k), k0 + i * slot_bytes);
  }
  // Token 0 of a sequence whose only block is physical block 2, written into slot 1.
  std::vector<float> k(10), v(10);
  for (int e = 0; e < 10; ++e) k[e] = 1.f + e / 1024.f, v[e] = -3.f - e / 512.f;
  const int32_t table[] = {2};
  const AttentionSeq seq{0, 1, 0, table};
  (*b)->WriteKv(Mat(k.data(), 1, 10), Mat(v.data(), 1, 10), kv->slot(1), {{&seq, 1}, 3});
  const auto* kb = static_cast<const uint16_t*>(kv->slot(0).k);
  const auto* vb = static_cast<const uint16_t*>(kv->slot(0).v);
  const int64_t per_slot = slot_bytes / 2, block = 2 * 5 * 3;
  for (int64_t i = 0; i < 3 * per_slot; ++i) {
    const int64_t in_slot = i % per_slot, slot = i / per_slot;
    const bool written = slot == 1 && in_slot / block == 2;
    uint16_t want_k = 0, want_v = 0;
    if (written) {
      const int64_t o = in_slot % block;  // K: [heads][head_dim][block_size], V: [heads][block_size][head_dim]
      const int h = static_cast<int>(o / 15), kd = static_cast<int>(o % 15 / 3), kt = static_cast<int>(o % 3);
      const int vt = static_cast<int>(o % 15 / 5), vd = static_cast<int>(o % 5);
      want_k = kt == 0 ? F32ToBf16(k[h * 5 + kd]) : 0;
      want_v = vt == 0 ? F32ToBf16(v[h * 5 + vd]) : 0;
    }
    ASSERT_EQ(kb[i], want_k) << "K entry " << i;
    ASSERT_EQ(vb[i], want_v) << "V entry " << i;
  }
}

}  // namespace
}  // namespace kraken::engine
