// 16-lane float vectors for the CPU kernels: one AVX-512 register when the compiler targets it,
// two AVX2 registers (lanes 0-7, 8-15) on AVX2 + FMA + F16C, otherwise a portable lane loop with
// the same arithmetic (std::fma per lane), so every build computes the same values in the same
// order for finite inputs — only the speed differs. (ReduceMax may treat NaN and signed zeros
// differently between them.)
//
//   F32x16 acc = F32x16::Zero();
//   acc = Fma(F32x16::Broadcast(a), F32x16::Load(b), acc);
//   float s = acc.ReduceAdd();   // fixed pairwise order
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "engine/dtype.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define KRAKEN_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KRAKEN_SIMD_AVX2 1
#elif defined(__F16C__)
#include <immintrin.h>  // F16C half -> float conversion in the portable LoadF16
#endif

// Kernel files are compiled once per instruction-set level, each copy inside its own namespace
// (KRAKEN_CPU_ISA: avx2, avx512, avx512bf16, amx, generic; engine/CMakeLists.txt), so that the copies never share
// a symbol. A file compiled once (a test) gets `native`: whatever its own -march allows.
#ifndef KRAKEN_CPU_ISA
#define KRAKEN_CPU_ISA native
#endif

namespace kraken::engine::cpu::KRAKEN_CPU_ISA {

inline constexpr int kLanes = 16;

/// Mask of the first `n` lanes (n in [0, 16]).
inline uint16_t FirstLanes(int n) {
  return n >= 16 ? 0xffffu : static_cast<uint16_t>((1u << n) - 1u);
}

#if KRAKEN_SIMD_AVX512
// Full-mask (maskz) forms of the intrinsics: GCC 12's unmasked forms expand through
// _mm512_undefined_*, which -Wuninitialized flags once inlined (GCC bug 105593). Same instructions.
inline constexpr __mmask16 kAll = 0xffff;

struct F32x16 {
  __m512 v;
  static F32x16 Zero() { return {_mm512_setzero_ps()}; }
  static F32x16 Broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static F32x16 Load(const float* p) { return {_mm512_loadu_ps(p)}; }
  /// Loads the first `n` lanes, zero elsewhere (never touches memory past p + n).
  static F32x16 LoadPartial(const float* p, int n) { return {_mm512_maskz_loadu_ps(FirstLanes(n), p)}; }
  /// 16 bfloat16 values widened exactly.
  static F32x16 LoadBf16(const uint16_t* p) {
    __m512i w = _mm512_maskz_cvtepu16_epi32(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, w, 16))};
  }
  /// 16 IEEE half values widened exactly.
  static F32x16 LoadF16(const uint16_t* p) {
    return {_mm512_maskz_cvtph_ps(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  void Store(float* p) const { _mm512_storeu_ps(p, v); }
  void StorePartial(float* p, int n) const { _mm512_mask_storeu_ps(p, FirstLanes(n), v); }
  float ReduceAdd() const {
    // Fixed tree: 16 -> 8 -> 4 -> 2 -> 1, identical to the portable version below.
    __m256 a = _mm256_add_ps(_mm512_maskz_extractf32x8_ps(0xff, v, 0), _mm512_maskz_extractf32x8_ps(0xff, v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    __m128 d = _mm_add_ss(c, _mm_shuffle_ps(c, c, 1));
    return _mm_cvtss_f32(d);
  }
  float ReduceMax() const {
    __m256 a = _mm256_max_ps(_mm512_maskz_extractf32x8_ps(0xff, v, 0), _mm512_maskz_extractf32x8_ps(0xff, v, 1));
    __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_max_ps(b, _mm_movehl_ps(b, b));
    __m128 d = _mm_max_ss(c, _mm_shuffle_ps(c, c, 1));
    return _mm_cvtss_f32(d);
  }
};
inline F32x16 operator+(F32x16 a, F32x16 b) {
  return {_mm512_add_ps(a.v, b.v)};
}
inline F32x16 operator-(F32x16 a, F32x16 b) {
  return {_mm512_sub_ps(a.v, b.v)};
}
inline F32x16 operator*(F32x16 a, F32x16 b) {
  return {_mm512_mul_ps(a.v, b.v)};
}
inline F32x16 operator/(F32x16 a, F32x16 b) {
  return {_mm512_div_ps(a.v, b.v)};
}
/// a * b + c with one rounding.
inline F32x16 Fma(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm512_fmadd_ps(a.v, b.v, c.v)};
}
inline F32x16 Max(F32x16 a, F32x16 b) {
  return {_mm512_maskz_max_ps(kAll, a.v, b.v)};
}
inline F32x16 Min(F32x16 a, F32x16 b) {
  return {_mm512_maskz_min_ps(kAll, a.v, b.v)};
}
inline F32x16 Abs(F32x16 a) {
  return {_mm512_abs_ps(a.v)};
}
/// Lanes set in `keep` from a, others from b.
inline F32x16 Select(uint16_t keep, F32x16 a, F32x16 b) {
  return {_mm512_mask_blend_ps(keep, b.v, a.v)};
}
/// Lanes where a < b.
inline uint16_t LessThan(F32x16 a, F32x16 b) {
  return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ);
}
/// Lanes that are not NaN.
inline uint16_t NotNan(F32x16 a) {
  return _mm512_cmp_ps_mask(a.v, a.v, _CMP_ORD_Q);
}
/// Rounds to nearest integer (ties to even), as float.
inline F32x16 RoundNearest(F32x16 a) {
  return {_mm512_maskz_roundscale_ps(kAll, a.v, _MM_FROUND_TO_NEAREST_INT)};
}
/// Multiplies by 2^n where n holds integral floats in [-252, 254], as two exact scalings by
/// 2^(n/2) and 2^(n - n/2) so that n = 128 (exp near its overflow point) still works.
inline F32x16 Ldexp(F32x16 a, F32x16 n) {
  const __m512i ni = _mm512_maskz_cvtps_epi32(kAll, n.v);
  const __m512i half = _mm512_maskz_srai_epi32(kAll, ni, 1);
  const __m512i rest = _mm512_sub_epi32(ni, half);
  const __m512i bias = _mm512_set1_epi32(127);
  const __m512 s1 = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_add_epi32(half, bias), 23));
  const __m512 s2 = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_add_epi32(rest, bias), 23));
  return {_mm512_mul_ps(_mm512_mul_ps(a.v, s1), s2)};
}
#elif KRAKEN_SIMD_AVX2
/// Lane masks for the AVX2 halves: lanes i < n of 8.
inline __m256 FirstLanesMask8(int n) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
/// 8 bfloat16 values widened exactly.
inline __m256 LoadBf16x8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
/// 8 IEEE half values widened exactly.
inline __m256 LoadF16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
/// The 8 lanes of `bits` (bit i -> lane i) as a blend mask.
inline __m256 BitsToMask8(unsigned bits) {
  const __m256i b = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), b), b));
}

struct F32x16 {
  __m256 lo, hi;  // lanes 0-7, 8-15
  static F32x16 Zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static F32x16 Broadcast(float x) {
    const __m256 v = _mm256_set1_ps(x);
    return {v, v};
  }
  static F32x16 Load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  /// Loads the first `n` lanes, zero elsewhere (never touches memory past p + n).
  static F32x16 LoadPartial(const float* p, int n) {
    return {_mm256_maskload_ps(p, _mm256_castps_si256(FirstLanesMask8(n))),
            _mm256_maskload_ps(p + 8, _mm256_castps_si256(FirstLanesMask8(n - 8)))};
  }
  /// 16 bfloat16 values widened exactly.
  static F32x16 LoadBf16(const uint16_t* p) { return {LoadBf16x8(p), LoadBf16x8(p + 8)}; }
  /// 16 IEEE half values widened exactly.
  static F32x16 LoadF16(const uint16_t* p) { return {LoadF16x8(p), LoadF16x8(p + 8)}; }
  void Store(float* p) const {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
  }
  void StorePartial(float* p, int n) const {
    _mm256_maskstore_ps(p, _mm256_castps_si256(FirstLanesMask8(n)), lo);
    _mm256_maskstore_ps(p + 8, _mm256_castps_si256(FirstLanesMask8(n - 8)), hi);
  }
  float ReduceAdd() const {
    // Fixed tree: 16 -> 8 -> 4 -> 2 -> 1, identical to the other versions.
    const __m256 a = _mm256_add_ps(lo, hi);
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    const __m128 d = _mm_add_ss(c, _mm_shuffle_ps(c, c, 1));
    return _mm_cvtss_f32(d);
  }
  float ReduceMax() const {
    const __m256 a = _mm256_max_ps(lo, hi);
    const __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_max_ps(b, _mm_movehl_ps(b, b));
    const __m128 d = _mm_max_ss(c, _mm_shuffle_ps(c, c, 1));
    return _mm_cvtss_f32(d);
  }
};
inline F32x16 operator+(F32x16 a, F32x16 b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline F32x16 operator-(F32x16 a, F32x16 b) {
  return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)};
}
inline F32x16 operator*(F32x16 a, F32x16 b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline F32x16 operator/(F32x16 a, F32x16 b) {
  return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)};
}
/// a * b + c with one rounding.
inline F32x16 Fma(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F32x16 Max(F32x16 a, F32x16 b) {
  return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)};
}
inline F32x16 Min(F32x16 a, F32x16 b) {
  return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)};
}
inline F32x16 Abs(F32x16 a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_andnot_ps(sign, a.lo), _mm256_andnot_ps(sign, a.hi)};
}
/// Lanes set in `keep` from a, others from b.
inline F32x16 Select(uint16_t keep, F32x16 a, F32x16 b) {
  return {_mm256_blendv_ps(b.lo, a.lo, BitsToMask8(keep & 0xffu)),
          _mm256_blendv_ps(b.hi, a.hi, BitsToMask8(keep >> 8))};
}
/// Lanes where a < b.
inline uint16_t LessThan(F32x16 a, F32x16 b) {
  return static_cast<uint16_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ)) |
                               (_mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ)) << 8));
}
/// Lanes that are not NaN.
inline uint16_t NotNan(F32x16 a) {
  return static_cast<uint16_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, a.lo, _CMP_ORD_Q)) |
                               (_mm256_movemask_ps(_mm256_cmp_ps(a.hi, a.hi, _CMP_ORD_Q)) << 8));
}
/// Rounds to nearest integer (ties to even), as float.
inline F32x16 RoundNearest(F32x16 a) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kMode), _mm256_round_ps(a.hi, kMode)};
}
/// Multiplies by 2^n where n holds integral floats in [-252, 254], as two exact scalings by
/// 2^(n/2) and 2^(n - n/2) (see the AVX-512 version).
inline __m256 Ldexp8(__m256 a, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i rest = _mm256_sub_epi32(ni, half);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(a, s1), s2);
}
inline F32x16 Ldexp(F32x16 a, F32x16 n) {
  return {Ldexp8(a.lo, n.lo), Ldexp8(a.hi, n.hi)};
}
#else
/// 16 IEEE halves at `p` widened exactly to floats at `out` (F16C eight at a time where the CPU
/// has it: the same values, since every half is a float).
inline void WidenF16x16(const uint16_t* p, float* out) {
#if defined(__F16C__)
  _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))));
#else
  for (int i = 0; i < kLanes; ++i) out[i] = F16ToF32(p[i]);
#endif
}

struct F32x16 {
  float v[kLanes];
  static F32x16 Zero() { return Broadcast(0.f); }
  static F32x16 Broadcast(float x) {
    F32x16 r;
    for (float& e : r.v) e = x;
    return r;
  }
  static F32x16 Load(const float* p) {
    F32x16 r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static F32x16 LoadPartial(const float* p, int n) {
    F32x16 r = Zero();
    std::memcpy(r.v, p, sizeof(float) * (n < 16 ? n : 16));
    return r;
  }
  static F32x16 LoadBf16(const uint16_t* p) {
    F32x16 r;
    for (int i = 0; i < kLanes; ++i) {
      uint32_t u = static_cast<uint32_t>(p[i]) << 16;
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
  static F32x16 LoadF16(const uint16_t* p) {
    F32x16 r;
    WidenF16x16(p, r.v);
    return r;
  }
  void Store(float* p) const { std::memcpy(p, v, sizeof v); }
  void StorePartial(float* p, int n) const { std::memcpy(p, v, sizeof(float) * (n < 16 ? n : 16)); }
  float ReduceAdd() const {
    float a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i) a[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; ++i) b[i] = a[i] + a[i + 4];
    c[0] = b[0] + b[2];
    c[1] = b[1] + b[3];
    return c[0] + c[1];
  }
  float ReduceMax() const {
    float m = v[0];
    for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
};
#define KRAKEN_LANEWISE(expr)                     \
  F32x16 r;                                       \
  for (int i = 0; i < kLanes; ++i) r.v[i] = expr; \
  return r
inline F32x16 operator+(F32x16 a, F32x16 b) {
  KRAKEN_LANEWISE(a.v[i] + b.v[i]);
}
inline F32x16 operator-(F32x16 a, F32x16 b) {
  KRAKEN_LANEWISE(a.v[i] - b.v[i]);
}
inline F32x16 operator*(F32x16 a, F32x16 b) {
  KRAKEN_LANEWISE(a.v[i] * b.v[i]);
}
inline F32x16 operator/(F32x16 a, F32x16 b) {
  KRAKEN_LANEWISE(a.v[i] / b.v[i]);
}
inline F32x16 Fma(F32x16 a, F32x16 b, F32x16 c) {
  KRAKEN_LANEWISE(std::fma(a.v[i], b.v[i], c.v[i]));
}
inline F32x16 Max(F32x16 a, F32x16 b) {
  KRAKEN_LANEWISE(a.v[i] > b.v[i] ? a.v[i] : b.v[i]);
}
inline F32x16 Min(F32x16 a, F32x16 b) {
  KRAKEN_LANEWISE(a.v[i] < b.v[i] ? a.v[i] : b.v[i]);
}
inline F32x16 Abs(F32x16 a) {
  KRAKEN_LANEWISE(std::fabs(a.v[i]));
}
inline F32x16 Select(uint16_t keep, F32x16 a, F32x16 b) {
  KRAKEN_LANEWISE((keep >> i) & 1 ? a.v[i] : b.v[i]);
}
inline uint16_t LessThan(F32x16 a, F32x16 b) {
  uint16_t m = 0;
  for (int i = 0; i < kLanes; ++i) m |= static_cast<uint16_t>(a.v[i] < b.v[i]) << i;
  return m;
}
inline uint16_t NotNan(F32x16 a) {
  uint16_t m = 0;
  for (int i = 0; i < kLanes; ++i) m |= static_cast<uint16_t>(!std::isnan(a.v[i])) << i;
  return m;
}
inline F32x16 RoundNearest(F32x16 a) {
  KRAKEN_LANEWISE(std::nearbyint(a.v[i]));
}
inline F32x16 Ldexp(F32x16 a, F32x16 n) {
  KRAKEN_LANEWISE(a.v[i] * std::ldexp(1.0f, static_cast<int>(n.v[i]) >> 1) *
                  std::ldexp(1.0f, static_cast<int>(n.v[i]) - (static_cast<int>(n.v[i]) >> 1)));
}
#undef KRAKEN_LANEWISE
#endif

/// Hints that the cache line holding `p` will be read soon (no effect on results).
inline void Prefetch(const void* p) {
  __builtin_prefetch(p, 0, 3);
}

/// e^x per lane, within 2 ulp of the exact value for x in [-87.3, 88.7]; exactly 0 below -87.3
/// (so exp(-inf) == 0), +inf above 88.7, NaN stays NaN. Cody-Waite range reduction x = n ln2 + r
/// and a degree-6 polynomial for e^r on |r| <= ln2/2 (Cephes expf coefficients).
inline F32x16 Exp(F32x16 x) {
  const F32x16 lo = F32x16::Broadcast(-87.33654f), hi = F32x16::Broadcast(88.72283f);
  const uint16_t underflow = LessThan(x, lo);
  const uint16_t overflow = LessThan(hi, x);
  F32x16 xc = Min(Max(x, lo), hi);
  const F32x16 n = RoundNearest(xc * F32x16::Broadcast(1.44269504088896341f));
  F32x16 r = Fma(n, F32x16::Broadcast(-0.693359375f), xc);
  r = Fma(n, F32x16::Broadcast(2.12194440e-4f), r);
  F32x16 p = F32x16::Broadcast(1.9875691500e-4f);
  p = Fma(p, r, F32x16::Broadcast(1.3981999507e-3f));
  p = Fma(p, r, F32x16::Broadcast(8.3334519073e-3f));
  p = Fma(p, r, F32x16::Broadcast(4.1665795894e-2f));
  p = Fma(p, r, F32x16::Broadcast(1.6666665459e-1f));
  p = Fma(p, r, F32x16::Broadcast(5.0000001201e-1f));
  p = Fma(p * r, r, r + F32x16::Broadcast(1.0f));
  F32x16 y = Ldexp(p, n);
  y = Select(underflow, F32x16::Zero(), y);
  y = Select(overflow, F32x16::Broadcast(std::numeric_limits<float>::infinity()), y);
  return Select(NotNan(x), y, x);
}

/// tanh(x) per lane from Exp: sign(x) * (1 - 2 / (e^{2|x|} + 1)); absolute error below 2e-7.
inline F32x16 Tanh(F32x16 x) {
  const F32x16 one = F32x16::Broadcast(1.0f);
  const F32x16 e = Exp(Abs(x) * F32x16::Broadcast(2.0f));
  const F32x16 t = one - F32x16::Broadcast(2.0f) / (e + one);
  return Select(LessThan(x, F32x16::Zero()), F32x16::Zero() - t, t);
}

}  // namespace kraken::engine::cpu::KRAKEN_CPU_ISA
