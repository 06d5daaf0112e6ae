// The packed-weight GEMM: accuracy against a double-precision reference, every stored dtype,
// bias/accumulate, and batch invariance (a row's bits do not depend on M or its position).
#include "engine/cpu/gemm.h"

#include <gtest/gtest.h>
#include <immintrin.h>
#include <omp.h>

#include <cstring>
#include <random>

#include "engine/cpu/kernels.h"
#include "tests/engine/test_util.h"

namespace kraken::engine::cpu {
namespace {

uint16_t ToBf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

uint16_t ToF16(float f) {
  return _cvtss_sh(f, 0);
}

struct Weights {
  std::vector<uint8_t> bytes;
  std::vector<float> values;  // the exact stored values, widened
};

Weights MakeWeights(DType t, int out, int in, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 0.5f);
  Weights w;
  w.values.resize(static_cast<size_t>(out) * in);
  w.bytes.resize(w.values.size() * DTypeSize(t));
  for (size_t i = 0; i < w.values.size(); ++i) {
    const float v = nd(rng);
    if (t == DType::kF32) {
      std::memcpy(&w.bytes[4 * i], &v, 4);
      w.values[i] = v;
    } else {
      const uint16_t h = t == DType::kBF16 ? ToBf16(v) : ToF16(v);
      std::memcpy(&w.bytes[2 * i], &h, 2);
      w.values[i] = t == DType::kBF16 ? Bf16ToF32(h) : F16ToF32(h);
    }
  }
  return w;
}

PackedMatrix PackAll(const Weights& w, DType t, int out, int in) {
  MatrixSource src{.data = w.bytes.data(), .dtype = t, .out_stride = in, .in_stride = 1, .in_begin = 0, .in = in};
  for (int i = 0; i < out; ++i) src.rows.push_back(i);
  auto p = PackedMatrix::Pack(src);
  EXPECT_TRUE(p.ok()) << p.status();
  return std::move(p).value();
}

class GemmTest : public ::testing::TestWithParam<DType> {};

// Whether the active kernel level rounds the activations of a GEMM with `t` weights to BF16 (amx,
// avx512bf16: the levels that pair-interleave BF16 weights).
bool Bf16Activations(DType t) {
  return t == DType::kBF16 && Kernels().bf16_pairs;
}

TEST_P(GemmTest, MatchesDoublePrecisionReference) {
  const DType t = GetParam();
  const uint32_t seed = testing::TestSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  GemmScratch scratch;
  for (auto [m, n, k] : {std::tuple{1, 1, 1}, {3, 50, 17}, {13, 33, 113}, {40, 100, 209}, {7, 64, 504}}) {
    Weights w = MakeWeights(t, n, k, rng);
    PackedMatrix p = PackAll(w, t, n, k);
    std::vector<float> x(static_cast<size_t>(m) * k), bias(n), y(static_cast<size_t>(m) * n, 0.f);
    for (auto& v : x) v = nd(rng);
    for (auto& v : bias) v = nd(rng);
    Gemm(x.data(), m, k, p, bias.data(), y.data(), n, /*accumulate=*/false, &scratch);
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < n; ++j) {
        double ref = bias[j];
        double mag = std::fabs(bias[j]);
        for (int e = 0; e < k; ++e) {
          const double xv = Bf16Activations(t) ? Bf16ToF32(F32ToBf16(x[i * k + e])) : x[i * k + e];
          ref += xv * w.values[static_cast<size_t>(j) * k + e];
          mag += std::fabs(xv * w.values[static_cast<size_t>(j) * k + e]);
        }
        // F32 accumulation over k terms: error bounded by ~k * eps * sum|terms|.
        ASSERT_NEAR(y[i * n + j], ref, 1e-6 * k * mag + 1e-6) << "m=" << m << " n=" << n << " k=" << k;
      }
    }
    // Accumulate mode adds the product to what is there.
    std::vector<float> y2(y.size(), 1.5f);
    Gemm(x.data(), m, k, p, bias.data(), y2.data(), n, /*accumulate=*/true, &scratch);
    for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y2[i], 1.5f + y[i]);
  }
}

TEST_P(GemmTest, RowResultsAreBitwiseIndependentOfBatchSizeAndThreads) {
  const DType t = GetParam();
  const uint32_t seed = testing::TestSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937 rng(seed + 1);
  std::normal_distribution<float> nd;
  const int n = 200, k = 168, max_m = 70;
  Weights w = MakeWeights(t, n, k, rng);
  PackedMatrix p = PackAll(w, t, n, k);
  std::vector<float> x(static_cast<size_t>(max_m) * k);
  for (auto& v : x) v = nd(rng);
  GemmScratch scratch;
  // Reference: every row alone (M = 1), one thread.
  omp_set_num_threads(1);
  std::vector<float> alone(static_cast<size_t>(max_m) * n);
  for (int r = 0; r < max_m; ++r) Gemm(&x[r * k], 1, k, p, nullptr, &alone[r * n], n, false, &scratch);
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (int m = 1; m <= max_m; ++m) {
      for (int start : {0, max_m - m}) {  // the rows at different positions of the batch
        std::vector<float> y(static_cast<size_t>(m) * n);
        Gemm(&x[start * k], m, k, p, nullptr, y.data(), n, false, &scratch);
        ASSERT_EQ(0, std::memcmp(y.data(), &alone[start * n], y.size() * sizeof(float)))
            << "M=" << m << " start=" << start << " threads=" << threads;
      }
    }
  }
  omp_set_num_threads(omp_get_num_procs());
}

// Every kernel path (AVX-512, AVX2, portable) must give exactly this value per element: one fused
// multiply-add chain over k in order from zero, then + bias, then added to what Y held. That is
// what makes results the same on every CPU, not only batch invariant on one.
TEST_P(GemmTest, EveryElementIsTheInOrderFmaChainBitForBit) {
  if (Bf16Activations(GetParam())) {
    GTEST_SKIP() << "the " << Kernels().isa << " level's BF16 product is over BF16 activations (cpu_dispatch_test)";
  }
  const DType t = GetParam();
  const uint32_t seed = testing::TestSeed();
  SCOPED_TRACE(StrCat("seed ", seed));
  std::mt19937 rng(seed + 2);
  std::normal_distribution<float> nd;
  GemmScratch scratch;
  // Row counts around every tile height (6, 12) and column counts around every block width
  // (8, 16, 32, 64), both with and without bias and accumulation.
  for (auto [m, n, k] : {std::tuple{1, 1, 3},
                         {1, 65, 40},
                         {2, 97, 33},
                         {5, 31, 64},
                         {7, 40, 17},
                         {13, 129, 70},
                         {25, 200, 9},
                         {96, 72, 130}}) {
    Weights w = MakeWeights(t, n, k, rng);
    PackedMatrix p = PackAll(w, t, n, k);
    std::vector<float> x(static_cast<size_t>(m) * k), bias(n), y0(static_cast<size_t>(m) * n);
    for (auto& v : x) v = nd(rng);
    for (auto& v : bias) v = nd(rng);
    for (auto& v : y0) v = nd(rng);
    for (bool with_bias : {false, true}) {
      for (bool accumulate : {false, true}) {
        std::vector<float> y = y0, want(y0.size());
        Gemm(x.data(), m, k, p, with_bias ? bias.data() : nullptr, y.data(), n, accumulate, &scratch);
        for (int i = 0; i < m; ++i) {
          for (int j = 0; j < n; ++j) {
            float acc = 0.f;
            for (int e = 0; e < k; ++e) acc = std::fma(x[i * k + e], w.values[static_cast<size_t>(j) * k + e], acc);
            if (with_bias) acc = acc + bias[j];
            if (accumulate) acc = y0[i * n + j] + acc;
            want[i * n + j] = acc;
          }
        }
        ASSERT_EQ(0, std::memcmp(y.data(), want.data(), y.size() * sizeof(float)))
            << "m=" << m << " n=" << n << " k=" << k << " bias=" << with_bias << " accumulate=" << accumulate;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, GemmTest, ::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                         [](const auto& param_info) { return std::string(DTypeName(param_info.param)); });

TEST(Gemm, PacksSelectedRowsAndInputSlices) {
  // W [4, 3] row-major; take rows {3, 1} and input columns [1, 3): y = x . W[rows, 1:3]^T
  const float wv[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  MatrixSource src{.data = reinterpret_cast<const uint8_t*>(wv),
                   .dtype = DType::kF32,
                   .out_stride = 3,
                   .in_stride = 1,
                   .in_begin = 1,
                   .in = 2,
                   .rows = {3, 1}};
  auto p = PackedMatrix::Pack(src);
  ASSERT_TRUE(p.ok());
  const float x[2] = {1.f, 10.f};
  float y[2];
  GemmScratch s;
  Gemm(x, 1, 2, *p, nullptr, y, 2, false, &s);
  EXPECT_EQ(y[0], 11.f + 10 * 12.f);
  EXPECT_EQ(y[1], 5.f + 10 * 6.f);
  // The same matrix stored transposed ([in, out], HF Conv1D): element (o, i) at i * 4 + o.
  const float wt[12] = {1, 4, 7, 10, 2, 5, 8, 11, 3, 6, 9, 12};
  MatrixSource tsrc{.data = reinterpret_cast<const uint8_t*>(wt),
                    .dtype = DType::kF32,
                    .out_stride = 1,
                    .in_stride = 4,
                    .in_begin = 1,
                    .in = 2,
                    .rows = {3, 1}};
  auto q = PackedMatrix::Pack(tsrc);
  ASSERT_TRUE(q.ok());
  float z[2];
  Gemm(x, 1, 2, *q, nullptr, z, 2, false, &s);
  EXPECT_EQ(z[0], y[0]);
  EXPECT_EQ(z[1], y[1]);
}

TEST(Gemm, RejectsIntegerWeights) {
  MatrixSource src{.dtype = DType::kI32, .in = 1, .rows = {0}};
  auto p = PackedMatrix::Pack(src);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().message(), "weight dtype I32 cannot be used in a matrix multiply");
}

}  // namespace
}  // namespace kraken::engine::cpu
