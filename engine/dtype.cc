#include "engine/dtype.h"

#include "base/status.h"

namespace kraken::engine {

namespace {

struct Named {
  DType type;
  std::string_view name;
};
constexpr Named kNames[] = {
    {DType::kF32, "F32"},        {DType::kF16, "F16"},        {DType::kBF16, "BF16"}, {DType::kF64, "F64"},
    {DType::kF8E4M3, "F8_E4M3"}, {DType::kF8E5M2, "F8_E5M2"}, {DType::kBool, "BOOL"}, {DType::kU8, "U8"},
    {DType::kI8, "I8"},          {DType::kI16, "I16"},        {DType::kU16, "U16"},   {DType::kI32, "I32"},
    {DType::kU32, "U32"},        {DType::kI64, "I64"},        {DType::kU64, "U64"},
};

}  // namespace

std::string_view DTypeName(DType t) {
  for (const Named& n : kNames) {
    if (n.type == t) return n.name;
  }
  return "?";
}

std::optional<DType> ParseDType(std::string_view name) {
  for (const Named& n : kNames) {
    if (n.name == name) return n.type;
  }
  return std::nullopt;
}

void ConvertToF32(DType t, const void* src, float* dst, size_t n) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kBF16: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, s + 2 * i, 2);
        dst[i] = Bf16ToF32(b);
      }
      return;
    }
    case DType::kF16: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, s + 2 * i, 2);
        dst[i] = F16ToF32(h);
      }
      return;
    }
    default:
      break;
  }
  KRAKEN_CHECK(false, "ConvertToF32 called with a dtype that is not F32, F16 or BF16");
}

}  // namespace kraken::engine
