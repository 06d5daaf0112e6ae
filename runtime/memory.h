// How big each worker's KV cache is: sized from a memory budget, as vLLM sizes its cache from
// --gpu-memory-utilization / --kv-cache-memory, not from a fixed block count.
//
//   KvSizing sizing{.memory_utilization = 0.9};
//   WorkerMemory m{.weight_bytes = model->weight_bytes(), ...};
//   KRAKEN_ASSIGN_OR_RETURN(int64_t budget, KvBudgetBytes(sizing, gpu_memory_or_nullopt, m));
//
// The policy, per worker, in bytes:
// - `--kv-cache-memory B` (kv_cache_bytes > 0): the KV cache gets B.
// - A CUDA worker: utilization u of the GPU's total memory is for this worker; what it does not
//   use after its weights, activations and scratch are allocated goes to the KV cache:
//   free - (1 - u) * total (vLLM's definition of gpu_memory_utilization).
// - A CPU worker: its device memory is its share of the host's available memory (MemAvailable,
//   or the cgroup's limit less its usage when that is lower, read once by the front-end before the
//   workers start, divided evenly between the host's CPU workers); u of that share is for the
//   worker, and the KV cache gets u * share - (weights + activations + scratch).
// Then the front-end takes the smallest count of blocks any rank can hold, and no more than
// max_seqs full contexts (more could never be used at once).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "base/status.h"
#include "engine/backend.h"

namespace kraken::runtime {

/// The KV budget the front-end hands every worker (lives in the dispatch segment).
struct KvSizing {
  int64_t kv_cache_bytes = 0;                    // per worker; 0 = from memory_utilization
  double memory_utilization = 0.9;               // fraction of the device's memory a worker may use, all included
  int64_t host_share_bytes = 0;                  // CPU workers: this host's available memory / its CPU workers
  engine::DType kv_dtype = engine::DType::kF32;  // the KV cache's elements (F32, BF16 or F16; "auto" resolved)
};

/// One worker's memory, in bytes, as it reports it to the front-end (and the metrics).
struct WorkerMemory {
  int64_t device_bytes = 0;      // what memory_utilization applies to (GPU total, or the host share)
  int64_t weight_bytes = 0;      // engine::Model::weight_bytes()
  int64_t activation_bytes = 0;  // engine::Model::activation_bytes()
  int64_t scratch_bytes = 0;     // engine::Backend::scratch_bytes() after load
  int64_t kv_budget_bytes = 0;   // KvBudgetBytes
  int64_t kv_block_bytes = 0;    // one KV block across every attention slot of this shard
  int64_t kv_bytes = 0;          // the KV cache allocated (after the front-end's decision)

  /// Whole blocks the budget buys.
  int64_t kv_capacity_blocks() const { return kv_block_bytes > 0 ? kv_budget_bytes / kv_block_bytes : 0; }
};

/// The KV bytes one worker may allocate under `sizing`. `gpu` is the device's memory measured
/// after the weights, activations and scratch are allocated (nullopt for a CPU worker); `m` holds
/// their sizes. Never negative (a budget the weights already exceed is 0 and is refused by the
/// front-end with the numbers).
int64_t KvBudgetBytes(const KvSizing& sizing, const std::optional<engine::DeviceMemory>& gpu, const WorkerMemory& m);

/// Bytes of host memory this process may still use: MemAvailable from /proc/meminfo, lowered to
/// the cgroup's limit less its usage (v2 memory.max / memory.current, or v1
/// memory.limit_in_bytes / memory.usage_in_bytes) when the process runs in one with a limit.
/// `root` prefixes the paths (tests). UNAVAILABLE when /proc/meminfo cannot be read.
StatusOr<int64_t> HostAvailableBytes(const std::string& root = "");

/// "1.5 GiB" style text for logs and messages (binary units).
std::string FormatBytes(int64_t bytes);

}  // namespace kraken::runtime
