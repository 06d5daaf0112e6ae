// The front-end side of the multi-process runtime: spawns one worker process per device (this
// same binary in worker mode, via posix_spawn), hands every step plan to all of them through one
// shared-memory segment, returns rank 0's step result, and supervises them: a worker that exits,
// reports a failure, stops sending heartbeats for `heartbeat_timeout` or makes no progress in a
// step for `stall_timeout` (counted from when the step was published) fails the in-flight step
// with UNAVAILABLE, and all workers are torn down and started again (communicators rebuilt).
// Supervision runs inside RunStep and, between steps, in Supervise(), which the caller runs
// periodically so a worker that dies or hangs while the server is idle is noticed and replaced
// before the next request needs it. After more than `max_restarts` failures within
// `restart_window`, or more than `max_restarts` restarts in a row that fail to start (whatever
// the timers' ratio: a start that waits start_timeout for a node that never returns must not
// retry forever), the group gives up and every later call fails with ABORTED.
//
//   KRAKEN_ASSIGN_OR_RETURN(auto devices, ParseDevices("cpu:2"));
//   KRAKEN_ASSIGN_OR_RETURN(auto group, WorkerGroup::Start({.model_dir = dir, .devices = devices,
//                                                           .max_tokens = 512, .max_seqs = 16}));
//   SeqStep seq{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks};
//   KRAKEN_ASSIGN_OR_RETURN(StepResultView r, group->RunStep({&seq, 1}));
//   r.seqs[0].token;   // sampled by rank 0
//
// Nothing is left behind however the server ends: the dispatch segment is anonymous (memfd),
// Gloo's rendezvous store lives inside it, and each worker holds the read end of a pipe whose
// write end only the front-end has: when the front-end goes, its workers see end of file and exit.
// A restart loses every sequence's KV cache: generation() changes, and RunStep refuses a sequence
// that continues (start_pos > 0) from an older generation until it is prefilled again.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "engine/device.h"
#include "runtime/liveness.h"
#include "runtime/memory.h"
#include "runtime/protocol.h"
#include "runtime/remote_nodes.h"
#include "runtime/shm.h"
#include "runtime/step_runner.h"

namespace kraken::runtime {

struct WorkerGroupOptions {
  std::string model_dir;
  std::vector<engine::Device> devices = {engine::Device::Cpu()};  // one worker each (ParseDevices)
  int threads_per_worker = 0;                                     // CPU workers; 0 = cores / workers
  int max_tokens = 2048;                                          // new tokens per step
  int max_seqs = 64;                                              // sequences per step
  int max_context = 0;                                            // tokens per sequence; 0 = the model's n_positions
  int block_size = 16;
  int num_kv_blocks = 0;  // per worker; 0 = sized from kv_sizing when the workers start
  KvSizing kv_sizing;     // the KV budget (runtime/memory.h); host_share_bytes 0 = measured at start
  int max_history = 0;    // penalty history, banned ids, logit biases per step; 0 = room for max_seqs full ones
  std::string worker_binary = "/proc/self/exe";
  // Timers (docs/api.md "Timers"): each is the bound on one kind of silence.
  std::chrono::milliseconds start_timeout{120000};      // spawn to every rank ready
  std::chrono::milliseconds heartbeat_timeout{1000};    // a worker's heartbeat thread silent this long is hung
  std::chrono::milliseconds stall_timeout{60000};       // a published step with no progress event for this long
  std::chrono::milliseconds collective_timeout{30000};  // one Gloo/NCCL collective, inside the workers
  int max_restarts = 3;
  std::chrono::milliseconds restart_window{300000};  // failures counted over this sliding window
  std::string link_preset;                           // benchmarks only (engine/comm/link_model.h)
  double measured_gemm_flops = 0;
  // Multi-node groups (docs/runtime.md "Nodes"): `devices` lists every rank of the group, and
  // this process spawns ranks [first_rank, first_rank + local_ranks) (local_ranks 0: all).
  int first_rank = 0;
  int local_ranks = 0;
  std::shared_ptr<RemoteNodes> remote;        // the leader: the ranks on other nodes
  std::string collective_host = "127.0.0.1";  // the address this node's workers bind for collectives
};

/// The --devices grammar, parsed here and nowhere else: "cpu" (one CPU worker), "cpu:N" (N CPU
/// workers), "cuda:0-7", "cuda:0,2,5" or a mix of ranges and single CUDA ordinals -> one device
/// per worker, in rank order. INVALID_ARGUMENT naming the text otherwise (or a world size outside
/// [1, kMaxWorld]).
StatusOr<std::vector<engine::Device>> ParseDevices(const std::string& spec);

/// The segment limits Start would use for `options` (model config, devices and sizes), without
/// starting anything; ComputeLayout(limits).total is the dispatch segment's size in bytes.
/// Errors as Start's argument checks.
StatusOr<Limits> PlanLimits(const WorkerGroupOptions& options);

class WorkerGroup final : public StepRunner {
 public:
  /// Spawns and waits for every worker (bounded by start_timeout; the error names each rank that
  /// failed or did not report, and why).
  static StatusOr<std::unique_ptr<WorkerGroup>> Start(const WorkerGroupOptions& options);

  /// A follower node's share of a multi-node group: lays out a segment by the leader's `limits`,
  /// spawns ranks [first_rank, first_rank + local_ranks) of options.devices into it and returns
  /// without waiting; the leader supervises readiness through the node's reports
  /// (cluster/follower.h). Errors as Start's argument checks, or INTERNAL when a process cannot
  /// be spawned.
  static StatusOr<std::unique_ptr<WorkerGroup>> StartShare(const WorkerGroupOptions& options, const Limits& limits);
  /// A share's local ranks: OK, or UNAVAILABLE naming one that exited, failed or went silent.
  Status CheckShare() { return CheckWorkers(/*in_step=*/false); }
  /// A share: the KV block count the leader decided (< 0: none fits).
  void SetKvBlocks(int32_t blocks);
  /// A share: whether every local rank is done with the last plan (the plan area may be reused).
  bool PlanAreaFree() const;
  /// A share: copies step `step`'s plan (the parts PlanWriter wrote on the leader) into the
  /// segment and wakes the local ranks. FAILED_PRECONDITION unless PlanAreaFree(); INVALID_ARGUMENT
  /// when a part is larger than its area or disagrees with the header's counts.
  Status PublishPlan(uint64_t step, std::string_view header, std::string_view seqs, std::string_view tokens,
                     std::string_view blocks, std::string_view history);
  /// Kills the workers at once (no orderly shutdown: a follower told to stop, whose peers are gone).
  void Kill() { KillAll(); }
  /// The segment's control block and rendezvous store area (a share reports from them).
  const Control& control() const { return *control_; }
  StoreSlot* store_slots() const { return At<StoreSlot>(segment_->data(), layout_.store); }
  size_t store_slot_count() const { return layout_.store_slots; }
  /// First rank after this process's own.
  int local_end() const { return local_begin() + local_count(); }
  int local_begin() const { return options_.first_rank; }
  ~WorkerGroup();  // Shutdown()

  /// Runs one step. INVALID_ARGUMENT (nothing sent) when the step exceeds the limits; the model's
  /// own validation errors come back from the workers with their message; UNAVAILABLE when a
  /// worker failed during the step (the workers have been restarted when this returns);
  /// FAILED_PRECONDITION for a sequence that continues from a KV cache lost in a restart;
  /// ABORTED once the group has given up (after more than max_restarts failures within
  /// restart_window).
  StatusOr<StepResultView> RunStep(std::span<const SeqStep> seqs) override;

  /// Checks the workers between steps: reaps any that exited, and treats a reported failure or a
  /// heartbeat silent for more than heartbeat_timeout as a failure (restart, as in RunStep).
  /// OK when all are well; UNAVAILABLE (naming the rank and why) after a failure once the workers
  /// have been restarted; ABORTED once the group has given up. Cheap (a waitpid and two atomic
  /// loads per rank): call it every ~100 ms while no step runs. Thread: the RunStep thread.
  Status Supervise() override;

  /// Asks the workers to exit, waits up to 5 s, then kills what is left. Idempotent.
  void Shutdown();

  /// Abandons any start or restart under way and every later one: a wait for workers or nodes
  /// returns within 50 ms, and the group then fails every call with UNAVAILABLE ("the server is
  /// stopping"). For a server that must end within its grace period whatever the workers do.
  /// Thread: any (the RunStep thread may be inside a restart).
  void CancelRestarts() override;

  /// Called on the calling thread of RunStep when a worker failure has been noticed (`true`, with
  /// the cause: the in-flight step will fail) and again when the workers are back (`false`). The
  /// server uses it to fail streams at once and to report NOT_SERVING while recovering.
  void set_recovery_callback(std::function<void(bool recovering, const Status& cause)> cb) override {
    recovery_cb_ = std::move(cb);
  }

  std::vector<RankStatsSnapshot> Stats() const override;
  int world_size() const override { return static_cast<int>(options_.devices.size()); }
  const Limits& limits() const { return limits_; }
  /// Restarts so far.
  int restarts() const override { return restarts_total_; }
  /// Changes whenever the workers (and their KV caches) are started anew.
  uint64_t generation() const override { return generation_; }
  std::vector<pid_t> worker_pids() const { return pids_; }
  /// When the last worker failure was noticed (epoch if none).
  std::chrono::steady_clock::time_point last_failure_noticed() const { return failure_noticed_; }

 private:
  WorkerGroup() = default;
  int local_count() const { return options_.local_ranks > 0 ? options_.local_ranks : world_size(); }
  bool IsLocal(int r) const { return r >= local_begin() && r < local_end(); }
  // Ranks this process supervises: all on the leader (remote slots mirror their nodes' reports),
  // the local ones in a share.
  bool IsChecked(int r) const { return !share_ || IsLocal(r); }
  // For reports: "pid 123" for a local rank, the remote node for another.
  std::string Where(int r) const;
  Status Launch();  // segment, lifeline, processes, wait ready; cleans up on failure
  Status LaunchOnce();
  // Spawns one worker per device with the segment and the lifeline's read end (closed here).
  Status Spawn(int lifeline_read);
  // Until every rank is ready: UNAVAILABLE naming a rank that failed or exited (and why),
  // DEADLINE_EXCEEDED naming the ranks not ready after start_timeout.
  Status WaitReady();
  // Once every rank has loaded: the KV blocks per worker (the smallest capacity any rank reported,
  // at most max_seqs full contexts) into the segment. RESOURCE_EXHAUSTED with the numbers when that
  // is not one full context.
  Status DecideKvBlocks();
  void KillAll();  // SIGKILL, reap, clean up
  // OK, or UNAVAILABLE naming a dead, failed, silent or stuck rank (exits are preferred: a peer's
  // death makes the others report failed collectives).
  Status CheckWorkers(bool in_step);
  bool Reap(int rank, std::string* why);              // true when the worker is gone
  Status Recover(const Status& cause, bool in_step);  // after a failure: restart or give up
  // After CheckWorkers reported `health`: waits a moment, checks again (so an exit is blamed
  // rather than the peers' failed collectives it caused), then Recover.
  Status RecoverFrom(const Status& health, bool in_step, std::string_view context);

  WorkerGroupOptions options_;
  Limits limits_;
  Layout layout_{};
  std::unique_ptr<SharedSegment> segment_;
  Control* control_ = nullptr;
  int lifeline_ = -1;  // write end; closing it tells the workers to go
  std::vector<pid_t> pids_;
  // How each reaped worker ended: the words for reports, and whether it exited WorkerExit::kFailed
  // (which a peer's death makes every rank do) rather than dying on its own.
  struct Exit {
    std::string why;
    bool peer_failure = false;
  };
  std::vector<Exit> exits_;
  bool share_ = false;  // a follower node's share: no readiness wait, no plan writer
  uint64_t generation_ = 0;
  uint64_t step_ = 0;
  uint64_t step_published_ns_ = 0;  // NowNs() when step_ was handed to the workers
  int restarts_total_ = 0;
  std::vector<std::chrono::steady_clock::time_point> restart_times_;
  Status dead_ = absl::OkStatus();
  std::atomic<bool> cancelled_{false};  // CancelRestarts
  // Per rank: how long its heartbeat thread and its serving thread have been silent by their own
  // fault (CheckWorkers).
  std::vector<SilenceClock> heartbeat_clocks_, progress_clocks_;
  uint64_t last_liveness_check_ns_ = 0;
  OwnWaitMeter judge_meter_;  // the checking thread's own run-queue wait between judgements
  std::function<void(bool, const Status&)> recovery_cb_;
  std::chrono::steady_clock::time_point failure_noticed_{};
};

}  // namespace kraken::runtime
