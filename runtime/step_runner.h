// What the serving core's engine (core/engine.h) needs of the workers: run a step, be supervised
// between steps, say when they are being recovered, and report per-rank figures. WorkerGroup
// (runtime/worker_group.h) is the implementation; tests drive the engine with a fake of their own.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "base/status.h"
#include "runtime/memory.h"
#include "runtime/protocol.h"

namespace kraken::runtime {

/// Rank 0's result of one step, pointing into the runner's memory: valid until the next RunStep.
struct StepResultView {
  std::span<const ResultSeq> seqs;
  const PromptLogprob* prompt_logprobs = nullptr;  // ResultSeq::prompt_logprob_offset indexes it
};

/// Timing of one rank, in seconds since the workers (re)started.
struct RankStatsSnapshot {
  int rank = 0;
  uint64_t steps = 0, collectives = 0;
  double busy_s = 0, exposed_comm_s = 0, collective_s = 0, idle_s = 0;
  bool up = false;
  WorkerMemory memory;  // as the rank reported it at its last start
};

class StepRunner {
 public:
  virtual ~StepRunner() = default;

  /// Runs one step. INVALID_ARGUMENT when the step exceeds the limits or the model refuses it;
  /// UNAVAILABLE when a worker failed during the step (the workers have been restarted when this
  /// returns: generation() changed); FAILED_PRECONDITION for a sequence that continues from a KV
  /// cache of an older generation; ABORTED once the runner has given up.
  virtual StatusOr<StepResultView> RunStep(std::span<const SeqStep> seqs) = 0;
  /// Checks the workers between steps: OK, UNAVAILABLE after a failure once they are restarted,
  /// ABORTED once the runner has given up. Thread: the RunStep thread.
  virtual Status Supervise() = 0;
  /// Abandons any restart under way and every later one (a server that must end now). Thread: any.
  virtual void CancelRestarts() = 0;
  /// `cb(true, cause)` on the RunStep thread when a failure is noticed, `cb(false, OK)` when the
  /// workers are back.
  virtual void set_recovery_callback(std::function<void(bool recovering, const Status& cause)> cb) = 0;
  /// Per-rank totals since the workers last started, one per rank in rank order.
  virtual std::vector<RankStatsSnapshot> Stats() const = 0;
  virtual int world_size() const = 0;
  /// Restarts so far.
  virtual int restarts() const = 0;
  /// Changes whenever the workers (and their KV caches) are started anew.
  virtual uint64_t generation() const = 0;
};

}  // namespace kraken::runtime
