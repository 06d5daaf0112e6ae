// What every backend does the same way: validating weight selections and loading vectors.
#include "engine/backend.h"

namespace kraken::engine {
namespace {

// Validates [begin, begin + count) ranges against `limit`, naming the tensor.
Status CheckRanges(const TensorInfo& t, const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t limit,
                   const char* what) {
  for (const auto& [b, n] : ranges) {
    if (b < 0 || n < 0 || b + n > limit) {
      return InvalidArgument("tensor '", t.name, "' ", t.ShapeString(), ": ", what, " range [", b, ", ", b + n,
                             ") is outside [0, ", limit, ")");
    }
  }
  return absl::OkStatus();
}

Status CheckComputeFloat(const TensorInfo& t) {
  if (IsComputeFloat(t.dtype)) return absl::OkStatus();
  return InvalidArgument("tensor '", t.name, "' has dtype ", DTypeName(t.dtype), "; expected F32, F16 or BF16");
}

}  // namespace

StatusOr<DeviceMemory> Backend::MemoryInfo() const {
  return Unimplemented("the ", name(), " backend does not report its device's memory");
}

StatusOr<LinearSelection> SelectLinear(const LinearSource& src) {
  const TensorInfo& t = *src.tensor;
  if (t.shape.size() != 2) {
    return InvalidArgument("tensor '", t.name, "' ", t.ShapeString(), " must be 2-D to be a matrix");
  }
  KRAKEN_RETURN_IF_ERROR(CheckComputeFloat(t));
  LinearSelection s;
  s.out_total = src.in_major ? t.shape[1] : t.shape[0];
  s.in_total = src.in_major ? t.shape[0] : t.shape[1];
  s.in_begin = src.in_begin;
  s.in = src.in_count < 0 ? s.in_total - s.in_begin : src.in_count;
  KRAKEN_RETURN_IF_ERROR(CheckRanges(t, {{s.in_begin, s.in}}, s.in_total, "input-feature"));
  std::vector<std::pair<int64_t, int64_t>> ranges(src.out_ranges.begin(), src.out_ranges.end());
  if (ranges.empty()) ranges.emplace_back(0, s.out_total);
  KRAKEN_RETURN_IF_ERROR(CheckRanges(t, ranges, s.out_total, "output-feature"));
  int64_t out = 0;
  for (const auto& r : ranges) out += r.second;
  if (out < 1 || s.in < 1 || out > (1 << 30) || s.in > (1 << 30)) {
    return InvalidArgument("tensor '", t.name, "' selects a ", out, " x ", s.in, " matrix; both must be in [1, 2^30]");
  }
  s.rows.reserve(out);
  for (const auto& [b, n] : ranges)
    for (int64_t r = b; r < b + n; ++r) s.rows.push_back(static_cast<int>(r));
  return s;
}

StatusOr<Buffer> Backend::PrepareVector(const TensorInfo& t, const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  KRAKEN_RETURN_IF_ERROR(CheckComputeFloat(t));
  KRAKEN_RETURN_IF_ERROR(CheckRanges(t, ranges, t.numel(), "element"));
  int64_t total = 0;
  for (const auto& r : ranges) total += r.second;
  std::vector<float> host(static_cast<size_t>(total));
  int64_t at = 0;
  const size_t es = DTypeSize(t.dtype);
  for (const auto& [b, n] : ranges) {
    ConvertToF32(t.dtype, t.data + b * es, host.data() + at, n);
    at += n;
  }
  KRAKEN_ASSIGN_OR_RETURN(Buffer buf, Allocate(total));
  Upload(host.data(), buf.data(), total);
  KRAKEN_RETURN_IF_ERROR(Synchronize());  // a device backend reports a failed copy here
  return buf;
}

}  // namespace kraken::engine
