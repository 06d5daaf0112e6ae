// One compute device, parsed once from its name and passed around as a value.
//
//   KRAKEN_ASSIGN_OR_RETURN(Device d, Device::Parse("cuda:3"));   // {kCuda, 3}
//   d.ToString();                                                 // "cuda:3"
#pragma once

#include <string>
#include <string_view>

#include "base/status.h"

namespace kraken::engine {

struct Device {
  enum class Kind { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int index = 0;  // CUDA ordinal, [0, 9999]; 0 for the CPU

  static Device Cpu() { return {}; }
  static Device Cuda(int index) { return {Kind::kCuda, index}; }
  /// "cpu", "cuda" (= cuda:0) or "cuda:<index>" with 1 to 4 digits. INVALID_ARGUMENT naming the
  /// text otherwise.
  static StatusOr<Device> Parse(std::string_view text);

  bool is_cuda() const { return kind == Kind::kCuda; }
  /// "cpu" or "cuda:<index>": what Parse reads back.
  std::string ToString() const;
  bool operator==(const Device&) const = default;
};

}  // namespace kraken::engine
