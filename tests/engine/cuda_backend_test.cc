// The CUDA backend against the CPU backend, op by op and model by model (label gpu: every test
// skips when no CUDA device is usable). Tolerances follow from the arithmetic:
//   - copies (Embed, Copy, GatherRows, WriteKv) must be bit-identical;
//   - F32 ops differ only in summation order and libm: 2e-6 relative to the row's magnitude;
//   - BF16 / F16 GEMMs round the activations to the weights' type before cuBLAS multiplies them
//     with F32 accumulation, so |gpu - cpu| <= u * sum_k |x_k w_k| + (F32 accumulation) with
//     u = 2^-8 for BF16 (8-bit significand: unit roundoff 2^-8) and 2^-10 for F16 (unit roundoff
//     2^-11, doubled); the F32 accumulation term (~k 2^-24) is far below the slack.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "engine/backend.h"
#include "engine/comm/nccl_communicator.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "tests/engine/test_util.h"

namespace kraken::engine {
namespace {

bool HaveDevice() {
  static const bool have = CudaDeviceCount().ok();
  return have;
}
#define REQUIRE_GPU() \
  if (!HaveDevice()) GTEST_SKIP() << "no usable CUDA device"

struct Backends {
  std::unique_ptr<Backend> cpu, gpu;
};

Backends MakeOrNull() {
  Backends b;
  auto c = CreateBackend({.device = Device::Cpu(), .threads = 0});
  auto g = CreateBackend({.device = Device::Cuda(0)});
  EXPECT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(g.ok()) << g.status();
  if (c.ok()) b.cpu = std::move(c).value();
  if (g.ok()) b.gpu = std::move(g).value();
  return b;
}
#define MAKE_BACKENDS(b)     \
  Backends b = MakeOrNull(); \
  ASSERT_TRUE(b.cpu != nullptr && b.gpu != nullptr)

// A matrix held by both backends with the same contents.
struct Twin {
  Buffer c, g;
  int rows = 0, cols = 0;
  int64_t stride = 0;
  Mat C() const { return Mat(c.data(), rows, cols, stride); }
  Mat G() const { return Mat(g.data(), rows, cols, stride); }
};

Twin MakeTwin(Backends& b, int rows, int cols, int64_t stride, std::mt19937& rng, float scale = 1.f) {
  Twin t;
  t.rows = rows;
  t.cols = cols;
  t.stride = stride;
  const int64_t n = std::max<int64_t>(1, rows * stride);
  t.c = std::move(b.cpu->Allocate(n)).value();
  t.g = std::move(b.gpu->Allocate(n)).value();
  std::normal_distribution<float> nd(0.f, scale);
  for (int64_t i = 0; i < n; ++i) t.c.data()[i] = nd(rng);
  b.gpu->Upload(t.c.data(), t.g.data(), n);
  return t;
}

// The GPU copy of `m` ([rows, cols] at stride) as a dense host vector.
std::vector<float> Read(Backend& gpu, const Twin& t) {
  std::vector<float> all(std::max<int64_t>(1, t.rows * t.stride)), out;
  EXPECT_TRUE(gpu.Synchronize().ok());
  gpu.Download(t.g.data(), all.data(), static_cast<int64_t>(all.size()));
  for (int r = 0; r < t.rows; ++r)
    out.insert(out.end(), all.begin() + r * t.stride, all.begin() + r * t.stride + t.cols);
  return out;
}
std::vector<float> Dense(const Twin& t) {
  std::vector<float> out;
  for (int r = 0; r < t.rows; ++r) out.insert(out.end(), t.c.data() + r * t.stride, t.c.data() + r * t.stride + t.cols);
  return out;
}

TEST(CudaOps, RowKernelsMatchTheCpu) {
  REQUIRE_GPU();
  MAKE_BACKENDS(b);
  std::mt19937 rng(testing::TestSeed());
  for (int cols : {1, 31, 160, 257, 1000}) {
    SCOPED_TRACE(cols);
    const int rows = 7;
    Twin x = MakeTwin(b, rows, cols, cols + 3, rng, 2.f), y = MakeTwin(b, rows, cols, cols, rng);
    Twin w = MakeTwin(b, 1, cols, cols, rng), bias = MakeTwin(b, 1, cols, cols, rng);
    for (const float* pb : std::vector<const float*>{nullptr, bias.c.data()}) {
      const float* gb = pb == nullptr ? nullptr : bias.g.data();
      b.cpu->LayerNorm(x.C(), w.c.data(), pb, 1e-5f, y.C());
      b.gpu->LayerNorm(x.G(), w.g.data(), gb, 1e-5f, y.G());
      testing::ExpectWithinRel(Read(*b.gpu, y), Dense(y), 2e-6, "LayerNorm");
    }
    b.cpu->LayerNorm(x.C(), w.c.data(), bias.c.data(), 1e-5f, x.C());  // in place
    b.gpu->LayerNorm(x.G(), w.g.data(), bias.g.data(), 1e-5f, x.G());
    testing::ExpectWithinRel(Read(*b.gpu, x), Dense(x), 2e-6, "LayerNorm in place");
    b.cpu->GeluTanh(x.C());
    b.gpu->GeluTanh(x.G());
    testing::ExpectWithinRel(Read(*b.gpu, x), Dense(x), 2e-6, "GeluTanh");
    b.cpu->Add(x.C(), y.C(), x.C());
    b.gpu->Add(x.G(), y.G(), x.G());
    testing::ExpectWithinRel(Read(*b.gpu, x), Dense(x), 1e-7, "Add");
    b.cpu->Copy(x.C(), y.C());
    b.gpu->Copy(x.G(), y.G());
    EXPECT_EQ(Read(*b.gpu, y), Dense(y)) << "Copy";
    const int32_t rows_idx[] = {6, 0, 3, 3};
    Twin g = MakeTwin(b, 4, cols, cols + 1, rng);
    b.cpu->GatherRows(x.C(), rows_idx, g.C());
    b.gpu->GatherRows(x.G(), rows_idx, g.G());
    EXPECT_EQ(Read(*b.gpu, g), Dense(g)) << "GatherRows";
  }
  // Embed: token and position rows summed.
  const int V = 50, P = 40, d = 33;
  Twin wte = MakeTwin(b, V, d, d, rng), wpe = MakeTwin(b, P, d, d, rng), out = MakeTwin(b, 5, d, d + 2, rng);
  const int32_t tokens[] = {0, 49, 7, 7, 13}, positions[] = {0, 1, 39, 2, 20};
  const std::vector<float> table = Dense(wte);
  TensorInfo info{.name = "wte",
                  .dtype = DType::kF32,
                  .shape = {V, d},
                  .data = reinterpret_cast<const uint8_t*>(table.data()),
                  .nbytes = table.size() * sizeof(float)};
  auto cpu_table = b.cpu->PrepareLinear({.tensor = &info});
  auto gpu_table = b.gpu->PrepareLinear({.tensor = &info});
  ASSERT_TRUE(cpu_table.ok() && gpu_table.ok());
  b.cpu->Embed(tokens, positions, **cpu_table, wpe.c.data(), out.C());
  b.gpu->Embed(tokens, positions, **gpu_table, wpe.g.data(), out.G());
  EXPECT_EQ(Read(*b.gpu, out), Dense(out)) << "Embed";
  EXPECT_TRUE(b.gpu->Synchronize().ok());
}

uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (finite inputs)
  return static_cast<uint16_t>(u >> 16);
}
uint16_t ToF16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

struct LinearCase {
  DType dtype;
  bool in_major;
  std::vector<std::pair<int, int>> out_ranges;
  int in_begin, in_count;
  bool bias, accumulate;
};

TEST(CudaOps, LinearMatchesTheCpuWithinTheRoundingOfItsInputs) {
  REQUIRE_GPU();
  MAKE_BACKENDS(b);
  std::mt19937 rng(testing::TestSeed() + 1);
  const int rows_total = 96, cols_total = 80;  // stored tensor [96, 80] (or [80, 96] in-major)
  const std::vector<LinearCase> cases = {
      {DType::kF32, false, {}, 0, -1, false, false}, {DType::kF32, true, {{3, 10}, {50, 7}}, 5, 60, true, false},
      {DType::kBF16, false, {}, 0, -1, true, true},  {DType::kBF16, false, {{0, 32}, {64, 32}}, 16, 48, false, true},
      {DType::kF16, true, {}, 0, -1, true, false},   {DType::kF16, false, {{90, 6}}, 1, 79, false, false},
  };
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const LinearCase& lc = cases[ci];
    SCOPED_TRACE(ci);
    // The stored tensor and its F32 values.
    const int64_t s0 = lc.in_major ? cols_total : rows_total, s1 = lc.in_major ? rows_total : cols_total;
    std::normal_distribution<float> nd(0.f, 0.5f);
    std::vector<float> vals(s0 * s1);
    std::vector<uint8_t> bytes(s0 * s1 * DTypeSize(lc.dtype));
    for (int64_t i = 0; i < s0 * s1; ++i) {
      float v = nd(rng);
      if (lc.dtype == DType::kBF16) {
        const uint16_t h = ToBf16(v);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
        v = Bf16ToF32(h);
      } else if (lc.dtype == DType::kF16) {
        const uint16_t h = ToF16(v);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
        v = F16ToF32(h);
      } else {
        std::memcpy(bytes.data() + 4 * i, &v, 4);
      }
      vals[i] = v;
    }
    TensorInfo t{.name = "w", .dtype = lc.dtype, .shape = {s0, s1}, .data = bytes.data(), .nbytes = bytes.size()};
    LinearSource src{.tensor = &t, .in_major = lc.in_major, .in_begin = lc.in_begin, .in_count = lc.in_count};
    for (auto [a, n] : lc.out_ranges) src.out_ranges.emplace_back(a, n);
    auto wc = b.cpu->PrepareLinear(src);
    auto wg = b.gpu->PrepareLinear(src);
    ASSERT_TRUE(wc.ok() && wg.ok()) << wc.status() << wg.status();
    const int in = (*wg)->in_features(), out = (*wg)->out_features();
    ASSERT_EQ(in, (*wc)->in_features());
    ASSERT_EQ(out, (*wc)->out_features());
    const int T = 37;
    Twin x = MakeTwin(b, T, in, in + 5, rng), y = MakeTwin(b, T, out, out + 2, rng);
    Twin bias = MakeTwin(b, 1, out, out, rng);
    const std::vector<float> y0 = Dense(y);
    b.cpu->Linear(x.C(), **wc, lc.bias ? bias.c.data() : nullptr, y.C(), lc.accumulate);
    b.gpu->Linear(x.G(), **wg, lc.bias ? bias.g.data() : nullptr, y.G(), lc.accumulate);
    const std::vector<float> got = Read(*b.gpu, y), want = Dense(y);
    // Per-element bound from sum |x_k w_k| of the logical W [out, in].
    std::vector<int> out_rows;
    if (lc.out_ranges.empty()) {
      for (int r = 0; r < (lc.in_major ? s1 : s0); ++r) out_rows.push_back(r);
    } else {
      for (auto [a, n] : lc.out_ranges)
        for (int r = a; r < a + n; ++r) out_rows.push_back(r);
    }
    const int64_t in_total = lc.in_major ? s0 : s1, out_total = lc.in_major ? s1 : s0;
    const double u = lc.dtype == DType::kBF16  ? std::ldexp(1.0, -8)
                     : lc.dtype == DType::kF16 ? std::ldexp(1.0, -10)
                                               : 2e-6;
    int bad = 0;
    for (int r = 0; r < T; ++r) {
      for (int o = 0; o < out; ++o) {
        double mag = 0;
        for (int k = 0; k < in; ++k) {
          const int64_t c = lc.in_begin + k, orow = out_rows[o];
          const float w = lc.in_major ? vals[c * out_total + orow] : vals[orow * in_total + c];
          mag += std::fabs(static_cast<double>(x.c.data()[r * x.stride + k]) * w);
        }
        const double tol = u * mag + 1e-6 * (1 + std::fabs(y0[r * out + o]));
        if (std::fabs(got[r * out + o] - want[r * out + o]) > tol && ++bad <= 3) {
          ADD_FAILURE() << "row " << r << " col " << o << ": gpu " << got[r * out + o] << " cpu " << want[r * out + o]
                        << " tolerance " << tol;
        }
      }
    }
    EXPECT_EQ(bad, 0);
  }
}

struct AttnCase {
  int heads, head_dim, block_size;
};

// The KV cache's bytes on the GPU (slot 0 starts the pool; a 16-bit pool is padded to whole floats).
std::vector<uint8_t> CacheBytes(Backend& gpu, const void* device, size_t bytes) {
  std::vector<float> host((bytes + 3) / 4);
  gpu.Download(static_cast<const float*>(device), host.data(), static_cast<int64_t>(host.size()));
  std::vector<uint8_t> out(bytes);
  std::memcpy(out.data(), host.data(), bytes);
  return out;
}

class CudaOpsKv : public ::testing::TestWithParam<DType> {};

TEST_P(CudaOpsKv, PagedWriteKvAndAttentionMatchTheCpu) {
  REQUIRE_GPU();
  MAKE_BACKENDS(b);
  std::mt19937 rng(testing::TestSeed() + 2);
  const DType dtype = GetParam();
  for (const AttnCase ac : {AttnCase{1, 1, 1}, AttnCase{2, 3, 5}, AttnCase{3, 17, 16}, AttnCase{2, 64, 16},
                            AttnCase{1, 113, 7}, AttnCase{4, 160, 16}, AttnCase{1, 256, 32}}) {
    SCOPED_TRACE(::testing::Message() << ac.heads << " heads x " << ac.head_dim << ", block " << ac.block_size);
    const int width = ac.heads * ac.head_dim, bs = ac.block_size;
    const KvLayout layout{.slots = 1, .heads = ac.heads, .head_dim = ac.head_dim};
    const int blocks = 3 * (300 / bs + 2);
    auto kvc = KvCache::Create(*b.cpu, layout, {.num_blocks = blocks, .block_size = bs, .dtype = dtype});
    auto kvg = KvCache::Create(*b.gpu, layout, {.num_blocks = blocks, .block_size = bs, .dtype = dtype});
    ASSERT_TRUE(kvc.ok() && kvg.ok());
    // Three sequences with shuffled, disjoint block tables.
    std::vector<int32_t> ids(blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    const int per = blocks / 3;
    std::vector<std::vector<int32_t>> tables = {{ids.begin(), ids.begin() + per},
                                                {ids.begin() + per, ids.begin() + 2 * per},
                                                {ids.begin() + 2 * per, ids.begin() + 3 * per}};
    // Step 1 fills history (A: nothing, B: 20 tokens, C: 130); step 2 adds A: 37 prefill,
    // B: a 5-token chunk, C: one decode token.
    const int hist[3] = {0, 20, 130}, add[3] = {37, 5, 1};
    for (int step = 0; step < 2; ++step) {
      std::vector<AttentionSeq> seqs;
      int T = 0;
      for (int s = 0; s < 3; ++s) {
        const int n = step == 0 ? hist[s] : add[s];
        if (n == 0) continue;
        seqs.push_back({T, n, step == 0 ? 0 : hist[s], tables[s].data()});
        T += n;
      }
      const AttentionBatch batch{seqs, bs};
      Twin k = MakeTwin(b, T, width, 3 * width, rng), v = MakeTwin(b, T, width, 3 * width, rng);
      Twin q = MakeTwin(b, T, width, width + 1, rng), out = MakeTwin(b, T, width, width, rng);
      b.cpu->WriteKv(k.C(), v.C(), kvc->slot(0), batch);
      b.gpu->WriteKv(k.G(), v.G(), kvg->slot(0), batch);
      const float scale = 1.f / std::sqrt(static_cast<float>(ac.head_dim));
      b.cpu->Attention(q.C(), kvc->slot(0), batch, scale, out.C());
      b.gpu->Attention(q.G(), kvg->slot(0), batch, scale, out.G());
      testing::ExpectWithinRel(Read(*b.gpu, out), Dense(out), 2e-6, "Attention");
    }
    // The caches hold the same bits (both round 16-bit entries to nearest even).
    const size_t bytes = kvc->slot(0).block_elems() * blocks * DTypeSize(dtype);
    EXPECT_EQ(0, std::memcmp(CacheBytes(*b.gpu, kvg->slot(0).k, bytes).data(), kvc->slot(0).k, bytes)) << "K cache";
    EXPECT_EQ(0, std::memcmp(CacheBytes(*b.gpu, kvg->slot(0).v, bytes).data(), kvc->slot(0).v, bytes)) << "V cache";
  }
  EXPECT_TRUE(b.gpu->Synchronize().ok());
}

INSTANTIATE_TEST_SUITE_P(KvDTypes, CudaOpsKv, ::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                         [](const auto& p) { return std::string(DTypeName(p.param)); });

TEST(CudaOps, AttentionFollowsTokenBeginAndLeavesUnnamedRowsAlone) {
  REQUIRE_GPU();
  MAKE_BACKENDS(b);
  std::mt19937 rng(testing::TestSeed() + 3);
  const int heads = 2, head_dim = 24, bs = 4, width = heads * head_dim;
  const KvLayout layout{.slots = 1, .heads = heads, .head_dim = head_dim};
  auto kvc = KvCache::Create(*b.cpu, layout, {.num_blocks = 16, .block_size = bs});
  auto kvg = KvCache::Create(*b.gpu, layout, {.num_blocks = 16, .block_size = bs});
  ASSERT_TRUE(kvc.ok() && kvg.ok());
  const std::vector<int32_t> ta = {9, 2, 5}, tb = {0, 14, 7, 3};
  // Rows 0-1: none; rows 2-6: sequence B (5 tokens from position 0); rows 7-9: sequence A (3 tokens
  // from position 0); row 10: none. The sequences are listed A first.
  const std::vector<AttentionSeq> seqs = {{7, 3, 0, ta.data()}, {2, 5, 0, tb.data()}};
  const AttentionBatch batch{seqs, bs};
  const int T = 11;
  Twin k = MakeTwin(b, T, width, width, rng), v = MakeTwin(b, T, width, width, rng);
  Twin q = MakeTwin(b, T, width, width, rng), out = MakeTwin(b, T, width, width, rng);
  b.cpu->WriteKv(k.C(), v.C(), kvc->slot(0), batch);
  b.gpu->WriteKv(k.G(), v.G(), kvg->slot(0), batch);
  b.cpu->Attention(q.C(), kvc->slot(0), batch, 0.2f, out.C());
  b.gpu->Attention(q.G(), kvg->slot(0), batch, 0.2f, out.G());
  const std::vector<float> got = Read(*b.gpu, out), want = Dense(out);
  testing::ExpectWithinRel(got, want, 2e-6, "Attention with rows out of sequence order");
  for (int r : {0, 1, 10}) {  // untouched: still the random values both twins started with
    EXPECT_EQ(0, std::memcmp(got.data() + r * width, want.data() + r * width, width * sizeof(float))) << "row " << r;
  }
  const size_t bytes = kvc->slot(0).block_elems() * 16 * sizeof(float);
  EXPECT_EQ(0, std::memcmp(CacheBytes(*b.gpu, kvg->slot(0).k, bytes).data(), kvc->slot(0).k, bytes)) << "K cache";
}

// ---- Whole models ---------------------------------------------------------------------------

struct Loaded {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<KvCache> kv;
};

Loaded LoadOn(const std::string& device, const std::string& name) {
  Loaded r;
  auto d = Device::Parse(device);
  EXPECT_TRUE(d.ok()) << d.status();
  auto b = CreateBackend({.device = *d});
  EXPECT_TRUE(b.ok()) << b.status();
  r.backend = std::move(b).value();
  auto m =
      LoadModel(testing::TestModelDir(name), r.backend.get(), {.max_tokens = 64, .max_seqs = 8, .max_logit_rows = 64});
  EXPECT_TRUE(m.ok()) << m.status();
  r.model = std::move(m).value();
  auto kv = KvCache::Create(*r.backend, r.model->kv_layout(), {.num_blocks = 64, .block_size = 16});
  EXPECT_TRUE(kv.ok()) << kv.status();
  r.kv = std::make_unique<KvCache>(std::move(kv).value());
  return r;
}

// All logits of `tokens`, fed in chunks of `chunk`.
std::vector<float> Logits(Loaded& r, Communicator& comm, const std::vector<int32_t>& tokens, int chunk) {
  const int V = r.model->config().vocab_size;
  const std::vector<int32_t> table = {3, 0, 2, 1};
  std::vector<float> out;
  for (size_t begin = 0; begin < tokens.size(); begin += chunk) {
    const size_t n = std::min<size_t>(chunk, tokens.size() - begin);
    SequenceInput s{.tokens = {tokens.data() + begin, n},
                    .start_pos = static_cast<int32_t>(begin),
                    .block_table = table,
                    .all_logits = true};
    auto res = r.model->Forward({.seqs = {&s, 1}}, *r.kv, comm);
    EXPECT_TRUE(res.ok()) << res.status();
    if (!res.ok()) return {};
    out.insert(out.end(), res->logits, res->logits + n * V);
  }
  return out;
}

class CudaModel : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaModel, LogitsMatchTheReferencePrefilledChunkedAndDecoded) {
  REQUIRE_GPU();
  const std::string name = GetParam();
  testing::Golden g(testing::TestModelDir(name));
  ASSERT_TRUE(g.ok());
  const std::vector<int32_t> tokens = g.Ints("tokens");
  const std::vector<float> want = g.Floats("logits");
  Loaded gpu = LoadOn("cuda:0", name);
  ASSERT_NE(gpu.model, nullptr);
  LocalCommunicator local;
  // 16-bit weights mean 16-bit GEMM inputs on the GPU: a looser bound than the CPU's 1e-4.
  const bool f32 = name.find("f32") != std::string::npos;
  const double tol = f32 ? 2e-4 : 3e-2;
  const std::vector<float> whole = Logits(gpu, local, tokens, static_cast<int>(tokens.size()));
  ASSERT_EQ(whole.size(), want.size());
  const auto d = testing::Compare(whole.data(), want.data(), want.size());
  EXPECT_LE(d.max_abs, tol * d.max_ref) << "vs reference";
  std::printf("[ %s ] cuda vs reference: max |diff| %.3g, max |logit| %.3g\n", name.c_str(), d.max_abs, d.max_ref);
  for (int chunk : {5, 1}) {
    const std::vector<float> c = Logits(gpu, local, tokens, chunk);
    ASSERT_EQ(c.size(), whole.size());
    const auto cd = testing::Compare(c.data(), whole.data(), whole.size());
    EXPECT_LE(cd.max_abs, (f32 ? 1e-5 : 5e-3) * cd.max_ref) << "chunk " << chunk << " vs whole prompt";
  }
}

INSTANTIATE_TEST_SUITE_P(TestModels, CudaModel, ::testing::ValuesIn(testing::kTestModels), testing::TestModelParamName);

TEST(CudaNccl, WorldOfOneThroughNcclGivesTheSameBitsAndTimesEveryCollective) {
  REQUIRE_GPU();
  const std::string name = "kraken-n4-bf16";
  Loaded a = LoadOn("cuda:0", name), b = LoadOn("cuda:0", name);
  ASSERT_NE(a.model, nullptr);
  ASSERT_NE(b.model, nullptr);
  LocalCommunicator local;
  NcclOptions options;
  options.compute_stream = b.backend->native_stream();  // rank 0 of 1 on device 0
  auto nccl = NcclCommunicator::Create(options);
  ASSERT_TRUE(nccl.ok()) << nccl.status();
  const std::vector<int32_t> tokens = {5, 9, 1, 33, 2, 7, 100, 4};
  const std::vector<float> x = Logits(a, local, tokens, 8), y = Logits(b, **nccl, tokens, 8);
  ASSERT_EQ(x.size(), y.size());
  EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float))) << "a sum over one rank is the identity";
  DeviceCollectiveTiming t;
  ASSERT_TRUE((*nccl)->TakeDeviceTiming(&t));
  // Kraken: one AllReduce per layer boundary plus the conjunction's.
  EXPECT_EQ(t.count, static_cast<uint64_t>(b.model->config().n_layer));
  // (collective_ns may be 0 here: NCCL enqueues no kernel for an in-place sum over one rank.)
  EXPECT_TRUE((*nccl)->TakeDeviceTiming(&t));
  EXPECT_EQ(t.count, 0u) << "taken timing is not reported twice";
}

}  // namespace
}  // namespace kraken::engine
