// Element types of stored tensors (safetensors dtypes the engine reads) and scalar conversions.
//
//   float f = kraken::engine::Bf16ToF32(0x3f80);   // 1.0f
//   size_t bytes = kraken::engine::DTypeSize(DType::kBF16) * numel;
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace kraken::engine {

/// Storage type of a tensor: every safetensors dtype of whole bytes. The engine computes with
/// F32, F16 and BF16 weights; the others can be present in a file (buffers, token ids in test
/// files) and are refused only if a model tries to use them as weights.
enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kF64,
  kF8E4M3,
  kF8E5M2,
  kBool,
  kU8,
  kI8,
  kI16,
  kU16,
  kI32,
  kU32,
  kI64,
  kU64
};

/// Bytes per element of `t`.
constexpr size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF8E4M3:
    case DType::kF8E5M2:
    case DType::kBool:
    case DType::kU8:
    case DType::kI8:
      return 1;
    case DType::kF16:
    case DType::kBF16:
    case DType::kI16:
    case DType::kU16:
      return 2;
    case DType::kF32:
    case DType::kI32:
    case DType::kU32:
      return 4;
    case DType::kF64:
    case DType::kI64:
    case DType::kU64:
      return 8;
  }
  return 0;
}

/// True for the types the engine can compute with (F32, F16, BF16).
constexpr bool IsComputeFloat(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16;
}

/// The safetensors spelling of `t` ("F32", "F16", "BF16", "I32", "I64").
std::string_view DTypeName(DType t);
/// Parses a safetensors dtype string; nullopt for anything the engine does not read.
std::optional<DType> ParseDType(std::string_view name);

/// bfloat16 bits -> float (exact).
inline float Bf16ToF32(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// IEEE binary16 bits -> float (exact, handles subnormals, inf and NaN).
inline float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | mant << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// float -> bfloat16 bits, rounded to nearest even (PyTorch's .to(torch.bfloat16) for numbers);
/// values past the largest bfloat16 become infinities; every NaN becomes 0x7fff, the NaN CUDA's
/// __float2bfloat16_rn returns, so CPU and GPU KV caches hold the same bits.
inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

/// float -> IEEE binary16 bits, rounded to nearest even (IEEE 754 roundTiesToEven), including
/// into the subnormal range; magnitudes from 65520 up become infinities; every NaN becomes 0x7fff,
/// the NaN CUDA's __float2half_rn returns.
inline uint16_t F32ToF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                                 // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (or inf): inf
  if (a < 0x38800000u) {
    // Below 2^-14: a multiple of 2^-24, the spacing of half subnormals. Adding 0.5 (2^-1) to
    // |f| aligns that spacing with float's last mantissa bit, so the float addition performs
    // the round to nearest even; the low bits then hold the subnormal (0x400 = 2^-14, normal).
    float mag;
    std::memcpy(&mag, &a, sizeof mag);
    const float shifted = mag + 0.5f;
    uint32_t s;
    std::memcpy(&s, &shifted, sizeof s);
    return static_cast<uint16_t>(sign | (s - 0x3f000000u));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits; a carry
  // out of the mantissa correctly bumps the exponent.
  const uint32_t r = a - ((127u - 15u) << 23);
  return static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
}

/// Converts `n` elements of type `t` at `src` to float at `dst`. `t` must be IsComputeFloat.
void ConvertToF32(DType t, const void* src, float* dst, size_t n);

}  // namespace kraken::engine
