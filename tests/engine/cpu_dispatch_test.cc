// The CPU kernels' instruction-set levels (engine/cpu/kernels.h): which level is chosen for a
// CPU and a KRAKEN_CPU_ISA cap, and that every level this CPU can run gives the same bits.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/cpu/kernels.h"
#include "tests/engine/test_util.h"

namespace kraken::engine::cpu {
namespace {

// A CPU with exactly the features in `g_features`.
std::set<std::string> g_features;
bool FakeCpu(const char* f) {
  return g_features.count(f) > 0;
}

const std::set<std::string> kZen3 = {"avx2", "fma", "f16c", "bmi2"};
const std::set<std::string> kZen4 = {"avx2",     "fma",      "f16c",     "bmi2",     "avx512f",
                                     "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512bf16"};
const std::set<std::string> kSapphireRapids = {"avx2",     "fma",      "f16c",     "bmi2",       "avx512f", "avx512bw",
                                               "avx512dq", "avx512vl", "avx512cd", "avx512bf16", "amx"};

#if defined(__x86_64__)
TEST(CpuDispatch, BuildsAmxAvx512Bf16Avx512AndAvx2Levels) {
  EXPECT_EQ(BuiltCpuIsas(), (std::vector<std::string>{"amx", "avx512bf16", "avx512", "avx2"}));
}

TEST(CpuDispatch, ReadsThisCpusFeatures) {
  // This binary is built for x86-64-v3 and checks that at start: the AVX2 level's features are here.
  for (const char* f : {"avx2", "fma", "f16c", "bmi2"}) EXPECT_TRUE(CpuHasFeature(f)) << f;
  EXPECT_FALSE(CpuHasFeature("avx512vp2intersect"));  // a name the levels do not ask about
  const bool avx512 = CpuHasFeature("avx512f");
  EXPECT_EQ(avx512, __builtin_cpu_supports("avx512f") != 0);
  // Raw CPUID for the BF16 bit; the level also asks for avx512f, which covers the OS's AVX-512 state.
  if (avx512) {
    EXPECT_EQ(CpuHasFeature("avx512bf16"), __builtin_cpu_supports("avx512bf16") != 0);
  }
}

TEST(CpuDispatch, PicksTheBestLevelTheCpuHas) {
  g_features = kSapphireRapids;
  // amx and avx512bf16 change BF16 results (BF16 activations): never chosen unasked.
  EXPECT_STREQ((*SelectKernels(nullptr, &FakeCpu))->isa, "avx512");
  EXPECT_STREQ((*SelectKernels("", &FakeCpu))->isa, "avx512");
  g_features = kZen4;
  EXPECT_STREQ((*SelectKernels(nullptr, &FakeCpu))->isa, "avx512");
  g_features = kZen3;
  EXPECT_STREQ((*SelectKernels(nullptr, &FakeCpu))->isa, "avx2");
  // AVX-512 F without BW/DQ/VL (Knights Landing) is not the AVX-512 level.
  g_features = kZen3;
  g_features.insert({"avx512f", "avx512cd"});
  EXPECT_STREQ((*SelectKernels(nullptr, &FakeCpu))->isa, "avx2");
}

TEST(CpuDispatch, TheCapLowersTheLevelButNeverRaisesIt) {
  g_features = kSapphireRapids;
  EXPECT_STREQ((*SelectKernels("amx", &FakeCpu))->isa, "amx");
  EXPECT_STREQ((*SelectKernels("avx2", &FakeCpu))->isa, "avx2");
  EXPECT_STREQ((*SelectKernels("avx512", &FakeCpu))->isa, "avx512");
  EXPECT_STREQ((*SelectKernels("avx512bf16", &FakeCpu))->isa, "avx512bf16");
  // An AVX-512 CPU with BF16 dot products but no AMX (Zen 4, Zen 5), or an OS that does not grant
  // the tiles: amx asks for BF16 products, and the best level below with them runs.
  g_features = kZen4;
  EXPECT_STREQ((*SelectKernels("amx", &FakeCpu))->isa, "avx512bf16");
  EXPECT_STREQ((*SelectKernels("avx512bf16", &FakeCpu))->isa, "avx512bf16");
  g_features.erase("avx512bf16");  // Ice Lake, Zen 3 with AVX-512 masked off: the F32 levels only
  EXPECT_STREQ((*SelectKernels("amx", &FakeCpu))->isa, "avx512");
  EXPECT_STREQ((*SelectKernels("avx512bf16", &FakeCpu))->isa, "avx512");
  g_features = kZen3;
  EXPECT_STREQ((*SelectKernels("avx512", &FakeCpu))->isa, "avx2");
  EXPECT_STREQ((*SelectKernels("avx512bf16", &FakeCpu))->isa, "avx2");
  EXPECT_STREQ((*SelectKernels("amx", &FakeCpu))->isa, "avx2");
}

TEST(CpuDispatch, AnUnknownCapOrAnUnfitCpuIsRefusedByName) {
  g_features = kZen3;
  StatusOr<const KernelTable*> t = SelectKernels("avx512fp16", &FakeCpu);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().message(),
            "KRAKEN_CPU_ISA must be one of the levels this binary holds (amx, avx512bf16, avx512, avx2), got "
            "'avx512fp16'");
  g_features = {"avx2", "f16c", "bmi2"};  // no FMA
  t = SelectKernels(nullptr, &FakeCpu);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().message(),
            "this CPU has none of the kernel levels up to KRAKEN_CPU_ISA='avx512' (built: amx, avx512bf16, avx512, "
            "avx2)");
}
#endif

// What a node's Hello says its kernels compute (the leader compares it): "f32" on the F32 levels
// whatever the CPU, else the level and the CPU design.
TEST(CpuDispatch, KernelNumericsNameTheLevelAndCpuOnlyForBf16Products) {
  const std::string numerics = KernelNumerics();
  if (!Kernels().bf16_pairs) {
    EXPECT_EQ(numerics, "f32");
    return;
  }
  const std::string prefix = std::string(Kernels().isa) + " on ";
  ASSERT_EQ(numerics.substr(0, prefix.size()), prefix) << numerics;
  const bool vendor = numerics.find("on GenuineIntel family ") != std::string::npos ||
                      numerics.find("on AuthenticAMD family ") != std::string::npos;
  EXPECT_TRUE(vendor) << numerics;
  EXPECT_NE(numerics.find(" model "), std::string::npos) << numerics;
}

// The suite runs once per level in scripts/test.sh (KRAKEN_CPU_ISA=...): the active level must be
// the one asked for when this CPU has it.
TEST(CpuDispatch, TheActiveLevelFollowsKrakenCpuIsa) {
  const char* cap = std::getenv("KRAKEN_CPU_ISA");
  const StatusOr<const KernelTable*> want = SelectKernels(cap, &CpuHasFeature);
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_STREQ(Kernels().isa, (*want)->isa);
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) {
    EXPECT_STREQ(Kernels().isa, "avx2");  // every x86-64-v3 CPU has it
  }
}

// Everything the levels compute, on one level's table: every GEMM dtype with bias and
// accumulation, LayerNorm, GELU, the embedding, and attention over F32 and BF16 KV caches.
std::vector<float> RunAll(const KernelTable& kt) {
  omp_set_num_threads(2);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> out;
  const int m = 23, n = 77, k = 131;
  std::vector<float> x(m * k), y(m * n), bias(n);
  for (float& v : x) v = nd(rng);
  for (float& v : bias) v = nd(rng);
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::vector<uint16_t> half(n * k);
    std::vector<float> full(n * k);
    for (int i = 0; i < n * k; ++i) {
      full[i] = nd(rng);
      half[i] = t == DType::kBF16 ? F32ToBf16(full[i]) : F32ToF16(full[i]);
    }
    MatrixSource src{.data = t == DType::kF32 ? reinterpret_cast<const uint8_t*>(full.data())
                                              : reinterpret_cast<const uint8_t*>(half.data()),
                     .dtype = t,
                     .out_stride = k,
                     .in_stride = 1,
                     .in = k};
    src.rows.resize(n);
    std::iota(src.rows.begin(), src.rows.end(), 0);
    PackedMatrix w = std::move(PackedMatrix::Pack(src, kt.bf16_pairs)).value();
    std::vector<float> packed_a(kt.gemm_scratch_floats(m, k));
    std::fill(y.begin(), y.end(), 0.5f);
    kt.gemm(x.data(), m, k, w, bias.data(), y.data(), n, /*accumulate=*/true, packed_a.data());
    out.insert(out.end(), y.begin(), y.end());
    // The embedding reads the same packed layout: rows of W as token vectors.
    std::vector<int32_t> tokens = {3, 0, 76, 3}, positions = {0, 1, 2, 3};
    std::vector<float> wpe(4 * k), e(4 * k);
    for (float& v : wpe) v = nd(rng);
    kt.embed(tokens.data(), positions.data(), w, wpe.data(), Mat(e.data(), 4, k));
    out.insert(out.end(), e.begin(), e.end());
  }
  std::vector<float> g(m * k), b(k), ln(m * k);
  for (float& v : g) v = nd(rng);
  for (float& v : b) v = nd(rng);
  kt.layer_norm(Mat(x.data(), m, k), g.data(), b.data(), 1e-5f, Mat(ln.data(), m, k));
  out.insert(out.end(), ln.begin(), ln.end());
  std::vector<float> gelu(x);
  for (float& v : gelu) v *= 4.f;  // reach tanh's saturated range too
  kt.gelu_tanh(Mat(gelu.data(), m, k));
  out.insert(out.end(), gelu.begin(), gelu.end());
  for (DType kv : {DType::kF32, DType::kBF16}) {
    const int heads = 2, dh = 45, T = 37, bs = 16, w = heads * dh;
    std::vector<float> q(T * w), kk(T * w), vv(T * w), o(T * w);
    for (auto* a : {&q, &kk, &vv})
      for (float& v : *a) v = nd(rng);
    std::vector<int32_t> table = {2, 0, 1};
    KvSlot slot{.dtype = kv, .heads = heads, .head_dim = dh, .block_size = bs, .num_blocks = 3};
    std::vector<uint8_t> kpool(slot.block_elems() * 3 * DTypeSize(kv)), vpool(kpool.size());
    slot.k = kpool.data();
    slot.v = vpool.data();
    AttentionSeq s{0, T, 0, table.data()};
    AttentionBatch batch{{&s, 1}, bs};
    AttentionScratch scratch;
    kt.write_kv(Mat(kk.data(), T, w), Mat(vv.data(), T, w), slot, batch);
    kt.attention(Mat(q.data(), T, w), slot, batch, 0.15f, Mat(o.data(), T, w), &scratch);
    out.insert(out.end(), o.begin(), o.end());
  }
  return out;
}

// The built levels this CPU runs, best first.
std::vector<const KernelTable*> RunnableLevels() {
  std::vector<const KernelTable*> runnable;
  for (const std::string& isa : BuiltCpuIsas()) {
    StatusOr<const KernelTable*> t = SelectKernels(isa.c_str(), &CpuHasFeature);
    if (t.ok() && isa == (*t)->isa) runnable.push_back(*t);
  }
  return runnable;
}

// The levels with BF16 products (amx, avx512bf16: BF16 activations in BF16-weight GEMMs) are
// compared by their own tests below.
TEST(CpuDispatch, EveryLevelThisCpuRunsGivesTheSameBits) {
  std::vector<const KernelTable*> runnable = RunnableLevels();
  std::erase_if(runnable, [](const KernelTable* t) { return t->bf16_pairs; });
  ASSERT_FALSE(runnable.empty());
  const std::vector<float> first = RunAll(*runnable[0]);
  for (float v : first) ASSERT_TRUE(std::isfinite(v));
  for (size_t i = 1; i < runnable.size(); ++i) {
    const std::vector<float> other = RunAll(*runnable[i]);
    ASSERT_EQ(first.size(), other.size());
    for (size_t j = 0; j < first.size(); ++j) {
      ASSERT_EQ(std::memcmp(&first[j], &other[j], 4), 0)
          << runnable[0]->isa << " and " << runnable[i]->isa << " differ at output " << j << ": " << first[j] << " vs "
          << other[j];
    }
  }
  if (runnable.size() < 2) GTEST_SKIP() << "only the " << runnable[0]->isa << " level runs on this CPU";
}

const KernelTable* Level(const char* isa) {
  for (const KernelTable* t : RunnableLevels()) {
    if (std::strcmp(t->isa, isa) == 0) return t;
  }
  return nullptr;
}

// A BF16 weight W [n, k] (row-major bits) packed as a PyTorch Linear weight, pair-interleaved or
// k-major.
PackedMatrix PackBf16(const std::vector<uint16_t>& w, int n, int k, bool pairs) {
  MatrixSource src{.data = reinterpret_cast<const uint8_t*>(w.data()),
                   .dtype = DType::kBF16,
                   .out_stride = k,
                   .in_stride = 1,
                   .in = k};
  src.rows.resize(n);
  std::iota(src.rows.begin(), src.rows.end(), 0);
  return std::move(PackedMatrix::Pack(src, pairs)).value();
}

// Y = X · W^T (+ bias, + 0.25 in Y when accumulating) on one level's table.
std::vector<float> Bf16Gemm(const KernelTable& kt, const std::vector<float>& x, int m, const PackedMatrix& w,
                            const float* bias, bool accumulate) {
  std::vector<float> y(static_cast<size_t>(m) * w.out(), 0.25f), packed_a(kt.gemm_scratch_floats(m, w.in()));
  kt.gemm(x.data(), m, w.in(), w, bias, y.data(), w.out(), accumulate, packed_a.data());
  return y;
}

// The levels whose BF16-weight GEMMs multiply BF16-rounded activations: amx (AMX-BF16 tiles,
// TDPBF16PS) and avx512bf16 (VDPBF16PS). Each test skips a level this CPU (or OS) cannot run.
class Bf16ProductLevel : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    level_ = Level(GetParam());
    if (level_ == nullptr) GTEST_SKIP() << "this CPU (or OS) cannot run the " << GetParam() << " level";
    ASSERT_TRUE(level_->bf16_pairs);
  }
  const KernelTable* level_ = nullptr;
};

// Every output is Σ_k bf16(x_k) w_k (+ bias, + Y): activations rounded to nearest even, every k
// counted once, F32 accumulation — within 2^-20 of the terms' magnitudes of that sum in double,
// where taking x unrounded (the F32 levels' product) is off by up to 2^-9 per term. Shapes cover
// partial tiles: rows 1-16 and 17-32 (one AMX pass; 12-row register tiles and their remainders on
// avx512bf16, where 1-2 rows take 4 panels per call and 3-4 rows 2: n = 128), past 32 (whole
// panels), k not a multiple of 32, n not a multiple of 16.
TEST_P(Bf16ProductLevel, MultipliesBf16RoundedActivationsByBf16Weights) {
  const KernelTable* level = level_;
  omp_set_num_threads(2);
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  for (int k : {1, 31, 32, 33, 131, 200}) {
    for (int n : {1, 31, 77, 128}) {
      std::vector<uint16_t> wb(static_cast<size_t>(n) * k);
      for (uint16_t& v : wb) v = F32ToBf16(nd(rng));
      const PackedMatrix w = PackBf16(wb, n, k, level->bf16_pairs);
      std::vector<float> bias(n);
      for (float& v : bias) v = nd(rng);
      for (int m : {1, 2, 3, 4, 5, 16, 17, 32, 33, 50}) {
        std::vector<float> x(static_cast<size_t>(m) * k);
        for (float& v : x) v = nd(rng);
        for (bool accumulate : {false, true}) {
          const std::vector<float> y = Bf16Gemm(*level, x, m, w, bias.data(), accumulate);
          int rounding_seen = 0;
          for (int r = 0; r < m; ++r) {
            for (int c = 0; c < n; ++c) {
              double rounded = 0, exact = 0, size = 0;
              for (int i = 0; i < k; ++i) {
                const double wv = Bf16ToF32(wb[static_cast<size_t>(c) * k + i]), xv = x[r * k + i];
                rounded += Bf16ToF32(F32ToBf16(x[r * k + i])) * wv;
                exact += xv * wv;
                size += std::fabs(xv * wv);
              }
              const double want = rounded + bias[c] + (accumulate ? 0.25 : 0.0);
              const double got = y[static_cast<size_t>(r) * n + c];
              ASSERT_NEAR(got, want, 0x1p-20 * (size + std::fabs(bias[c]) + 1))
                  << "m=" << m << " n=" << n << " k=" << k << " at (" << r << ", " << c << ")";
              rounding_seen += std::fabs(exact - rounded) > 0x1p-18 * (size + 1);
            }
          }
          if (k >= 31 && m * n >= 31) {
            EXPECT_GT(rounding_seen, 0) << "the activations were not rounded to BF16";
          }
        }
      }
    }
  }
}

// The batch-invariance contract on the BF16-product levels: a row gives the same bits alone (one
// AMX pass over 16 rows; a 1-row register tile over several panels) as in a batch of 50 (whole
// panels, two tile rows or 12-row register tiles at a time), wherever it sits.
TEST_P(Bf16ProductLevel, IsBatchInvariant) {
  const KernelTable* level = level_;
  omp_set_num_threads(2);
  std::mt19937 rng(12);
  std::normal_distribution<float> nd;
  const int m = 50, n = 100, k = 200;
  std::vector<uint16_t> wb(static_cast<size_t>(n) * k);
  for (uint16_t& v : wb) v = F32ToBf16(nd(rng));
  const PackedMatrix w = PackBf16(wb, n, k, level->bf16_pairs);
  std::vector<float> x(static_cast<size_t>(m) * k), bias(n);
  for (float& v : x) v = nd(rng);
  for (float& v : bias) v = nd(rng);
  const std::vector<float> batch = Bf16Gemm(*level, x, m, w, bias.data(), true);
  for (int r : {0, 15, 16, 31, 32, 49}) {
    const std::vector<float> row(x.begin() + r * k, x.begin() + (r + 1) * k);
    const std::vector<float> alone = Bf16Gemm(*level, row, 1, w, bias.data(), true);
    ASSERT_EQ(std::memcmp(alone.data(), batch.data() + static_cast<size_t>(r) * n, n * sizeof(float)), 0)
        << "row " << r;
  }
  omp_set_num_threads(1);
  EXPECT_EQ(Bf16Gemm(*level, x, m, w, bias.data(), true), batch) << "one thread and two differ";
}

// The pair-interleaved layout holds the same matrix: every level's embedding reads the same rows
// from it as from the k-major one (runs on any CPU; the layout is plain C++).
TEST(CpuDispatch, ThePairInterleavedLayoutHoldsTheSameRows) {
  std::mt19937 rng(13);
  std::normal_distribution<float> nd;
  const int n = 77, k = 131;  // a partial panel, a partial k block
  std::vector<uint16_t> wb(static_cast<size_t>(n) * k);
  for (uint16_t& v : wb) v = F32ToBf16(nd(rng));
  const PackedMatrix pairs = PackBf16(wb, n, k, true), kmajor = PackBf16(wb, n, k, false);
  ASSERT_TRUE(pairs.pairs());
  ASSERT_FALSE(kmajor.pairs());
  std::vector<int32_t> tokens(n), positions(n, 0);
  std::iota(tokens.begin(), tokens.end(), 0);
  const std::vector<float> wpe(k, 0.f);
  for (const KernelTable* kt : RunnableLevels()) {
    std::vector<float> a(static_cast<size_t>(n) * k), b(a.size());
    kt->embed(tokens.data(), positions.data(), pairs, wpe.data(), Mat(a.data(), n, k));
    kt->embed(tokens.data(), positions.data(), kmajor, wpe.data(), Mat(b.data(), n, k));
    for (int i = 0; i < n * k; ++i) {
      ASSERT_EQ(a[i], Bf16ToF32(wb[i])) << kt->isa << " pair layout, element " << i;
      ASSERT_EQ(b[i], Bf16ToF32(wb[i])) << kt->isa << " k-major layout, element " << i;
    }
  }
}

// Only BF16-weight GEMMs change on a BF16-product level: everything else RunAll computes is the
// avx512 level's bits.
TEST_P(Bf16ProductLevel, ChangesOnlyBf16Gemms) {
  const KernelTable* level = level_;
  const KernelTable* avx512 = Level("avx512");
  ASSERT_NE(avx512, nullptr);
  const std::vector<float> a = RunAll(*level), b = RunAll(*avx512);
  ASSERT_EQ(a.size(), b.size());
  // RunAll's layout: per dtype (F32, BF16, F16) the GEMM [23 x 77] then the embedding [4 x 131].
  const size_t gemm = 23 * 77, per_dtype = gemm + 4 * 131, bf16_begin = per_dtype, bf16_end = per_dtype + gemm;
  size_t differ = 0;
  for (size_t j = 0; j < a.size(); ++j) {
    if (j >= bf16_begin && j < bf16_end) {
      differ += std::memcmp(&a[j], &b[j], 4) != 0;
      // Loose on purpose: the exact BF16 product is checked above; this only says "near".
      ASSERT_NEAR(a[j], b[j], 0.05f * (1 + std::fabs(b[j]))) << j;
    } else {
      ASSERT_EQ(std::memcmp(&a[j], &b[j], 4), 0) << "output " << j << ": " << a[j] << " vs " << b[j];
    }
  }
  EXPECT_GT(differ, gemm / 2) << "the BF16 GEMM did not run the " << GetParam() << " product";
}

INSTANTIATE_TEST_SUITE_P(CpuDispatch, Bf16ProductLevel, ::testing::Values("amx", "avx512bf16"),
                         [](const ::testing::TestParamInfo<const char*>& p) { return std::string(p.param); });

}  // namespace
}  // namespace kraken::engine::cpu
