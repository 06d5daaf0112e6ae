#include "runtime/worker_group.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <thread>

#include "engine/model_config.h"
#include "runtime/worker.h"

extern char** environ;

namespace kraken::runtime {
namespace {

constexpr int64_t kPollNs = 50'000'000;            // 50 ms between supervision checks while waiting
constexpr uint64_t kLivenessCheckNs = 20'000'000;  // heartbeats and progress judged at most every 20 ms

std::string DescribeExit(int status) {
  if (WIFSIGNALED(status))
    return StrCat("was killed by signal ", WTERMSIG(status), " (", strsignal(WTERMSIG(status)), ")");
  return StrCat("exited with status ", WEXITSTATUS(status));
}

}  // namespace

StatusOr<std::vector<engine::Device>> ParseDevices(const std::string& spec) {
  auto bad = [&] { return InvalidArgument("devices '", spec, "' is not one of cpu, cpu:N, cuda:A-B, cuda:A,B,..."); };
  const size_t colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  const std::string rest = colon == std::string::npos ? "" : spec.substr(colon + 1);
  std::vector<engine::Device> out;
  auto number = [](const std::string& s, int* v) {
    if (s.empty() || s.size() > 4 || s.find_first_not_of("0123456789") != std::string::npos) return false;
    *v = std::stoi(s);
    return true;
  };
  if (kind == "cpu") {
    int n = 1;
    if (!rest.empty() && !number(rest, &n)) return bad();
    if (n < 1 || n > kMaxWorld) return InvalidArgument("devices '", spec, "': 1 to ", kMaxWorld, " CPU workers");
    out.assign(n, engine::Device::Cpu());
  } else if (kind == "cuda") {
    size_t start = 0;
    while (start <= rest.size()) {
      size_t comma = rest.find(',', start);
      if (comma == std::string::npos) comma = rest.size();
      const std::string item = rest.substr(start, comma - start);
      const size_t dash = item.find('-');
      int a = 0, b = 0;
      if (dash == std::string::npos) {
        if (!number(item, &a)) return bad();
        b = a;
      } else if (!number(item.substr(0, dash), &a) || !number(item.substr(dash + 1), &b) || b < a) {
        return bad();
      }
      for (int i = a; i <= b && static_cast<int>(out.size()) <= kMaxWorld; ++i) out.push_back(engine::Device::Cuda(i));
      start = comma + 1;
    }
    if (out.empty() || static_cast<int>(out.size()) > kMaxWorld) return bad();
  } else {
    return bad();
  }
  return out;
}

StatusOr<Limits> PlanLimits(const WorkerGroupOptions& o) {
  const std::vector<engine::Device>& devices = o.devices;
  if (devices.empty() || static_cast<int>(devices.size()) > kMaxWorld) {
    return InvalidArgument("a worker group needs 1 to ", kMaxWorld, " devices, got ", devices.size());
  }
  KRAKEN_ASSIGN_OR_RETURN(engine::ModelConfig cfg, engine::LoadModelConfig(o.model_dir));
  const int context = o.max_context > 0 ? o.max_context : cfg.n_positions;
  if (context > cfg.n_positions) {
    return InvalidArgument("max_context ", context, " exceeds the model's n_positions ", cfg.n_positions);
  }
  if (o.max_tokens < 1 || o.max_seqs < 1 || o.block_size < 1) {
    return InvalidArgument("max_tokens, max_seqs and block_size must be >= 1");
  }
  Limits l;
  l.world_size = static_cast<int>(devices.size());
  l.max_tokens = o.max_tokens;
  l.max_seqs = o.max_seqs;
  l.block_size = o.block_size;
  l.max_blocks_per_seq = (context + o.block_size - 1) / o.block_size;
  if (o.num_kv_blocks < 0) return InvalidArgument("num_kv_blocks must be >= 0, got ", o.num_kv_blocks);
  if (o.num_kv_blocks > 0 && o.num_kv_blocks < l.max_blocks_per_seq) {
    // Otherwise a sequence could outgrow the whole cache and wait for blocks forever.
    return InvalidArgument("--num-kv-blocks ", o.num_kv_blocks, " is below one full context (", l.max_blocks_per_seq,
                           " blocks of ", o.block_size, " tokens)");
  }
  if (o.kv_sizing.kv_cache_bytes < 0) {
    return InvalidArgument("--kv-cache-memory must be >= 0 bytes, got ", o.kv_sizing.kv_cache_bytes);
  }
  if (!(o.kv_sizing.memory_utilization > 0 && o.kv_sizing.memory_utilization <= 1)) {
    return InvalidArgument("--memory-utilization must be in (0, 1], got ", o.kv_sizing.memory_utilization);
  }
  if (!engine::IsComputeFloat(o.kv_sizing.kv_dtype)) {
    return InvalidArgument("--kv-cache-dtype must be f32, bf16 or f16, got ", engine::DTypeName(o.kv_sizing.kv_dtype));
  }
  l.num_kv_blocks = o.num_kv_blocks;  // 0: decided when the workers have loaded (DecideKvBlocks)
  // Per sequence: its prompt and output (at most the context), the ids banned while min_tokens is
  // not reached (stop ids and EOS: at most 65) and its logit biases (two slots each).
  constexpr int kBannedSlots = 128;
  l.max_history = o.max_history > 0 ? o.max_history : o.max_seqs * (context + kBannedSlots + 2 * engine::kMaxLogitBias);
  l.vocab_size = cfg.vocab_size;
  return l;
}

StatusOr<std::unique_ptr<WorkerGroup>> WorkerGroup::Start(const WorkerGroupOptions& o) {
  std::unique_ptr<WorkerGroup> g(new WorkerGroup());
  g->options_ = o;
  KRAKEN_ASSIGN_OR_RETURN(g->limits_, PlanLimits(o));
  if (o.remote && MaxPlanBytes(g->limits_) > kMaxNodePlanBytes) {
    return InvalidArgument("a step plan of these limits may take ", MaxPlanBytes(g->limits_) >> 20, " MiB (",
                           g->limits_.max_seqs, " sequences of up to ", g->limits_.max_blocks_per_seq, " KV blocks, ",
                           g->limits_.max_history, " penalty-history tokens); a multi-node group sends ",
                           "each plan to every node in one message of at most ", kMaxNodePlanBytes >> 20,
                           " MiB: lower --max-batch-seqs");
  }
  g->layout_ = ComputeLayout(g->limits_);
  if (o.first_rank < 0 || o.local_ranks < 0 || o.first_rank + g->local_count() > g->world_size()) {
    return InvalidArgument("local ranks [", o.first_rank, ", ", o.first_rank + g->local_count(),
                           ") are not within a world of ", g->world_size());
  }
  int cpu_workers = 0;  // the local workers that share the host's memory
  for (int r = g->local_begin(); r < g->local_end(); ++r) cpu_workers += o.devices[r].traits().own_memory ? 0 : 1;
  if (cpu_workers > 0 && g->options_.kv_sizing.host_share_bytes == 0) {
    KRAKEN_ASSIGN_OR_RETURN(const int64_t available, HostAvailableBytes());
    g->options_.kv_sizing.host_share_bytes = available / cpu_workers;
  }
  KRAKEN_RETURN_IF_ERROR(g->Launch());
  return g;
}

StatusOr<std::unique_ptr<WorkerGroup>> WorkerGroup::StartShare(const WorkerGroupOptions& o, const Limits& limits) {
  std::unique_ptr<WorkerGroup> g(new WorkerGroup());
  g->options_ = o;
  g->options_.remote = nullptr;
  g->share_ = true;
  if (limits.world_size != g->world_size()) {
    return InvalidArgument("the leader's world size ", limits.world_size, " differs from the ", g->world_size(),
                           " devices this node was given");
  }
  if (o.first_rank < 0 || o.local_ranks < 1 || o.first_rank + o.local_ranks > g->world_size()) {
    return InvalidArgument("local ranks [", o.first_rank, ", ", o.first_rank + o.local_ranks,
                           ") are not within a world of ", g->world_size());
  }
  g->limits_ = limits;
  g->layout_ = ComputeLayout(limits);
  if (g->options_.kv_sizing.host_share_bytes == 0) {
    KRAKEN_ASSIGN_OR_RETURN(const int64_t available, HostAvailableBytes());
    g->options_.kv_sizing.host_share_bytes = available / o.local_ranks;
  }
  KRAKEN_RETURN_IF_ERROR(g->Launch());
  return g;
}

std::string WorkerGroup::Where(int r) const {
  if (!IsLocal(r) && options_.remote) return options_.remote->Where(r);
  return StrCat("pid ", pids_.empty() ? -1 : pids_[r]);
}

void WorkerGroup::SetKvBlocks(int32_t blocks) {
  if (control_ == nullptr) return;
  if (blocks > 0) {
    limits_.num_kv_blocks = blocks;
    control_->limits.num_kv_blocks = blocks;
  }
  control_->kv_blocks.store(blocks, std::memory_order_release);
}

Status WorkerGroup::Launch() {
  Status s = LaunchOnce();
  if (!s.ok()) KillAll();
  return s;
}

Status WorkerGroup::LaunchOnce() {
  KRAKEN_ASSIGN_OR_RETURN(segment_, SharedSegment::Create(layout_.total));
  control_ = new (segment_->data()) Control();
  control_->magic = kMagic;
  control_->version = kProtocolVersion;
  control_->limits = limits_;
  control_->kv_sizing = options_.kv_sizing;
  // Fixed by a flag, or by the first start (a restart must keep the scheduler's block count).
  if (limits_.num_kv_blocks > 0) control_->kv_blocks.store(limits_.num_kv_blocks, std::memory_order_release);
  for (size_t i = 0; i < layout_.store_slots; ++i)
    new (segment_->data() + layout_.store + i * sizeof(StoreSlot)) StoreSlot();
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0)
    return Internal("cannot create the workers' lifeline pipe: ", std::strerror(errno));
  lifeline_ = pipe_fds[1];
  const int lifeline_read = pipe_fds[0];
  ++generation_;
  heartbeat_clocks_.assign(world_size(), SilenceClock(/*runnable_is_waiting=*/true));
  progress_clocks_.assign(world_size(), SilenceClock());
  if (options_.remote) {
    const uint64_t deadline = NowNs() + static_cast<uint64_t>(options_.start_timeout.count()) * 1'000'000;
    Status joined = options_.remote->Start(generation_, segment_->data(), layout_, deadline);
    if (!joined.ok()) {
      ::close(lifeline_read);
      return joined;
    }
  }
  KRAKEN_RETURN_IF_ERROR(Spawn(lifeline_read));
  if (!share_) KRAKEN_RETURN_IF_ERROR(WaitReady());
  step_ = 0;
  return absl::OkStatus();
}

Status WorkerGroup::Spawn(int lifeline_read) {
  const int world = world_size();
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  const int threads =
      options_.threads_per_worker > 0 ? options_.threads_per_worker : std::max(1, cores / local_count());
  // Workers get the segment and the lifeline's read end at fixed descriptors, nothing else (the
  // front-end's descriptors are close-on-exec), their own process group (a Ctrl-C or a group
  // signal meant for the front-end does not reach them) and default signal handling.
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, segment_->fd(), kSegmentFd);
  posix_spawn_file_actions_adddup2(&actions, lifeline_read, kLifelineFd);
  posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2}) sigaddset(&defaults, sig);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
  pids_.assign(world, -1);
  exits_.assign(world, {});
  Status spawned = absl::OkStatus();
  for (int r = local_begin(); r < local_end() && spawned.ok(); ++r) {
    WorkerArgs a{.segment_bytes = layout_.total,
                 .rank = r,
                 .world = world,
                 .model_dir = options_.model_dir,
                 .device = options_.devices[r],
                 .threads = threads,
                 .parent_pid = static_cast<int>(getpid()),
                 .collective_timeout_ms = static_cast<int>(options_.collective_timeout.count()),
                 .link_preset = options_.link_preset,
                 .measured_gemm_flops = options_.measured_gemm_flops,
                 .collective_host = options_.collective_host};
    std::vector<std::string> args = WorkerCommandLine(a);
    args.insert(args.begin(), options_.worker_binary);
    std::vector<char*> argv;
    for (std::string& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, options_.worker_binary.c_str(), &actions, &attr, argv.data(), environ);
    if (rc != 0) {
      spawned = Internal("cannot start worker rank ", r, " ('", options_.worker_binary, "'): ", std::strerror(rc));
    } else {
      pids_[r] = pid;
    }
  }
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  ::close(lifeline_read);
  return spawned;
}

Status WorkerGroup::WaitReady() {
  const int world = world_size();
  const uint64_t deadline = NowNs() + static_cast<uint64_t>(options_.start_timeout.count()) * 1'000'000;
  for (;;) {
    int ready = 0, loaded = 0;
    for (int r = 0; r < world; ++r) {
      RankSlot& s = control_->ranks[r];
      const auto state = static_cast<RankState>(s.state.load(std::memory_order_acquire));
      if (state == RankState::kReady || state == RankState::kLoaded) {
        ++loaded;
        ready += state == RankState::kReady ? 1 : 0;
        continue;
      }
      std::string why;
      if (state == RankState::kFailed) {
        why = s.message;
      } else if (!IsLocal(r) || !Reap(r, &why)) {
        continue;
      }
      return absl::UnavailableError(
          StrCat("worker rank ", r, " (", options_.devices[r].ToString(), ") failed to start: ", why));
    }
    if (ready == world) break;
    if (options_.remote) options_.remote->ExchangeStore();
    if (loaded == world && control_->kv_blocks.load(std::memory_order_acquire) == 0) {
      Status decided = DecideKvBlocks();
      if (options_.remote) options_.remote->SetKvBlocks(control_->kv_blocks.load(std::memory_order_acquire));
      KRAKEN_RETURN_IF_ERROR(decided);
    }
    if (cancelled_.load()) return absl::CancelledError("the server is stopping");
    if (NowNs() > deadline) {
      std::string late;
      for (int r = 0; r < world; ++r) {
        if (control_->ranks[r].state.load() != static_cast<uint32_t>(RankState::kReady)) {
          StrAppend(&late, late.empty() ? "" : ", ", r);
        }
      }
      return absl::DeadlineExceededError(
          StrCat("worker rank(s) ", late, " did not become ready within ", options_.start_timeout.count(), " ms"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(options_.remote ? 5 : 20));
  }
  return absl::OkStatus();
}

Status WorkerGroup::DecideKvBlocks() {
  int limiting = 0;
  for (int r = 1; r < world_size(); ++r) {
    if (control_->ranks[r].memory.kv_capacity_blocks() < control_->ranks[limiting].memory.kv_capacity_blocks()) {
      limiting = r;
    }
  }
  const WorkerMemory& m = control_->ranks[limiting].memory;
  const int64_t useful = static_cast<int64_t>(limits_.max_seqs) * limits_.max_blocks_per_seq;
  const int64_t blocks = std::min(m.kv_capacity_blocks(), useful);
  if (blocks < limits_.max_blocks_per_seq) {
    control_->kv_blocks.store(-1, std::memory_order_release);
    const KvSizing& k = options_.kv_sizing;
    std::string budget;
    if (k.kv_cache_bytes > 0) {
      budget = StrCat("--kv-cache-memory ", k.kv_cache_bytes, " bytes");
    } else if (options_.devices[limiting].traits().own_memory) {
      budget = StrCat("--memory-utilization ", k.memory_utilization, " of ", FormatBytes(m.device_bytes), " of ",
                      options_.devices[limiting].traits().memory_name, ", less what is in use");
    } else {
      budget =
          StrCat("--memory-utilization ", k.memory_utilization, " of this worker's ", FormatBytes(m.device_bytes),
                 " share of available host memory, less ", FormatBytes(m.weight_bytes), " of weights, ",
                 FormatBytes(m.activation_bytes), " of activations and ", FormatBytes(m.scratch_bytes), " of scratch");
    }
    return ResourceExhausted("the KV cache cannot hold one full-context sequence: rank ", limiting, " (",
                             options_.devices[limiting].ToString(), ") has ", FormatBytes(m.kv_budget_bytes),
                             " for it (", budget, "), ", m.kv_capacity_blocks(), " blocks of ", limits_.block_size,
                             " tokens at ", FormatBytes(m.kv_block_bytes),
                             " each, and one full-context sequence needs ", limits_.max_blocks_per_seq, " blocks (",
                             FormatBytes(m.kv_block_bytes * limits_.max_blocks_per_seq),
                             "): raise --kv-cache-memory or --memory-utilization");
  }
  limits_.num_kv_blocks = static_cast<int32_t>(blocks);
  control_->limits.num_kv_blocks = limits_.num_kv_blocks;
  control_->kv_blocks.store(limits_.num_kv_blocks, std::memory_order_release);
  return absl::OkStatus();
}

bool WorkerGroup::Reap(int r, std::string* why) {
  if (!IsLocal(r)) return false;  // a remote rank's end arrives as its node's report (kFailed)
  if (pids_[r] <= 0) {
    *why = exits_[r].why.empty() ? "is gone" : exits_[r].why;
    return true;
  }
  int status = 0;
  pid_t got;
  do {
    got = waitpid(pids_[r], &status, WNOHANG);
  } while (got < 0 && errno == EINTR);
  if (got == 0) return false;
  const pid_t pid = pids_[r];
  pids_[r] = -1;
  *why = got == pid ? StrCat("(pid ", pid, ") ", DescribeExit(status))
                    : StrCat("(pid ", pid, ") is gone (reaped elsewhere: ", std::strerror(errno), ")");
  exits_[r] = {
      .why = *why,
      .peer_failure = got == pid && WIFEXITED(status) && WEXITSTATUS(status) == static_cast<int>(WorkerExit::kFailed)};
  return true;
}

void WorkerGroup::KillAll() {
  if (options_.remote) options_.remote->Stop();  // before the segment goes: no more writes into it
  if (lifeline_ >= 0) {                          // end of file for every worker, whatever else happens
    ::close(lifeline_);
    lifeline_ = -1;
  }
  for (pid_t pid : pids_) {
    if (pid > 0) kill(pid, SIGKILL);
  }
  // Reaped within 2 s; one stuck in uninterruptible sleep (a hung device driver) cannot be, and is
  // left to init rather than hold the server.
  const uint64_t give_up = NowNs() + 2'000'000'000ull;
  for (pid_t& pid : pids_) {
    while (pid > 0) {
      const pid_t got = waitpid(pid, nullptr, WNOHANG);
      if (got == pid || (got < 0 && errno != EINTR) || NowNs() > give_up) {
        pid = -1;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
  }
  segment_.reset();
  control_ = nullptr;
}

Status WorkerGroup::CheckWorkers(bool in_step) {
  // Exits first: when a worker dies, its peers report failed collectives and exit
  // WorkerExit::kFailed themselves; the one killed by a signal or exiting otherwise is the news.
  int blamed = -1;
  for (int r = 0; r < world_size(); ++r) {
    std::string why;
    if (!Reap(r, &why)) continue;
    if (blamed < 0 || (exits_[blamed].peer_failure && !exits_[r].peer_failure)) blamed = r;
  }
  // A remote rank's failure is the news when the local exits are only peers' reactions to it.
  auto failed = [&](int r) {
    return IsChecked(r) && control_->ranks[r].state.load() == static_cast<uint32_t>(RankState::kFailed);
  };
  if (blamed >= 0 && exits_[blamed].peer_failure) {
    for (int r = 0; r < world_size(); ++r) {
      if (!IsLocal(r) && failed(r))
        return absl::UnavailableError(StrCat("worker rank ", r, " failed: ", control_->ranks[r].message));
    }
  }
  if (blamed >= 0) return absl::UnavailableError(StrCat("worker rank ", blamed, " ", exits_[blamed].why));
  for (int r = 0; r < world_size(); ++r) {
    if (failed(r)) return absl::UnavailableError(StrCat("worker rank ", r, " failed: ", control_->ranks[r].message));
  }
  const uint64_t now = NowNs();
  // The silences are judged at most every kLivenessCheckNs (each judgement reads /proc).
  if (now - last_liveness_check_ns_ < kLivenessCheckNs) return absl::OkStatus();
  last_liveness_check_ns_ = now;
  // How long this thread was itself kept from a CPU since the last judgement: a freeze of the
  // whole container (its CPU quota) stops the judge and the judged alike (runtime/liveness.h).
  const uint64_t judge_waited = judge_meter_.Take();
  const uint64_t silent = static_cast<uint64_t>(options_.heartbeat_timeout.count()) * 1'000'000;
  const uint64_t stalled = static_cast<uint64_t>(options_.stall_timeout.count()) * 1'000'000;
  // Whatever the host does, a silence this long by the clock is a hang.
  const uint64_t beat_ceiling = 10 * silent, step_ceiling = 3 * stalled;
  // A step is stuck only when every rank still in it has stalled by its own fault: a healthy rank
  // that waits in a collective for a peer the host starves is silent too, but the peer is not to
  // blame, so neither is it.
  int stuck = -1, in_step_ranks = 0, stalled_ranks = 0;
  uint64_t stuck_blamed = 0;
  heartbeat_clocks_.resize(world_size(), SilenceClock(/*runnable_is_waiting=*/true));
  progress_clocks_.resize(world_size());
  for (int r = 0; r < world_size(); ++r) {
    if (!IsChecked(r)) continue;
    RankSlot& s = control_->ranks[r];
    const uint64_t beat = s.heartbeat_ns.load(std::memory_order_relaxed);
    if (beat == 0) continue;  // not started yet: start_timeout bounds that
    // Silence is charged by what the host let the thread do (runtime/liveness.h). A remote rank's
    // heartbeat its own node judges so (and reports a failure); the node itself the hub judges by
    // its reports (RemoteNodes), so only a local rank's is judged here.
    const pid_t pid = IsLocal(r) ? pids_[r] : -1;
    SilenceClock& hb = heartbeat_clocks_[r];
    const uint64_t hb_blamed =
        IsLocal(r) ? hb.Update(beat, now, pid, s.heartbeat_tid.load(std::memory_order_relaxed), judge_waited) : 0;
    if (IsLocal(r) && (hb_blamed > silent || hb.wall_ns(now) > beat_ceiling)) {
      return absl::UnavailableError(StrCat("worker rank ", r, " (", Where(r), ") stopped responding: no heartbeat for ",
                                           hb_blamed / 1'000'000, " ms", hb.Explain(now)));
    }
    // A step's silence counts from its publication: the progress stamp left by the previous step
    // may be from before an idle gap of any length.
    if (!in_step || s.done_step.load() >= step_) continue;
    const uint64_t progress = std::max(s.progress_ns.load(std::memory_order_relaxed), step_published_ns_);
    SilenceClock& pc = progress_clocks_[r];
    const uint64_t pc_blamed = pc.Update(progress, now, pid, pid, judge_waited);  // the serving thread is the main one
    ++in_step_ranks;
    if (pc_blamed > stalled || pc.wall_ns(now) > step_ceiling) {
      ++stalled_ranks;
      if (stuck < 0 || pc_blamed > stuck_blamed || pc.wall_ns(now) > step_ceiling) stuck = r, stuck_blamed = pc_blamed;
    }
  }
  if (stuck >= 0 && (stalled_ranks == in_step_ranks || progress_clocks_[stuck].wall_ns(now) > step_ceiling)) {
    const SilenceClock& pc = progress_clocks_[stuck];
    return absl::UnavailableError(StrCat("worker rank ", stuck, " (", Where(stuck), ") is stuck: no progress in step ",
                                         step_, " for ", stuck_blamed / 1'000'000, " ms", pc.Explain(now)));
  }
  return absl::OkStatus();
}

Status WorkerGroup::Recover(const Status& cause, bool in_step) {
  failure_noticed_ = std::chrono::steady_clock::now();
  if (recovery_cb_) recovery_cb_(true, cause);
  KillAll();
  Status last = cause;
  int failed_starts = 0;  // restarts in a row that did not come up
  for (;;) {
    if (cancelled_.load()) {
      dead_ = absl::UnavailableError("the server is stopping: the restart of the workers was abandoned");
      return dead_;
    }
    // One account for every failure, the step's and any failed restart's.
    const auto now = std::chrono::steady_clock::now();
    restart_times_.push_back(now);
    while (!restart_times_.empty() && now - restart_times_.front() > options_.restart_window) {
      restart_times_.erase(restart_times_.begin());
    }
    if (static_cast<int>(restart_times_.size()) > options_.max_restarts) {
      dead_ = absl::AbortedError(StrCat("giving up: ", restart_times_.size(), " worker failures within ",
                                        options_.restart_window.count() / 1000.0, " s (more than ",
                                        options_.max_restarts, "); last: ", std::string(last.message())));
      return dead_;
    }
    if (failed_starts > options_.max_restarts) {
      dead_ = absl::AbortedError(StrCat("giving up: ", failed_starts, " restarts in a row failed to start (more than ",
                                        options_.max_restarts, "); last: ", std::string(last.message())));
      return dead_;
    }
    ++restarts_total_;
    last = Launch();
    if (last.ok()) break;
    ++failed_starts;
  }
  if (recovery_cb_) recovery_cb_(false, absl::OkStatus());
  return absl::UnavailableError(StrCat(std::string(cause.message()), in_step ? "; the step failed and all " : "; all ",
                                       world_size(), " workers were restarted (their KV caches are empty: generation ",
                                       generation_, ")"));
}

StatusOr<StepResultView> WorkerGroup::RunStep(std::span<const SeqStep> seqs) {
  if (!dead_.ok()) return dead_;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqStep& s = seqs[i];
    if (s.start_pos > 0 && s.kv_generation != generation_) {
      return absl::FailedPreconditionError(StrCat("sequence ", i, " (id ", s.seq_id, ") continues at position ",
                                                  s.start_pos, " from KV generation ", s.kv_generation,
                                                  ", but the workers restarted since (generation ", generation_,
                                                  "): prefill it again from position 0"));
    }
  }
  PlanWriter writer(segment_->data(), layout_, limits_);
  KRAKEN_RETURN_IF_ERROR(writer.Check(seqs));  // before touching the segment
  const uint64_t step = ++step_;
  writer.Write(step, seqs);
  const uint32_t results_before = control_->result_futex.load(std::memory_order_acquire);
  step_published_ns_ = NowNs();
  control_->plan_step.store(step, std::memory_order_release);
  control_->plan_futex.fetch_add(1, std::memory_order_acq_rel);
  FutexWakeAll(&control_->plan_futex);
  if (options_.remote) options_.remote->Publish(step);

  // Wait for rank 0's result and for every rank to be done with the plan, supervising meanwhile.
  for (;;) {
    const uint32_t now = control_->result_futex.load(std::memory_order_acquire);
    if (now != results_before) {
      bool all_done = true;
      // Local ranks only: each node makes sure its own are done before it writes the next plan.
      for (int r = local_begin(); r < local_end(); ++r) {
        all_done = all_done && control_->ranks[r].done_step.load(std::memory_order_acquire) >= step;
      }
      if (all_done) break;
    }
    if (cancelled_.load()) {  // the server is stopping: a step that hangs must not hold it
      KillAll();
      dead_ = absl::UnavailableError("the server is stopping: the step in flight was abandoned");
      return dead_;
    }
    Status health = CheckWorkers(/*in_step=*/true);
    if (!health.ok()) return RecoverFrom(health, /*in_step=*/true, StrCat("step ", step));
    if (now == results_before) {
      FutexWait(&control_->result_futex, now, kPollNs);
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));  // rank 0 done; others a moment behind
    }
  }
  uint8_t* base = segment_->data();
  const ResultHeader* rh = At<ResultHeader>(base, layout_.result_header);
  if (rh->status != 0) return Status(static_cast<absl::StatusCode>(rh->status), rh->message);
  return StepResultView{{At<ResultSeq>(base, layout_.result_seqs), static_cast<size_t>(rh->num_seqs)},
                        At<PromptLogprob>(base, layout_.prompt_logprobs)};
}

bool WorkerGroup::PlanAreaFree() const {
  for (int r = local_begin(); r < local_end(); ++r) {
    if (control_->ranks[r].done_step.load(std::memory_order_acquire) < step_) return false;
  }
  return true;
}

Status WorkerGroup::PublishPlan(uint64_t step, std::string_view header, std::string_view seqs, std::string_view tokens,
                                std::string_view blocks, std::string_view history) {
  if (control_ == nullptr) return FailedPrecondition("no workers running");
  PlanHeader h;
  if (header.size() != sizeof h) return InvalidArgument("plan header of ", header.size(), " bytes, not ", sizeof h);
  std::memcpy(&h, header.data(), sizeof h);
  auto fits = [](std::string_view part, int64_t count, size_t elem, int64_t cap, const char* what) -> Status {
    if (count < 0 || count > cap || part.size() != static_cast<size_t>(count) * elem) {
      return InvalidArgument("plan ", what, ": ", part.size(), " bytes for ", count, " entries (at most ", cap, ")");
    }
    return absl::OkStatus();
  };
  const Limits& l = limits_;
  KRAKEN_RETURN_IF_ERROR(fits(seqs, h.num_seqs, sizeof(PlanSeq), l.max_seqs, "sequences"));
  KRAKEN_RETURN_IF_ERROR(fits(tokens, h.num_tokens, sizeof(int32_t), l.max_tokens, "tokens"));
  KRAKEN_RETURN_IF_ERROR(
      fits(blocks, h.num_block_ids, sizeof(int32_t), int64_t{l.max_seqs} * l.max_blocks_per_seq, "block ids"));
  KRAKEN_RETURN_IF_ERROR(fits(history, h.num_history, sizeof(int32_t), l.max_history, "history"));
  if (!PlanAreaFree()) return FailedPrecondition("step ", step_, " is still running on this node");
  uint8_t* base = segment_->data();
  std::memcpy(base + layout_.plan_seqs, seqs.data(), seqs.size());
  std::memcpy(base + layout_.tokens, tokens.data(), tokens.size());
  std::memcpy(base + layout_.blocks, blocks.data(), blocks.size());
  std::memcpy(base + layout_.history, history.data(), history.size());
  h.step = step;
  *At<PlanHeader>(base, layout_.plan_header) = h;
  step_ = step;
  step_published_ns_ = NowNs();
  control_->plan_step.store(step, std::memory_order_release);
  control_->plan_futex.fetch_add(1, std::memory_order_acq_rel);
  FutexWakeAll(&control_->plan_futex);
  return absl::OkStatus();
}

Status WorkerGroup::Supervise() {
  if (!dead_.ok()) return dead_;
  if (control_ == nullptr) return absl::OkStatus();
  Status health = CheckWorkers(/*in_step=*/false);
  if (health.ok()) return health;
  return RecoverFrom(health, /*in_step=*/false, "between steps");
}

Status WorkerGroup::RecoverFrom(const Status& health, bool in_step, std::string_view context) {
  // A peer's failure shows up first as failed collectives elsewhere; give the dead one a moment
  // to be reaped so the report names it.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  Status again = CheckWorkers(in_step);
  return Recover(Annotate(again.ok() ? health : again, context), in_step);
}

void WorkerGroup::CancelRestarts() {
  cancelled_.store(true);
  if (options_.remote) options_.remote->Cancel();
}

void WorkerGroup::Shutdown() {
  if (control_ != nullptr) {
    *At<PlanHeader>(segment_->data(), layout_.plan_header) = PlanHeader{.step = ++step_, .kind = StepKind::kShutdown};
    control_->plan_step.store(step_, std::memory_order_release);
    control_->plan_futex.fetch_add(1, std::memory_order_acq_rel);
    FutexWakeAll(&control_->plan_futex);
    const uint64_t deadline = NowNs() + 5'000'000'000ull;
    for (pid_t& pid : pids_) {
      while (pid > 0 && NowNs() < deadline) {
        if (waitpid(pid, nullptr, WNOHANG) == pid)
          pid = -1;
        else
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
  }
  KillAll();
}

WorkerGroup::~WorkerGroup() {
  Shutdown();
}

std::vector<RankStatsSnapshot> WorkerGroup::Stats() const {
  std::vector<RankStatsSnapshot> out;
  for (int r = 0; r < world_size(); ++r) {
    RankStatsSnapshot s;
    s.rank = r;
    s.up = control_ != nullptr && (IsLocal(r) ? pids_[r] > 0
                                              : control_->ranks[r].state.load(std::memory_order_acquire) ==
                                                    static_cast<uint32_t>(RankState::kReady));
    if (control_ != nullptr) {
      const RankStats& st = control_->ranks[r].stats;
      s.steps = st.steps.load();
      s.collectives = st.collectives.load();
      s.busy_s = st.busy_ns.load() * 1e-9;
      s.exposed_comm_s = st.exposed_comm_ns.load() * 1e-9;
      s.collective_s = st.collective_ns.load() * 1e-9;
      s.idle_s = st.idle_ns.load() * 1e-9;
      if (control_->ranks[r].state.load(std::memory_order_acquire) == static_cast<uint32_t>(RankState::kReady)) {
        s.memory = control_->ranks[r].memory;
      }
    }
    out.push_back(s);
  }
  return out;
}

}  // namespace kraken::runtime
