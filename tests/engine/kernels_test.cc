// CPU kernels against straightforward double-precision implementations: exp/tanh, LayerNorm,
// GELU, and paged attention for odd head sizes, several block sizes, chunked prefill and decode.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <tuple>

#include "engine/backend.h"
#include "engine/cpu/kernels.h"
#include "engine/cpu/simd.h"
#include "tests/engine/test_util.h"

namespace kraken::engine::cpu {
namespace {

// The vector maths as this test file's own -march builds it; the kernels' levels run the same
// code through the forced-level runs of this suite (KRAKEN_CPU_ISA).
using native::Exp;
using native::F32x16;
using native::Tanh;

TEST(Simd, ExpIsAccurateAndHandlesSpecialValues) {
  float worst = 0.f;
  for (double x = -87.0; x <= 88.7; x += 0.0137) {
    const float got = [&] {
      float out[16];
      Exp(F32x16::Broadcast(static_cast<float>(x))).Store(out);
      return out[0];
    }();
    const double want = std::exp(static_cast<double>(static_cast<float>(x)));
    worst = std::max(worst, static_cast<float>(std::fabs(got - want) / want));
  }
  EXPECT_LT(worst, 3e-7f) << "relative error";
  float out[16];
  const float inf = std::numeric_limits<float>::infinity();
  Exp(F32x16::Broadcast(-inf)).Store(out);
  EXPECT_EQ(out[0], 0.f);
  Exp(F32x16::Broadcast(-100.f)).Store(out);
  EXPECT_EQ(out[0], 0.f);
  Exp(F32x16::Broadcast(100.f)).Store(out);
  EXPECT_EQ(out[0], inf);
  Exp(F32x16::Broadcast(std::nanf(""))).Store(out);
  EXPECT_TRUE(std::isnan(out[0]));
  Exp(F32x16::Broadcast(0.f)).Store(out);
  EXPECT_EQ(out[0], 1.f);
  // Close to the overflow point, where 2^n alone would not be representable.
  for (float x : {88.4f, 88.5f, 88.7f}) {
    Exp(F32x16::Broadcast(x)).Store(out);
    EXPECT_NEAR(out[0] / std::exp(static_cast<double>(x)), 1.0, 3e-7) << x;
  }
}

TEST(Simd, TanhAbsoluteErrorIsTiny) {
  double worst = 0;
  for (double x = -12; x <= 12; x += 0.00731) {
    float out[16];
    Tanh(F32x16::Broadcast(static_cast<float>(x))).Store(out);
    worst = std::max(worst, std::fabs(out[0] - std::tanh(static_cast<double>(static_cast<float>(x)))));
  }
  EXPECT_LT(worst, 2.5e-7);
}

TEST(Kernels, LayerNormAndGeluMatchDoublePrecision) {
  std::mt19937 rng(testing::TestSeed());
  std::normal_distribution<float> nd(0.3f, 2.f);
  for (int cols : {1, 15, 16, 17, 113, 504}) {
    const int rows = 5;
    std::vector<float> x(rows * cols), w(cols), b(cols), y(rows * cols);
    for (auto& v : x) v = nd(rng);
    for (auto& v : w) v = nd(rng);
    for (auto& v : b) v = nd(rng);
    LayerNorm(Mat(x.data(), rows, cols), w.data(), b.data(), 1e-5f, Mat(y.data(), rows, cols));
    for (int r = 0; r < rows; ++r) {
      double mean = 0, var = 0;
      for (int i = 0; i < cols; ++i) mean += x[r * cols + i];
      mean /= cols;
      for (int i = 0; i < cols; ++i) var += (x[r * cols + i] - mean) * (x[r * cols + i] - mean);
      var /= cols;
      for (int i = 0; i < cols; ++i) {
        const double want = (x[r * cols + i] - mean) / std::sqrt(var + 1e-5) * w[i] + b[i];
        ASSERT_NEAR(y[r * cols + i], want, 2e-5 * (1 + std::fabs(want))) << "cols=" << cols;
      }
    }
    std::vector<float> g = x;
    GeluTanh(Mat(g.data(), rows, cols));
    for (size_t i = 0; i < x.size(); ++i) {
      const double v = x[i];
      const double want = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
      ASSERT_NEAR(g[i], want, 1e-6 * (1 + std::fabs(want)));
    }
  }
}

// The KV cache's rounding. F16: against the compiler's _Float16 conversion (IEEE round to nearest
// even) over every 257th float bit pattern plus the boundaries; BF16: against its definition (the
// nearest bfloat16, ties to the even mantissa).
TEST(Kernels, F32To16BitRoundsToNearestEven) {
  int wrong = 0;  // reported for the first few only
  auto check_f16 = [&wrong](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    if (std::isnan(f)) want = 0x7fff;  // CUDA's canonical NaN
    const uint16_t got = F32ToF16(f);
    if (got != want && ++wrong <= 5) ADD_FAILURE() << "float bits 0x" << std::hex << u << ": got 0x" << got;
  };
  for (uint64_t u = 0; u <= 0xffffffffu; u += 257) check_f16(static_cast<uint32_t>(u));
  // Around every binade edge and halfway point of half's range, both signs.
  for (uint32_t e = 0x33000000u; e <= 0x47800000u; e += 0x00800000u) {
    for (uint32_t d = 0; d < 0x4000u; ++d) {
      for (uint32_t base : {e, e + 0x1000u, e + 0x2000u, e + 0x3000u}) {
        check_f16(base - 0x2000u + d);
        check_f16((base - 0x2000u + d) | 0x80000000u);
      }
    }
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(F32ToF16(65504.f), 0x7bffu);
  EXPECT_EQ(F32ToF16(65519.99f), 0x7bffu);
  EXPECT_EQ(F32ToF16(65520.f), 0x7c00u);  // halfway to 2^16: ties to even = infinity
  EXPECT_EQ(F32ToF16(-1e30f), 0xfc00u);
  EXPECT_EQ(F32ToF16(std::ldexp(1.f, -24)), 0x0001u);  // smallest subnormal
  EXPECT_EQ(F32ToF16(std::ldexp(1.f, -25)), 0x0000u);  // halfway to it: ties to even = 0
  EXPECT_EQ(F32ToF16(std::ldexp(1.5f, -25)), 0x0001u);
  EXPECT_EQ(F32ToF16(std::ldexp(3.f, -25)), 0x0002u);  // 1.5 subnormal steps: ties to even = 2
  EXPECT_EQ(F32ToF16(std::ldexp(5.f, -25)), 0x0002u);  // 2.5 steps: ties to even = 2
  EXPECT_EQ(F32ToF16(-0.f), 0x8000u);
  EXPECT_EQ(F32ToF16(std::nanf("")), 0x7fffu);
  EXPECT_EQ(F32ToF16(-std::nanf("")), 0x7fffu);

  EXPECT_EQ(F32ToBf16(1.f), 0x3f80u);
  EXPECT_EQ(F32ToBf16(Bf16ToF32(0x3f80u) + std::ldexp(1.f, -8)), 0x3f80u);   // halfway, even below
  EXPECT_EQ(F32ToBf16(Bf16ToF32(0x3f81u) + std::ldexp(1.f, -8)), 0x3f82u);   // halfway, even above
  EXPECT_EQ(F32ToBf16(Bf16ToF32(0x3f80u) + std::ldexp(1.1f, -8)), 0x3f81u);  // past halfway
  EXPECT_EQ(F32ToBf16(3.4e38f), 0x7f80u);                                    // rounds past the largest: inf
  const uint32_t largest_below_inf = 0x7f7f7fffu;  // rounds down to bfloat16's largest, 0x7f7f
  float big;
  std::memcpy(&big, &largest_below_inf, 4);
  EXPECT_EQ(F32ToBf16(big), 0x7f7fu);
  EXPECT_EQ(F32ToBf16(-0.f), 0x8000u);
  EXPECT_EQ(F32ToBf16(std::nanf("")), 0x7fffu);
  EXPECT_EQ(F32ToBf16(-std::nanf("")), 0x7fffu);
  std::mt19937 rng(testing::TestSeed());
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    const uint16_t h = F32ToBf16(f);
    const double got = Bf16ToF32(h), x = f;
    // No bfloat16 is nearer; on a tie the mantissa is even.
    for (uint16_t n : {static_cast<uint16_t>(h - 1), static_cast<uint16_t>(h + 1)}) {
      const double other = Bf16ToF32(n);
      if (std::isnan(other) || std::isinf(got)) continue;
      ASSERT_LE(std::fabs(got - x), std::fabs(other - x)) << std::hex << u;
      if (std::fabs(got - x) == std::fabs(other - x)) {
        ASSERT_EQ(h & 1u, 0u) << std::hex << u;
      }
    }
  }
}

// Naive causal attention for one sequence: q, k, v [T, heads*dh] with all T positions.
std::vector<double> NaiveAttention(const std::vector<float>& q, const std::vector<float>& k,
                                   const std::vector<float>& v, int T, int heads, int dh, float scale) {
  const int w = heads * dh;
  std::vector<double> out(static_cast<size_t>(T) * w);
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < T; ++i) {
      std::vector<double> s(i + 1);
      double mx = -1e300;
      for (int j = 0; j <= i; ++j) {
        double dot = 0;
        for (int e = 0; e < dh; ++e) dot += static_cast<double>(q[i * w + h * dh + e]) * k[j * w + h * dh + e];
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (int e = 0; e < dh; ++e) {
        double acc = 0;
        for (int j = 0; j <= i; ++j) acc += s[j] * v[j * w + h * dh + e];
        out[i * w + h * dh + e] = acc / sum;
      }
    }
  }
  return out;
}

struct AttnCase {
  int heads, dh, block_size, T;
};

// x as a KV cache of `dtype` holds it: rounded to nearest even, widened back exactly.
float StoredAs(DType dtype, float x) {
  return dtype == DType::kBF16 ? Bf16ToF32(F32ToBf16(x)) : dtype == DType::kF16 ? F16ToF32(F32ToF16(x)) : x;
}

// A KV pool of `elems` entries of `dtype` whose every byte is 0xff: NaN in F32, BF16 and F16.
std::vector<uint8_t> NanPool(DType dtype, int64_t elems) {
  return std::vector<uint8_t>(static_cast<size_t>(elems) * DTypeSize(dtype), 0xff);
}

class AttentionTest : public ::testing::TestWithParam<std::tuple<AttnCase, DType>> {};

// With a 16-bit cache the reference attends over K and V rounded as the cache stores them: the
// kernel widens them exactly and computes in F32, so the tolerance is the F32 cache's.
TEST_P(AttentionTest, PrefillChunkedAndDecodeAgreeWithNaiveAndWithEachOther) {
  const auto [c, dtype] = GetParam();
  const uint32_t seed = testing::TestSeed();
  SCOPED_TRACE(StrCat("seed ", seed, " heads ", c.heads, " dh ", c.dh, " bs ", c.block_size, " ", DTypeName(dtype)));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  const int w = c.heads * c.dh, T = c.T;
  std::vector<float> q(T * w), k(T * w), v(T * w);
  for (auto* a : {&q, &k, &v})
    for (float& x : *a) x = nd(rng);
  const float scale = 1.f / std::sqrt(static_cast<float>(c.dh));
  const int nblocks = (T + c.block_size - 1) / c.block_size + 3;
  // A scattered block table: physical blocks in shuffled order; unused blocks hold NaN, which
  // must never leak into a result.
  std::vector<int32_t> table(nblocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  KvSlot slot{.dtype = dtype, .heads = c.heads, .head_dim = c.dh, .block_size = c.block_size, .num_blocks = nblocks};
  std::vector<uint8_t> kpool = NanPool(dtype, slot.block_elems() * nblocks), vpool(kpool);
  slot.k = kpool.data();
  slot.v = vpool.data();
  AttentionScratch scratch;

  auto run = [&](int start, int n, std::vector<float>& out) {
    AttentionSeq s{0, n, start, table.data()};
    AttentionBatch b{{&s, 1}, c.block_size};
    WriteKv(Mat(&k[start * w], n, w), Mat(&v[start * w], n, w), slot, b);
    Attention(Mat(&q[start * w], n, w), slot, b, scale, Mat(&out[start * w], n, w), &scratch);
  };
  std::vector<float> full(T * w), chunked(T * w), decode(T * w);
  run(0, T, full);
  for (int s = 0; s < T; s += 7) run(s, std::min(7, T - s), chunked);
  for (int s = 0; s < T; ++s) run(s, 1, decode);

  std::vector<float> k_stored(k), v_stored(v);
  for (float& x : k_stored) x = StoredAs(dtype, x);
  for (float& x : v_stored) x = StoredAs(dtype, x);
  const std::vector<double> want = NaiveAttention(q, k_stored, v_stored, T, c.heads, c.dh, scale);
  for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(full[i], want[i], 2e-5) << "element " << i;
  EXPECT_EQ(0, std::memcmp(full.data(), chunked.data(), full.size() * 4)) << "chunked prefill differs";
  EXPECT_EQ(0, std::memcmp(full.data(), decode.data(), full.size() * 4)) << "token-by-token decode differs";
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Combine(::testing::Values(AttnCase{1, 113, 16, 53}, AttnCase{2, 209, 16, 40},
                                                              AttnCase{3, 21, 5, 33}, AttnCase{4, 16, 32, 70},
                                                              AttnCase{2, 168, 1, 20}, AttnCase{1, 7, 16, 1}),
                                            ::testing::Values(DType::kF32, DType::kBF16, DType::kF16)),
                         [](const auto& p) {
                           const AttnCase& c = std::get<0>(p.param);
                           return StrCat("h", c.heads, "_dh", c.dh, "_bs", c.block_size, "_T", c.T, "_",
                                         DTypeName(std::get<1>(p.param)));
                         });

class AttentionBatchTest : public ::testing::TestWithParam<DType> {};

TEST_P(AttentionBatchTest, AttentionOfABatchEqualsEachSequenceAlone) {
  std::mt19937 rng(testing::TestSeed());
  std::normal_distribution<float> nd;
  const int heads = 2, dh = 45, bs = 16, w = heads * dh;
  const int lens[] = {19, 1, 40, 5};
  const int T = 19 + 1 + 40 + 5;
  std::vector<float> q(T * w), k(T * w), v(T * w);
  for (auto* a : {&q, &k, &v})
    for (float& x : *a) x = nd(rng);
  KvSlot slot{.dtype = GetParam(), .heads = heads, .head_dim = dh, .block_size = bs, .num_blocks = 16};
  std::vector<uint8_t> kpool = NanPool(slot.dtype, slot.block_elems() * 16), vpool(kpool);
  slot.k = kpool.data();
  slot.v = vpool.data();
  std::vector<std::vector<int32_t>> tables = {{0, 1}, {2}, {3, 4, 5}, {6}};
  std::vector<AttentionSeq> seqs;
  int at = 0;
  for (int i = 0; i < 4; ++i) {
    seqs.push_back({at, lens[i], 0, tables[i].data()});
    at += lens[i];
  }
  AttentionScratch scratch;
  AttentionBatch batch{seqs, bs};
  std::vector<float> together(T * w), alone(T * w);
  WriteKv(Mat(k.data(), T, w), Mat(v.data(), T, w), slot, batch);
  Attention(Mat(q.data(), T, w), slot, batch, 0.15f, Mat(together.data(), T, w), &scratch);
  for (int i = 0; i < 4; ++i) {
    AttentionSeq s = seqs[i];
    const int begin = s.token_begin;
    s.token_begin = 0;
    AttentionBatch one{{&s, 1}, bs};
    Attention(Mat(&q[begin * w], s.num_tokens, w), slot, one, 0.15f, Mat(&alone[begin * w], s.num_tokens, w), &scratch);
  }
  EXPECT_EQ(0, std::memcmp(together.data(), alone.data(), together.size() * 4));
}

INSTANTIATE_TEST_SUITE_P(KvDTypes, AttentionBatchTest, ::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                         [](const auto& p) { return std::string(DTypeName(p.param)); });

}  // namespace
}  // namespace kraken::engine::cpu
