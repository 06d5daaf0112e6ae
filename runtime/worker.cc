#include "runtime/worker.h"

#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <thread>
#include <vector>

#include "engine/backend.h"
#include "engine/comm/gloo_communicator.h"
#include "engine/comm/link_model.h"
#ifdef KRAKEN_HAVE_NCCL
#include "engine/comm/nccl_communicator.h"
#endif
#include "engine/model.h"
#include "engine/sampler.h"
#include "runtime/memory.h"
#include "runtime/protocol.h"
#include "runtime/shm.h"
#include "runtime/shm_store.h"
#include "runtime/timed_communicator.h"

namespace kraken::runtime {
namespace {

constexpr uint64_t kHeartbeatPeriodNs = 100'000'000;  // 100 ms

// Everything a worker holds while it serves steps.
class Worker {
 public:
  explicit Worker(const WorkerArgs& a) : a_(a) {}

  Status Setup();
  // The heartbeat thread: stamps heartbeat_ns every kHeartbeatPeriodNs and exits the process when
  // the front-end is gone.
  void StartHeartbeat();
  // Local for a world of 1, NCCL for CUDA ranks, Gloo otherwise; wrapped in a link model for
  // benchmarks (WorkerArgs::link_preset).
  StatusOr<std::unique_ptr<engine::Communicator>> MakeCommunicator();
  // Serves plans until shutdown. Returns OK after an orderly shutdown.
  Status Serve();
  void Fail(const Status& s);
  void StopHeartbeat() {
    stop_.store(true);
    if (heartbeat_.joinable()) heartbeat_.join();
  }

 private:
  // Fills slot_->memory up to the KV budget and reports kLoaded.
  Status ReportMemory();
  // The KV cache's block count once the front-end has decided it; negative when it refused.
  int32_t AwaitKvBlocks();
  Status RunStep(const PlanHeader& plan);
  // The test hook of KRAKEN_TEST_CRASH_ON_TOKEN (aborts the process).
  void CrashOnTestToken() const;
  // Rank 0: the step's status, prompt logprobs and sampled tokens into the result area.
  void PublishResult(const PlanHeader& plan, const PlanReader& reader, const Status& status,
                     const engine::ForwardResult& fr);

  WorkerArgs a_;
  std::unique_ptr<SharedSegment> seg_;
  Control* control_ = nullptr;
  RankSlot* slot_ = nullptr;
  Layout layout_{};
  Limits limits_{};
  std::unique_ptr<engine::Backend> backend_;
  std::unique_ptr<engine::Model> model_;
  std::unique_ptr<engine::KvCache> kv_;
  std::unique_ptr<TimedCommunicator> comm_;
  std::unique_ptr<engine::Sampler> sampler_;
  std::vector<engine::SequenceInput> inputs_;
  std::thread heartbeat_;
  std::atomic<bool> stop_{false};
};

void Worker::StartHeartbeat() {
  // The heartbeat thread also watches the lifeline: end of file means the front-end is gone
  // (crashed, killed, or exited without shutting us down), and this worker must go too.
  heartbeat_ = std::thread([this] {
    slot_->heartbeat_tid.store(static_cast<int32_t>(gettid()), std::memory_order_relaxed);
    while (!stop_.load()) {
      slot_->heartbeat_ns.store(NowNs(), std::memory_order_relaxed);
      struct pollfd p {
        kLifelineFd, POLLIN, 0
      };
      if (poll(&p, 1, static_cast<int>(kHeartbeatPeriodNs / 1'000'000)) > 0 || getppid() != a_.parent_pid) {
        std::_Exit(static_cast<int>(WorkerExit::kOrphaned));
      }
    }
  });
}

StatusOr<std::unique_ptr<engine::Communicator>> Worker::MakeCommunicator() {
  std::unique_ptr<engine::Communicator> comm;
  if (a_.world == 1) {
    comm = std::make_unique<engine::LocalCommunicator>();
  } else if (a_.device.traits().collective == engine::CollectiveLibrary::kNccl) {
#ifdef KRAKEN_HAVE_NCCL
    // GPU ranks: NCCL on its own stream, ordered after the backend's compute stream, so a
    // Kraken AllReduce overlaps the next layer's attention without blocking the host.
    ShmStore store(At<StoreSlot>(seg_->data(), layout_.store), layout_.store_slots);
    KRAKEN_ASSIGN_OR_RETURN(
        comm, engine::NcclCommunicator::Create({.rank = a_.rank,
                                                .world_size = a_.world,
                                                .device = a_.device.index,
                                                .store = &store,
                                                .compute_stream = backend_->native_stream(),
                                                .timeout = std::chrono::milliseconds(a_.collective_timeout_ms)}));
#else
    return FailedPrecondition("device '", a_.device.ToString(), "' needs NCCL, but this binary was built without CUDA");
#endif
  } else {
    ShmStore store(At<StoreSlot>(seg_->data(), layout_.store), layout_.store_slots);
    KRAKEN_ASSIGN_OR_RETURN(
        comm, engine::GlooCommunicator::Create({.rank = a_.rank,
                                                .world_size = a_.world,
                                                .store = &store,
                                                .host = a_.collective_host,
                                                .timeout = std::chrono::milliseconds(a_.collective_timeout_ms)}));
  }
  if (!a_.link_preset.empty()) {
    if (!a_.device.traits().link_presets)
      return InvalidArgument("link presets emulate an interconnect for CPU workers only, not ", a_.device.ToString());
    const engine::LinkPreset* p = engine::FindLinkPreset(a_.link_preset);
    if (p == nullptr) return InvalidArgument("unknown link preset '", a_.link_preset, "'");
    comm = std::make_unique<engine::LinkModelCommunicator>(std::move(comm), *p, a_.measured_gemm_flops);
  }
  return comm;
}

Status Worker::Setup() {
  KRAKEN_ASSIGN_OR_RETURN(seg_, SharedSegment::FromFd(kSegmentFd, a_.segment_bytes));
  control_ = At<Control>(seg_->data(), 0);
  if (control_->magic != kMagic || control_->version != kProtocolVersion) {
    return FailedPrecondition("dispatch segment has protocol version ", control_->version, "; this worker speaks ",
                              kProtocolVersion);
  }
  limits_ = control_->limits;
  if (limits_.world_size != a_.world || a_.rank < 0 || a_.rank >= a_.world || a_.world > kMaxWorld) {
    return FailedPrecondition("rank ", a_.rank, " / world ", a_.world, " disagree with the segment's world size ",
                              limits_.world_size);
  }
  layout_ = ComputeLayout(limits_);
  if (layout_.total != a_.segment_bytes) return FailedPrecondition("dispatch segment size disagrees with its limits");
  slot_ = &control_->ranks[a_.rank];
  slot_->heartbeat_ns.store(NowNs());
  slot_->progress_ns.store(NowNs());
  StartHeartbeat();

  KRAKEN_ASSIGN_OR_RETURN(backend_, engine::CreateBackend({.device = a_.device, .threads = a_.threads}));
  engine::ModelOptions mo{.max_tokens = limits_.max_tokens,
                          .max_seqs = limits_.max_seqs,
                          .max_logit_rows = limits_.max_tokens,
                          .rank = a_.rank,
                          .world_size = a_.world,
                          .compute_logits = a_.rank == 0};
  KRAKEN_ASSIGN_OR_RETURN(model_, engine::LoadModel(a_.model_dir, backend_.get(), mo));
  if (model_->config().vocab_size != limits_.vocab_size) {
    return FailedPrecondition("model vocabulary ", model_->config().vocab_size, " differs from the segment's ",
                              limits_.vocab_size);
  }
  KRAKEN_RETURN_IF_ERROR(ReportMemory());
  limits_.num_kv_blocks = AwaitKvBlocks();
  if (limits_.num_kv_blocks <= 0) return FailedPrecondition("the front-end found no KV cache size for every rank");
  KRAKEN_ASSIGN_OR_RETURN(engine::KvCache kv, engine::KvCache::Create(*backend_, model_->kv_layout(),
                                                                      {.num_blocks = limits_.num_kv_blocks,
                                                                       .block_size = limits_.block_size,
                                                                       .dtype = control_->kv_sizing.kv_dtype}));
  kv_ = std::make_unique<engine::KvCache>(std::move(kv));
  slot_->memory.kv_bytes = kv_->bytes();

  KRAKEN_ASSIGN_OR_RETURN(std::unique_ptr<engine::Communicator> comm, MakeCommunicator());
  comm_ = std::make_unique<TimedCommunicator>(std::move(comm), slot_);
  if (a_.rank == 0) sampler_ = std::make_unique<engine::Sampler>(limits_.vocab_size);
  inputs_.reserve(limits_.max_seqs);

  // Warm-up: one token through the whole model (every rank, so the collectives meet) sizes the
  // remaining tables; block 0 position 0 is overwritten by whichever sequence uses it next.
  const int32_t token = 0, block = 0;
  engine::SequenceInput s{.tokens = {&token, 1}, .start_pos = 0, .block_table = {&block, 1}};
  KRAKEN_RETURN_IF_ERROR(model_->Forward({.seqs = {&s, 1}}, *kv_, *comm_).status());
  comm_->EndStep();  // the warm-up's figures are not served work
  for (auto* c : {&slot_->stats.steps, &slot_->stats.busy_ns, &slot_->stats.exposed_comm_ns,
                  &slot_->stats.collective_ns, &slot_->stats.idle_ns, &slot_->stats.collectives}) {
    c->store(0);
  }
  slot_->memory.scratch_bytes = backend_->scratch_bytes();  // the warm-up may have grown it
  slot_->state.store(static_cast<uint32_t>(RankState::kReady), std::memory_order_release);
  return absl::OkStatus();
}

Status Worker::ReportMemory() {
  WorkerMemory& m = slot_->memory;
  m = WorkerMemory{};
  m.weight_bytes = model_->weight_bytes();
  m.activation_bytes = model_->activation_bytes();
  m.scratch_bytes = backend_->scratch_bytes();
  m.kv_block_bytes =
      engine::KvCache::BytesPerBlock(model_->kv_layout(), limits_.block_size, control_->kv_sizing.kv_dtype);
  std::optional<engine::DeviceMemory> gpu;
  if (a_.device.traits().own_memory) {
    KRAKEN_ASSIGN_OR_RETURN(gpu, backend_->MemoryInfo());
    m.device_bytes = gpu->total;
  } else {
    m.device_bytes = control_->kv_sizing.host_share_bytes;
  }
  m.kv_budget_bytes = KvBudgetBytes(control_->kv_sizing, gpu, m);
  slot_->state.store(static_cast<uint32_t>(RankState::kLoaded), std::memory_order_release);
  return absl::OkStatus();
}

int32_t Worker::AwaitKvBlocks() {
  // The front-end decides once every rank has reported (or at once, when the count is fixed);
  // the heartbeat thread keeps reporting life meanwhile, and exits if the front-end goes.
  int32_t n;
  while ((n = control_->kv_blocks.load(std::memory_order_acquire)) == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return n;
}

void Worker::CrashOnTestToken() const {
  // A test hook (tools/tests/test_resume.py): KRAKEN_TEST_CRASH_ON_TOKEN=<id> makes the last rank
  // abort whenever a step feeds that token, so a request holding it crashes its worker each time
  // it runs. Read once; unset in any deployment.
  static const int32_t crash_token = [] {
    const char* v = std::getenv("KRAKEN_TEST_CRASH_ON_TOKEN");
    return v != nullptr && *v != '\0' ? static_cast<int32_t>(std::strtol(v, nullptr, 10)) : -1;
  }();
  if (crash_token < 0 || a_.rank != a_.world - 1) return;
  for (const engine::SequenceInput& in : inputs_) {
    if (std::find(in.tokens.begin(), in.tokens.end(), crash_token) != in.tokens.end()) std::abort();
  }
}

Status Worker::RunStep(const PlanHeader& plan) {
  const PlanReader reader(seg_->data(), layout_, limits_);
  Status status = reader.Check(plan);
  engine::ForwardResult fr;
  if (status.ok()) {
    inputs_.clear();
    for (int i = 0; i < plan.num_seqs; ++i) {
      const PlannedSeq s = reader.seq(plan, i);
      inputs_.push_back({.tokens = s.tokens,
                         .start_pos = s.plan->start_pos,
                         .block_table = s.block_table,
                         .all_logits = s.plan->prompt_logprobs != 0});
    }
    CrashOnTestToken();
    auto r = model_->Forward({.seqs = inputs_}, *kv_, *comm_);
    if (!r.ok()) {
      status = r.status();
      // A failed collective means a peer is gone: this worker cannot go on.
      if (status.code() == absl::StatusCode::kUnavailable) return status;
    } else {
      fr = *r;
    }
  }
  if (a_.rank == 0) PublishResult(plan, reader, status, fr);
  return absl::OkStatus();
}

void Worker::PublishResult(const PlanHeader& plan, const PlanReader& reader, const Status& status,
                           const engine::ForwardResult& fr) {
  uint8_t* base = seg_->data();
  ResultHeader* rh = At<ResultHeader>(base, layout_.result_header);
  ResultSeq* rs = At<ResultSeq>(base, layout_.result_seqs);
  PromptLogprob* prompt_lp = At<PromptLogprob>(base, layout_.prompt_logprobs);
  rh->step = plan.step;
  rh->status = static_cast<int32_t>(status.code());
  std::snprintf(rh->message, sizeof rh->message, "%s", std::string(status.message()).c_str());
  rh->num_seqs = status.ok() ? plan.num_seqs : 0;
  if (!status.ok()) return;
  int row = 0, lp_at = 0;
  for (int i = 0; i < plan.num_seqs; ++i) {
    const PlannedSeq s = reader.seq(plan, i);
    ResultSeq& out = rs[i];
    out = ResultSeq{};
    out.seq_id = s.plan->seq_id;
    const int rows = s.plan->prompt_logprobs ? static_cast<int>(s.tokens.size()) : 1;
    if (s.plan->prompt_logprobs) {
      // Row j's logits score the token after it: tokens[j + 1], and for the last row next_token.
      out.prompt_logprob_offset = lp_at;
      Status scored = absl::OkStatus();
      for (int j = 0; j < rows && scored.ok(); ++j) {
        const int32_t target = j + 1 < rows ? s.tokens[j + 1] : s.plan->next_token;
        if (target < 0) break;
        auto t = sampler_->Score(fr.logits + static_cast<int64_t>(row + j) * fr.vocab, target,
                                 s.plan->sampling.top_logprobs);
        if (!t.ok()) {
          scored = t.status();
          break;
        }
        PromptLogprob& lp = prompt_lp[lp_at++];
        lp = PromptLogprob{.token = target, .logprob = t->logprob, .num_top = t->num_top};
        for (int k = 0; k < t->num_top; ++k) lp.top[k] = t->top[k];
      }
      out.num_prompt_logprobs = lp_at - out.prompt_logprob_offset;
      if (!scored.ok()) {
        out.error = static_cast<int32_t>(scored.code());
        std::snprintf(out.error_message, sizeof out.error_message, "prompt logprobs: %s",
                      std::string(scored.message()).c_str());
        row += rows;
        continue;
      }
    }
    const float* last = fr.logits + static_cast<int64_t>(row + rows - 1) * fr.vocab;
    row += rows;
    if (!s.plan->sample) continue;
    auto t = sampler_->Sample(last, s.plan->sampling, s.history, s.plan->draw_index);
    if (!t.ok()) {
      out.error = static_cast<int32_t>(t.status().code());
      std::snprintf(out.error_message, sizeof out.error_message, "%s", std::string(t.status().message()).c_str());
      continue;
    }
    out.token = t->token;
    out.logprob = t->logprob;
    out.num_top = t->num_top;
    for (int k = 0; k < t->num_top; ++k) out.top[k] = t->top[k];
  }
}

Status Worker::Serve() {
  // The segment is new at every (re)start and no plan is published before every rank is ready:
  // step 1 may already be there when this rank gets here, and must not be skipped.
  uint64_t last_step = 0;
  uint64_t idle_from = NowNs();
  for (;;) {
    const uint32_t seen = control_->plan_futex.load(std::memory_order_acquire);
    const uint64_t step = control_->plan_step.load(std::memory_order_acquire);
    if (step == last_step) {
      FutexWait(&control_->plan_futex, seen, 200'000'000);
      continue;
    }
    last_step = step;
    const PlanHeader plan = PlanReader(seg_->data(), layout_, limits_).header();
    if (plan.kind == StepKind::kShutdown) return absl::OkStatus();
    const uint64_t t0 = NowNs();
    slot_->progress_ns.store(t0, std::memory_order_relaxed);
    slot_->stats.idle_ns.fetch_add(t0 - idle_from, std::memory_order_relaxed);
    KRAKEN_RETURN_IF_ERROR(RunStep(plan));
    const uint64_t t1 = NowNs();
    const uint64_t exposed = comm_->EndStep();
    slot_->stats.busy_ns.fetch_add(t1 - t0 - std::min(exposed, t1 - t0), std::memory_order_relaxed);
    slot_->stats.steps.fetch_add(1, std::memory_order_relaxed);
    idle_from = t1;
    slot_->done_step.store(plan.step, std::memory_order_release);
    if (a_.rank == 0) {
      control_->result_futex.fetch_add(1, std::memory_order_acq_rel);
      FutexWakeAll(&control_->result_futex);
    }
  }
}

void Worker::Fail(const Status& s) {
  std::fprintf(stderr, "kraken worker rank %d: %s\n", a_.rank, std::string(s.message()).c_str());
  if (slot_ != nullptr) {
    std::snprintf(slot_->message, sizeof slot_->message, "%s", std::string(s.message()).c_str());
    slot_->state.store(static_cast<uint32_t>(RankState::kFailed), std::memory_order_release);
    FutexWakeAll(&control_->result_futex);
  }
}

bool ParseArgs(int argc, char** argv, WorkerArgs* a) {
  bool is_worker = false;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == kWorkerFlag) {
      is_worker = true;
      continue;
    }
    if (i + 1 >= argc) break;
    const std::string v = argv[++i];
    if (k == "--segment-bytes")
      a->segment_bytes = std::stoull(v);
    else if (k == "--rank")
      a->rank = std::stoi(v);
    else if (k == "--world")
      a->world = std::stoi(v);
    else if (k == "--model")
      a->model_dir = v;
    else if (k == "--device") {
      auto d = engine::Device::Parse(v);  // written by WorkerGroup from a parsed Device: always valid
      if (!d.ok()) {
        std::fprintf(stderr, "kraken worker: %s\n", std::string(d.status().message()).c_str());
        std::_Exit(static_cast<int>(WorkerExit::kBadArguments));
      }
      a->device = *d;
    } else if (k == "--threads")
      a->threads = std::stoi(v);
    else if (k == "--parent")
      a->parent_pid = std::stoi(v);
    else if (k == "--collective-timeout-ms")
      a->collective_timeout_ms = std::stoi(v);
    else if (k == "--link-preset")
      a->link_preset = v;
    else if (k == "--measured-gemm-flops")
      a->measured_gemm_flops = std::stod(v);
    else if (k == "--collective-host")
      a->collective_host = v;
  }
  return is_worker;
}

}  // namespace

std::vector<std::string> WorkerCommandLine(const WorkerArgs& a) {
  std::vector<std::string> v = {kWorkerFlag,
                                "--segment-bytes",
                                std::to_string(a.segment_bytes),
                                "--rank",
                                std::to_string(a.rank),
                                "--world",
                                std::to_string(a.world),
                                "--model",
                                a.model_dir,
                                "--device",
                                a.device.ToString(),
                                "--threads",
                                std::to_string(a.threads),
                                "--parent",
                                std::to_string(a.parent_pid),
                                "--collective-timeout-ms",
                                std::to_string(a.collective_timeout_ms),
                                "--collective-host",
                                a.collective_host};
  if (!a.link_preset.empty()) {
    v.insert(v.end(), {"--link-preset", a.link_preset, "--measured-gemm-flops", std::to_string(a.measured_gemm_flops)});
  }
  return v;
}

std::optional<int> MaybeRunWorker(int argc, char** argv) {
  WorkerArgs a;
  if (!ParseArgs(argc, argv, &a)) return std::nullopt;
  // The front-end supervises the workers; they neither die of a broken socket (a peer gone:
  // the collective fails and is reported instead) nor of signals meant for the front-end.
  signal(SIGPIPE, SIG_IGN);
  signal(SIGINT, SIG_IGN);
  signal(SIGTERM, SIG_IGN);
  if (getppid() != a.parent_pid) return static_cast<int>(WorkerExit::kOrphaned);
  Worker w(a);
  Status s = w.Setup();
  if (s.ok()) s = w.Serve();  // Setup reports ready only when it succeeded
  int code = 0;
  if (!s.ok()) {
    w.Fail(s);
    code = static_cast<int>(WorkerExit::kFailed);
  }
  w.StopHeartbeat();
  return code;
}

}  // namespace kraken::runtime
