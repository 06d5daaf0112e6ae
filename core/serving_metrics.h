// The serving core's Prometheus metrics (names and buckets follow vLLM's where one exists; all carry
// the kraken_ prefix). Every label value comes from a fixed set: finish reasons, failure reasons,
// ranks, collective ops. Definitions: docs/metrics.md.
#pragma once

#include <string>
#include <vector>

#include "base/status.h"
#include "metrics/registry.h"

namespace kraken::core {

/// The KV cache as sized at start, for kraken_cache_config_info.
struct CacheConfig {
  int block_size = 0;  // tokens per block
  int num_blocks = 0;  // per worker
  double memory_utilization = 0;
  int64_t kv_cache_bytes = 0;  // per worker
  std::string cache_dtype;     // "F32", "BF16" or "F16"
  bool prefix_caching = false;
};

class ServingMetrics {
 public:
  /// Registers every serving metric in `reg`; the strings label kraken_build_info (cpu_kernels:
  /// the CPU kernel level in use, "avx2" or "avx512", engine/cpu/kernels.h).
  ServingMetrics(metrics::Registry& reg, int world_size, const std::string& version, const std::string& model,
                 const std::string& devices, const std::string& cpu_kernels);

  /// Counts a request that ended with `status` (not OK) in request_failure_total{reason}.
  void RecordFailure(const Status& status);
  /// Counts a successful request: finish_reason is "stop" or "length".
  void RecordSuccess(const std::string& finish_reason, double e2e_s);
  /// Counts a request that was not resumed after a worker failure, by why: "timeout" (the workers
  /// were not back within --resume-timeout), "deadline" (its own deadline fell in the pause) or
  /// "suspect" (it was alone in the step at a further failure). Its failure is counted too.
  void RecordResumeFailure(const char* reason);
  /// Publishes kraken_cache_config_info (vLLM's cache_config_info): call once, after the workers
  /// have sized the KV cache.
  void PublishCacheConfig(const CacheConfig& c);

  metrics::Histogram& ttft;
  metrics::Histogram& itl;
  metrics::Histogram& e2e;
  metrics::Histogram& queue_time;
  metrics::Histogram& prefill_time;
  metrics::Histogram& iteration_tokens;
  metrics::Counter& prompt_tokens;
  metrics::Counter& generation_tokens;
  metrics::Gauge& running;
  metrics::Gauge& waiting;
  metrics::Gauge& kv_usage;
  metrics::Counter& restarts;
  // Requests carried across a worker failure: each resumption, and the pause each saw (from the
  // failure to its next token).
  metrics::Counter& resumed;
  metrics::Histogram& resume_pause;
  // Prefix cache, in tokens (vLLM's prefix_cache_queries / prefix_cache_hits): tokens of admitted
  // sequences looked up, and those found cached. hits / queries is the hit rate.
  metrics::Counter& prefix_cache_queries;
  metrics::Counter& prefix_cache_hits;
  // Per rank, indexed by rank.
  std::vector<metrics::Counter*> busy, idle_collective, idle_no_work, idle_host, allreduce, exposed;
  std::vector<metrics::Gauge*> worker_up;
  // kraken_worker_memory_bytes{rank, kind}: what each worker holds, by kind.
  std::vector<metrics::Gauge*> memory_weights, memory_kv_cache, memory_activations, memory_scratch;

 private:
  // The per-rank families (busy, idle by reason, collectives, worker up, memory by kind), one
  // series per rank of a world of `world`, their pointers in the public vectors above.
  void AddRankFamilies(metrics::Registry& reg, int world);
  metrics::Family<metrics::Counter>& success_;
  metrics::Family<metrics::Counter>& failure_;
  metrics::Family<metrics::Counter>& resume_failure_;
  metrics::Registry& registry_;
};

/// The failure reason label of a status code: invalid_argument, resource_exhausted,
/// deadline_exceeded, cancelled, unavailable, unauthenticated, internal (everything else).
const char* FailureReason(const Status& status);

}  // namespace kraken::core
