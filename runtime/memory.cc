#include "runtime/memory.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace kraken::runtime {
namespace {

// The first integer in `path`, or nullopt when the file is missing or holds no number ("max").
std::optional<int64_t> ReadNumber(const std::string& path) {
  std::ifstream in(path);
  long long v = 0;
  if (!(in >> v)) return std::nullopt;
  return static_cast<int64_t>(v);
}

// Limit less usage of the cgroup this process is in, if it has a limit.
std::optional<int64_t> CgroupAvailable(const std::string& root) {
  // v2: the unified hierarchy, as a container sees it mounted at /sys/fs/cgroup.
  if (auto limit = ReadNumber(root + "/sys/fs/cgroup/memory.max")) {
    const int64_t used = ReadNumber(root + "/sys/fs/cgroup/memory.current").value_or(0);
    return std::max<int64_t>(0, *limit - used);
  }
  // v1: "no limit" reads as a number near 2^63.
  if (auto limit = ReadNumber(root + "/sys/fs/cgroup/memory/memory.limit_in_bytes"); limit && *limit < (1ll << 60)) {
    const int64_t used = ReadNumber(root + "/sys/fs/cgroup/memory/memory.usage_in_bytes").value_or(0);
    return std::max<int64_t>(0, *limit - used);
  }
  return std::nullopt;
}

}  // namespace

int64_t KvBudgetBytes(const KvSizing& sizing, const std::optional<engine::DeviceMemory>& gpu, const WorkerMemory& m) {
  if (sizing.kv_cache_bytes > 0) return sizing.kv_cache_bytes;
  const double u = sizing.memory_utilization;
  int64_t budget = 0;
  if (gpu.has_value()) {
    budget = gpu->free - std::llround((1.0 - u) * static_cast<double>(gpu->total));
  } else {
    budget = std::llround(u * static_cast<double>(sizing.host_share_bytes)) - m.weight_bytes - m.activation_bytes -
             m.scratch_bytes;
  }
  return std::max<int64_t>(0, budget);
}

StatusOr<int64_t> HostAvailableBytes(const std::string& root) {
  std::ifstream in(root + "/proc/meminfo");
  if (!in) return absl::UnavailableError(StrCat("cannot read ", root, "/proc/meminfo"));
  std::string line;
  std::optional<int64_t> available;
  while (std::getline(in, line)) {
    long long kib = 0;
    if (std::sscanf(line.c_str(), "MemAvailable: %lld kB", &kib) == 1) available = kib * 1024;
  }
  if (!available) return absl::UnavailableError(StrCat(root, "/proc/meminfo has no MemAvailable line"));
  if (auto cg = CgroupAvailable(root)) return std::min(*available, *cg);
  return *available;
}

std::string FormatBytes(int64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, kUnits[u]);
  return buf;
}

}  // namespace kraken::runtime
