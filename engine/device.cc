#include "engine/device.h"

#include <algorithm>

namespace kraken::engine {

StatusOr<Device> Device::Parse(std::string_view text) {
  if (text == "cpu") return Cpu();
  if (text == "cuda") return Cuda(0);
  constexpr std::string_view kCudaPrefix = "cuda:";
  const std::string_view digits =
      text.substr(0, kCudaPrefix.size()) == kCudaPrefix ? text.substr(kCudaPrefix.size()) : std::string_view();
  if (digits.empty() || digits.size() > 4 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return InvalidArgument("device '", text, "' is not 'cpu', 'cuda' or 'cuda:<index>'");
  }
  return Cuda(std::stoi(std::string(digits)));
}

const DeviceTraits& Device::traits() const {
  static constexpr DeviceTraits kCpu{.kind = "cpu",
                                     .collective = CollectiveLibrary::kGloo,
                                     .own_memory = false,
                                     .memory_name = "host memory",
                                     .default_memory_utilization = 0.1,
                                     .link_presets = true,
                                     .host_shm_bytes_per_rank = 0};
  // NCCL's host-memory transports and proxy buffers: its default buffer is 4 MiB per channel and
  // peer; 256 MiB is generous on purpose, as a short /dev/shm fails the first collective.
  static constexpr DeviceTraits kCuda{.kind = "cuda",
                                      .collective = CollectiveLibrary::kNccl,
                                      .own_memory = true,
                                      .memory_name = "GPU memory",
                                      .default_memory_utilization = 0.9,
                                      .link_presets = false,
                                      .host_shm_bytes_per_rank = 256ll << 20};
  switch (kind) {
    case Kind::kCpu:
      return kCpu;
    case Kind::kCuda:
      return kCuda;
  }
  return kCpu;
}

std::string Device::ToString() const {
  return is_cuda() ? StrCat("cuda:", index) : "cpu";
}

}  // namespace kraken::engine
