// The engine thread: owns the worker group and the scheduler, and turns admitted requests into
// forward steps, one after another, with continuous batching. Each iteration takes in new
// requests, drops cancelled ones and those past their deadline (their KV blocks are freed before
// the next step), asks the scheduler for a step, runs it on the workers and hands each sampled
// token to its request: detokenize, match stops, check lengths, publish output.
// A worker failure during a step fails the requests whose KV cache was lost with UNAVAILABLE
// (the runtime has restarted the workers by then) and serving goes on; if the runtime gives up,
// every request fails and fatal() turns true (the server then exits non-zero).
#pragma once

#include <condition_variable>
#include <functional>
#include <deque>
#include <memory>
#include <optional>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "runtime/worker_group.h"
#include "scheduler/scheduler.h"
#include "server/request.h"
#include "server/server_metrics.h"

namespace kraken::server {

struct EngineOptions {
  scheduler::SchedulerOptions scheduler;
  int context_length = 0;
  /// Told false while the workers are being recovered, true when they are back (health status).
  std::function<void(bool serving)> on_serving;
  ServerMetrics* metrics = nullptr;  // optional
  /// How often the workers are checked while no step runs (WorkerGroup::Supervise): a worker that
  /// dies or hangs while the server is idle is noticed within this plus the heartbeat timeout.
  std::chrono::milliseconds supervise_interval{100};
};

class EngineLoop {
 public:
  EngineLoop(std::unique_ptr<runtime::WorkerGroup> group, const tokenizer::Tokenizer& tok, const EngineOptions& options);
  ~EngineLoop();  // Stop()

  /// Queues a request. RESOURCE_EXHAUSTED (naming the capacity) when the waiting queue is full,
  /// UNAVAILABLE when the engine is stopping or has failed. On success the request ends through
  /// its Output, exactly once.
  Status Submit(std::shared_ptr<Request> r);
  /// Wakes the loop (a request was cancelled).
  void Wake();
  /// Requests still queued or running.
  int active() const { return active_count_.load(); }
  bool fatal() const { return fatal_.load(); }
  /// Ends the loop; requests still active end with UNAVAILABLE.
  void Stop();
  const runtime::WorkerGroup& group() const { return *group_; }

  /// Ends `r` with `status` (no more output) and publishes it. Thread: any, before Submit or on the
  /// engine thread.
  static void FinishRequest(Request& r, const Status& status, kraken::v1::FinishReason reason, std::string stop_reason);

 private:
  void Loop();
  void Admit();
  void Reap(Clock::time_point now);
  bool RunOneStep();
  // Between steps: WorkerGroup::Supervise at most every supervise_interval; a failure it finds
  // restarts the workers (health NOT_SERVING meanwhile); giving up makes the loop fatal.
  void Supervise();
  void OnToken(Request& r, const runtime::ResultSeq& res);
  // Metrics: per-rank totals (accumulated across worker restarts), idle split, gauges.
  void UpdateRankMetrics();
  void AccountIdle(Clock::time_point step_start);
  void UpdateGauges();
  void End(uint64_t id, const Status& status, kraken::v1::FinishReason reason = kraken::v1::FINISH_REASON_UNSPECIFIED,
           std::string stop_reason = "");

  std::unique_ptr<runtime::WorkerGroup> group_;
  const tokenizer::Tokenizer& tok_;
  EngineOptions options_;
  scheduler::Scheduler sched_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Request>> incoming_;
  bool stop_ = false;
  std::atomic<int> active_count_{0};
  // Requests accepted by Submit and not yet scheduled for the first time (the waiting queue's
  // occupancy as clients see it; preempted sequences do not count again).
  std::atomic<int> queued_{0};
  bool wake_ = false;  // guarded by mu_: Wake() was called
  std::atomic<bool> fatal_{false};

  // Engine thread only.
  std::unordered_map<uint64_t, std::shared_ptr<Request>> active_;
  std::vector<runtime::SeqStep> steps_;
  std::vector<int32_t> banned_;
  // Idle accounting (engine thread): when the last step ended, and the span with no request.
  std::optional<Clock::time_point> last_step_end_, idle_begin_, idle_end_;
  Clock::time_point no_work_accounted_{};
  double host_idle_s_ = 0, no_work_s_ = 0;
  struct RankBase {
    double busy = 0, exposed = 0, collective = 0;
    runtime::RankStatsSnapshot last;
  };
  std::vector<RankBase> rank_base_;
  uint64_t stats_generation_ = 0;
  Clock::time_point last_supervised_{};
  std::thread thread_;
};

}  // namespace kraken::server
