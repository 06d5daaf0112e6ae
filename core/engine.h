// The serving core's engine: one thread that owns the worker group and the scheduler and turns
// submitted requests into forward steps, one after another, with continuous batching. Each
// iteration takes in new requests, drops cancelled ones and those past their deadline (their KV
// blocks are freed before the next step), asks the scheduler for a step, runs it on the workers
// and hands each sampled token to its request: detokenize, match stops, check lengths (CheckStop,
// core/finish.h), publish to the request's handle. It knows no protocol: front-ends translate.
//
// A worker failure loses no request (docs/runtime.md "Requests across a failure"): while the
// runtime restarts the workers the requests in flight pause (health NOT_SERVING); when the workers
// are back each is requeued with its prompt and every token it was given, recomputes its KV cache
// and goes on from its next sampling index, so it continues token for token as if nothing had
// happened (the engine is batch-invariant and each sample's random stream is indexed by its
// position). A paused request ends UNAVAILABLE when the workers are not back within
// resume_timeout, and at its own deadline (a request submitted during the restart waits in the
// hand-over queue and is judged after it). A request that was in the batch at kSuspectAfter
// failed steps with no sampled token between runs alone until it samples one; if the workers fail
// while it runs alone it is failed by name (it may be what crashes them) and the others go on.
// Such a request costs kSuspectAfter + 1 restarts of the runtime's budget (max_restarts). A
// step abandoned for shutdown is not a failure. Between steps the
// workers are supervised every supervise_interval; if the runtime gives up, every request fails
// and fatal() turns true (the server then exits non-zero).
//
// Threads: Submit, Wake and Stop from any thread; everything else runs on the engine thread, but
// for the pause watch, which finishes paused handles while the engine thread is inside a restart.
// The engine's own mutex guards only the hand-over queue; no callback (a handle's listener,
// on_serving) is ever called with it held.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <unordered_map>

#include "core/request.h"
#include "core/serving_metrics.h"
#include "runtime/step_runner.h"
#include "scheduler/scheduler.h"
#include "tokenizer/tokenizer.h"

namespace kraken::core {

struct EngineOptions {
  scheduler::SchedulerOptions scheduler;
  int context_length = 0;  // the model's n_positions: prompt + output never exceed it
  /// Told false while the workers are being recovered, true when they are back (health status).
  /// Called on the engine thread, holding no lock.
  std::function<void(bool serving)> on_serving;
  ServingMetrics* metrics = nullptr;  // optional
  /// How often the workers are checked while no step runs (WorkerGroup::Supervise): a worker that
  /// dies or hangs while the server is idle is noticed within this plus the heartbeat timeout.
  std::chrono::milliseconds supervise_interval{100};
  /// How long a request in flight waits for the workers to come back after a failure before it
  /// ends UNAVAILABLE (never past its own deadline). The server's --resume-timeout.
  std::chrono::milliseconds resume_timeout{60000};
};

/// Failed steps a request may be in, with no token sampled between, before it runs alone (Engine,
/// header comment).
inline constexpr int kSuspectAfter = 2;

class Engine {
 public:
  /// Starts the engine thread. `tok` must outlive the engine; without one (nullptr) requests get
  /// token ids and logprobs but no text, and may not have stop strings.
  /// `group`: the workers (runtime::WorkerGroup in the server; a fake in tests).
  Engine(std::unique_ptr<runtime::StepRunner> group, const tokenizer::Tokenizer* tok, const EngineOptions& options);
  ~Engine();  // Stop()

  /// Queues a request that arrived at `arrival` and must end by `deadline`
  /// (Clock::time_point::max() for none). RESOURCE_EXHAUSTED (naming the capacity) when the
  /// waiting queue is full, UNAVAILABLE when the engine is stopping or has failed. On success the
  /// request ends through its handle exactly once; max_tokens 0 ends at once with kLength
  /// (with prompt_logprobs, once the prompt is scored).
  /// INVALID_ARGUMENT for stop strings when the engine has no tokenizer.
  /// `params.n` must be 1 (INVALID_ARGUMENT otherwise: SubmitSamples takes more).
  StatusOr<std::shared_ptr<RequestHandle>> Submit(RequestParams params, Clock::time_point arrival,
                                                  Clock::time_point deadline);
  /// Queues `params.n` (>= 1) samples of one prompt as n requests, all or none (RESOURCE_EXHAUSTED
  /// when the waiting queue cannot take all n), and returns their handles in index order. Sample i
  /// samples with seed `params.sampling.seed + i` (mod 2^64), so sample 0 is the request with n = 1
  /// and sample i equals an n = 1 request with that seed, token for token. Samples 1..n-1 share the
  /// full KV blocks of sample 0's prompt once it is computed (scheduler::Scheduler::Add, fork_of)
  /// and compute only the prompt's last partial block themselves. Each ends through its own handle.
  StatusOr<std::vector<std::shared_ptr<RequestHandle>>> SubmitSamples(RequestParams params, Clock::time_point arrival,
                                                                      Clock::time_point deadline);
  /// Wakes the engine thread (a request was cancelled).
  void Wake();
  /// Requests still queued or running.
  int active() const { return active_count_.load(); }
  bool fatal() const { return fatal_.load(); }
  /// Ends the engine thread; requests still active end with UNAVAILABLE.
  void Stop();
  const runtime::StepRunner& group() const { return *group_; }

 private:
  void Loop();
  bool WaitForWork();  // false when told to stop
  void Admit();
  void Reap(Clock::time_point now);
  bool RunOneStep();
  // After the workers were restarted (their generation changed): drops the prefix cache, whose
  // blocks were in the lost KV pools. True when it did.
  bool ForgetLostCache();
  // Builds steps_ for `plan` (engine thread), marking first schedules.
  void BuildSteps(const scheduler::StepPlan& plan);
  void OnStepFailed(const Status& s, size_t planned);
  void OnToken(Request& r, const runtime::ResultSeq& res);
  // Publishes the prompt logprobs a step scored for `r` (entry j: position start_pos + 1 + j) that
  // it has not reported yet.
  void OnPromptLogprobs(Request& r, int32_t start_pos, std::span<const runtime::PromptLogprob> scored);
  // The tokens `r` has generated. The scheduler's sequence (prompt, then output) is their one
  // owner: it needs them to recompute a preempted sequence; everything else reads them here.
  std::span<const int32_t> Generated(const Request& r) const;
  // Between steps: WorkerGroup::Supervise at most every supervise_interval; a failure it finds
  // restarts the workers (health NOT_SERVING meanwhile); giving up makes the loop fatal.
  void Supervise();
  void OnRecovery(bool recovering, const Status& cause);
  // After the workers came back from a failure (`in_step`: a step failed; otherwise it was found
  // between steps): requeues every running request for recompute, fails a suspect that was alone
  // in the failed step, and drops what the pause watch ended.
  void Resume(const Status& cause, bool in_step);
  // The pause watch: while the workers restart (the engine thread is inside the runtime), a thread
  // of its own ends the requests whose resume timeout, deadline or cancellation falls in the pause.
  void StartPauseWatch(const std::string& cause);
  void StopPauseWatch();
  void PauseWatch();
  // Requests the pause watch ended: they leave without a second Finish.
  void DropEnded();
  // Metrics: per-rank totals (accumulated across worker restarts), idle split, gauges.
  void UpdateRankMetrics();
  void AccountIdle(Clock::time_point step_start);
  void AccountNoWork();
  void UpdateGauges();
  void End(uint64_t id, const Status& status, FinishReason reason = FinishReason::kNone, std::string stop_reason = "");
  void EndAll(const Status& status);
  // Ends `r` (its handle gets the status and the timings). Engine thread or, before Submit
  // returns, the submitting thread.
  static void Finish(RequestHandle& h, size_t num_generated, const std::optional<Clock::time_point>& scheduled,
                     const std::optional<Clock::time_point>& first_token, const Status& status, FinishReason reason,
                     std::string stop_reason);

  std::unique_ptr<runtime::StepRunner> group_;
  const tokenizer::Tokenizer* tok_;
  EngineOptions options_;
  scheduler::Scheduler sched_;

  std::mutex mu_;  // guards incoming_, stop_, wake_
  std::condition_variable cv_;
  std::deque<std::shared_ptr<RequestHandle>> incoming_;
  bool stop_ = false;
  bool wake_ = false;
  std::atomic<int> active_count_{0};
  // Requests accepted by Submit and not yet scheduled for the first time (the waiting queue's
  // occupancy as clients see it; preempted sequences do not count again).
  std::atomic<int> queued_{0};
  std::atomic<uint64_t> next_id_{1};
  std::atomic<bool> fatal_{false};

  // Engine thread only.
  std::unordered_map<uint64_t, std::unique_ptr<Request>> active_;
  std::vector<runtime::SeqStep> steps_;
  std::vector<int32_t> banned_;
  // Idle accounting: when the last step ended, and the span with no request.
  std::optional<Clock::time_point> last_step_end_, idle_begin_, idle_end_;
  Clock::time_point no_work_accounted_{};
  double host_idle_s_ = 0, no_work_s_ = 0;
  struct RankBase {
    double busy = 0, exposed = 0, collective = 0;
    runtime::RankStatsSnapshot last;
  };
  std::vector<RankBase> rank_base_;
  uint64_t stats_generation_ = 0;
  uint64_t cache_generation_ = 0;  // the workers' generation the prefix cache's blocks belong to
  Clock::time_point last_supervised_{};
  std::thread thread_;

  // The pause watch (StartPauseWatch .. StopPauseWatch), guarded by pause_mu_.
  struct Paused {
    std::shared_ptr<RequestHandle> handle;
    bool in_flight = false;  // scheduled before (resume timeout) or never (deadline, cancellation only)
    size_t generated = 0;
    std::optional<Clock::time_point> scheduled, first_token;
  };
  std::mutex pause_mu_;
  std::condition_variable pause_cv_;
  bool pause_stop_ = false;
  std::vector<Paused> paused_;
  Clock::time_point pause_begin_{};
  std::string pause_cause_;
  std::thread pause_thread_;
};

/// "stop", "length" or "none": the label a finish reason gets in metrics and logs.
const char* FinishReasonName(FinishReason reason);

}  // namespace kraken::core
