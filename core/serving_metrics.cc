#include "core/serving_metrics.h"

#include <cstdio>

namespace kraken::core {
namespace {

// vLLM's buckets (vllm/engine/metrics.py), in seconds.
const std::vector<double> kTtftBuckets = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,  0.5,   0.75,
                                          1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
const std::vector<double> kItlBuckets = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                         0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
const std::vector<double> kRequestBuckets = {0.3,  0.5,  0.8,  1.0,  1.5,   2.0,   2.5,   5.0,   10.0,   15.0,  20.0,
                                             30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
const std::vector<double> kIterationBuckets = {1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384};

}  // namespace

const char* FailureReason(const Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
      return "invalid_argument";
    case absl::StatusCode::kResourceExhausted:
      return "resource_exhausted";
    case absl::StatusCode::kDeadlineExceeded:
      return "deadline_exceeded";
    case absl::StatusCode::kCancelled:
      return "cancelled";
    case absl::StatusCode::kUnavailable:
      return "unavailable";
    case absl::StatusCode::kUnauthenticated:
      return "unauthenticated";
    case absl::StatusCode::kNotFound:
      return "not_found";
    default:
      return "internal";
  }
}

ServingMetrics::ServingMetrics(metrics::Registry& reg, int world, const std::string& version, const std::string& model,
                               const std::string& devices, const std::string& cpu_kernels)
    : ttft(reg.AddHistogram("kraken_time_to_first_token_seconds",
                            "Time from a request's arrival (queueing included) to its first token handed to the "
                            "client stream; once per request that produced a token.",
                            {}, kTtftBuckets)
               .With({})),
      itl(reg.AddHistogram("kraken_inter_token_latency_seconds",
                           "Time between consecutive tokens of one request, as handed to the client stream.", {},
                           kItlBuckets)
              .With({})),
      e2e(reg.AddHistogram("kraken_e2e_request_latency_seconds",
                           "Time from arrival to the end of a successful request.", {}, kRequestBuckets)
              .With({})),
      queue_time(reg.AddHistogram("kraken_request_queue_time_seconds",
                                  "Time from arrival until the request is first scheduled.", {}, kTtftBuckets)
                     .With({})),
      prefill_time(reg.AddHistogram("kraken_request_prefill_time_seconds",
                                    "Time from first scheduled to the first token (the prefill, chunks included).", {},
                                    kTtftBuckets)
                       .With({})),
      iteration_tokens(reg.AddHistogram("kraken_iteration_tokens",
                                        "Tokens computed per engine step (batch size in tokens).", {},
                                        kIterationBuckets)
                           .With({})),
      prompt_tokens(reg.AddCounter("kraken_prompt_tokens_total", "Prompt tokens prefilled.", {}).With({})),
      generation_tokens(reg.AddCounter("kraken_generation_tokens_total", "Tokens generated.", {}).With({})),
      running(reg.AddGauge("kraken_num_requests_running", "Requests with KV cache in the workers.", {}).With({})),
      waiting(reg.AddGauge(
                     "kraken_num_requests_waiting",
                     "Requests accepted and not running: not yet scheduled, or preempted and waiting to be recomputed.",
                     {})
                  .With({})),
      kv_usage(
          reg.AddGauge("kraken_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0 to 1).", {}).With({})),
      restarts(reg.AddCounter("kraken_worker_restarts_total", "Times all workers were restarted after a failure.", {})
                   .With({})),
      resumed(reg.AddCounter("kraken_request_resumed_total",
                             "Times a request in flight was carried across a worker failure and resumed.", {})
                  .With({})),
      resume_pause(reg.AddHistogram("kraken_request_resume_pause_seconds",
                                    "Pause a resumed request saw: from the worker failure to its next token.", {},
                                    kItlBuckets)
                       .With({})),
      prefix_cache_queries(reg.AddCounter("kraken_prefix_cache_queries_total",
                                          "Tokens of admitted sequences looked up in the prefix cache.", {})
                               .With({})),
      prefix_cache_hits(reg.AddCounter("kraken_prefix_cache_hits_total",
                                       "Tokens of admitted sequences whose KV came from the prefix cache.", {})
                            .With({})),
      success_(reg.AddCounter("kraken_request_success_total", "Requests that finished, by finish reason.",
                              {"finish_reason"})),
      failure_(reg.AddCounter("kraken_request_failure_total",
                              "Requests that ended with an error or were refused, by reason.", {"reason"})),
      resume_failure_(reg.AddCounter("kraken_request_resume_failures_total",
                                     "Requests in flight at a worker failure that were not resumed, by reason: "
                                     "timeout (--resume-timeout), deadline, suspect (alone in the step at a further "
                                     "failure).",
                                     {"reason"})),
      registry_(reg) {
  for (const char* r : {"timeout", "deadline", "suspect"}) resume_failure_.With({r});
  for (const char* r : {"stop", "length"}) success_.With({r});
  for (const char* r : {"invalid_argument", "resource_exhausted", "deadline_exceeded", "cancelled", "unavailable",
                        "unauthenticated", "not_found", "internal"})
    failure_.With({r});
  AddRankFamilies(reg, world);
  reg.AddGauge("kraken_build_info", "Always 1; the labels describe the build and what it serves.",
               {"version", "model", "devices", "world_size", "cpu_kernels"})
      .With({version, model, devices, std::to_string(world), cpu_kernels})
      .Set(1);
  auto& errors = reg.AddCounter("kraken_metrics_errors_total",
                                "Observations skipped because they were invalid (negative or not finite).", {})
                     .With({});
  reg.AddCollector([&errors] { errors.SetTotal(static_cast<double>(metrics::MetricsErrors())); });
}

void ServingMetrics::AddRankFamilies(metrics::Registry& reg, int world) {
  auto& busy_f = reg.AddCounter("kraken_device_busy_seconds_total",
                                "Seconds each rank computed (collective waits excluded).", {"rank"});
  auto& idle_f = reg.AddCounter(
      "kraken_device_idle_seconds_total",
      "Seconds each rank was idle, by reason: collective_wait (compute waited on a collective), no_work (no "
      "request in the server), host (requests present, waiting for the front-end between steps).",
      {"rank", "reason"});
  auto& coll_f =
      reg.AddCounter("kraken_collective_seconds_total",
                     "Seconds collectives were in flight on each rank (hidden or not), by op.", {"rank", "op"});
  auto& exp_f =
      reg.AddCounter("kraken_collective_exposed_seconds_total",
                     "Seconds each rank's compute waited on a collective (communication not hidden).", {"rank"});
  auto& up_f = reg.AddGauge("kraken_worker_up", "1 while the rank's worker process is running.", {"rank"});
  auto& mem_f = reg.AddGauge("kraken_worker_memory_bytes",
                             "Bytes each rank's worker holds on its device, by kind: weights, kv_cache, activations "
                             "(buffers for the largest step), scratch (the backend's own).",
                             {"rank", "kind"});
  for (int r = 0; r < world; ++r) {
    const std::string rank = std::to_string(r);
    busy.push_back(&busy_f.With({rank}));
    idle_collective.push_back(&idle_f.With({rank, "collective_wait"}));
    idle_no_work.push_back(&idle_f.With({rank, "no_work"}));
    idle_host.push_back(&idle_f.With({rank, "host"}));
    allreduce.push_back(&coll_f.With({rank, "all_reduce"}));
    exposed.push_back(&exp_f.With({rank}));
    worker_up.push_back(&up_f.With({rank}));
    memory_weights.push_back(&mem_f.With({rank, "weights"}));
    memory_kv_cache.push_back(&mem_f.With({rank, "kv_cache"}));
    memory_activations.push_back(&mem_f.With({rank, "activations"}));
    memory_scratch.push_back(&mem_f.With({rank, "scratch"}));
  }
}

void ServingMetrics::RecordFailure(const Status& status) {
  failure_.With({FailureReason(status)}).Inc();
}

void ServingMetrics::RecordResumeFailure(const char* reason) {
  resume_failure_.With({reason}).Inc();
}

void ServingMetrics::RecordSuccess(const std::string& finish_reason, double e2e_s) {
  success_.With({finish_reason}).Inc();
  e2e.Observe(e2e_s);
}

void ServingMetrics::PublishCacheConfig(const CacheConfig& c) {
  char util[32];
  std::snprintf(util, sizeof util, "%g", c.memory_utilization);
  registry_
      .AddGauge("kraken_cache_config_info",
                "Always 1; the labels describe the KV cache of each worker as sized at start.",
                {"block_size", "num_gpu_blocks", "gpu_memory_utilization", "kv_cache_bytes", "cache_dtype",
                 "enable_prefix_caching"})
      .With({std::to_string(c.block_size), std::to_string(c.num_blocks), util, std::to_string(c.kv_cache_bytes),
             c.cache_dtype, c.prefix_caching ? "True" : "False"})
      .Set(1);
}

}  // namespace kraken::core
