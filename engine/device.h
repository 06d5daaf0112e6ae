// One compute device, parsed once from its name and passed around as a value, and what its kind
// is and can do (DeviceTraits): runtime/, server/ and cluster/ ask a device these questions instead
// of branching on its kind, so a new kind is one more row in device.cc, a Backend
// (engine/backend.h; the factory is engine/backend_factory.cc) and a Communicator.
//
//   KRAKEN_ASSIGN_OR_RETURN(Device d, Device::Parse("cuda:3"));   // {kCuda, 3}
//   d.ToString();                                                 // "cuda:3"
//   d.traits().collective;                                        // CollectiveLibrary::kNccl
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/status.h"

namespace kraken::engine {

/// The library that carries the collectives (AllReduce) between one kind's ranks.
enum class CollectiveLibrary { kGloo, kNccl };

/// What a kind of device is and can do.
struct DeviceTraits {
  std::string_view kind;  // "cpu", "cuda": what its devices' names start with
  CollectiveLibrary collective = CollectiveLibrary::kGloo;
  /// Memory of its own, which its backend measures (Backend::MemoryInfo); false: its workers share
  /// the host's available memory.
  bool own_memory = false;
  std::string_view memory_name;             // in messages: "GPU memory", "host memory"
  double default_memory_utilization = 0.1;  // --memory-utilization when unset (fraction of that memory)
  /// --link-preset (an interconnect emulated over the host collective) applies to its ranks.
  bool link_presets = false;
  /// /dev/shm (bytes) its collective library needs per rank beyond the worker segment
  /// (--print-resources).
  int64_t host_shm_bytes_per_rank = 0;
};

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
  /// What its kind is and can do.
  const DeviceTraits& traits() const;
  /// "cpu" or "cuda:<index>": what Parse reads back.
  std::string ToString() const;
  bool operator==(const Device&) const = default;
};

}  // namespace kraken::engine
