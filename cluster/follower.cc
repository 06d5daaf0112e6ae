#include "cluster/follower.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "cluster/hub.h"
#include "cluster/membership.h"
#include "kraken/cluster/v1/cluster.grpc.pb.h"
#include "runtime/liveness.h"
#include "runtime/shm.h"
#include "runtime/shm_store.h"

namespace kraken::cluster {
namespace {

using Stream = grpc::ClientReaderWriter<v1::NodeMessage, v1::LeaderMessage>;

constexpr auto kReportPeriod = std::chrono::milliseconds(100);
constexpr auto kStartingReportPeriod = std::chrono::milliseconds(5);  // rendezvous keys travel with reports
constexpr uint64_t kJoinAttemptNs = 5'000'000'000;  // a leader that accepts but never welcomes: try again
constexpr size_t kMaxRelaySamples = 1 << 16;        // the relay figure covers the first 65,536 plans

class Follower {
 public:
  explicit Follower(const FollowerOptions& o) : o_(o) {}
  int Run();

 private:
  // Joins the leader, retrying with back-off: 0 when welcomed, else the exit code.
  int Join();
  int Serve();
  void Handle(const v1::LeaderMessage& m);
  void StartShare(const v1::Start& start);
  void PublishPlan(const v1::Plan& plan);
  void ReportLoop();
  // Cancels the stream when a join attempt passes deadline_ns_, or when the joined leader has been
  // silent past its timeout (leader_silence_; a Read or a Write blocked on a frozen leader returns
  // then).
  void Watchdog();
  bool Starting();                                                  // under mu_: a share whose ranks are not all ready
  void FillReport(v1::NodeMessage* status, v1::NodeMessage* keys);  // under mu_
  void Retire();  // kills the running share, outside mu_ (killing and reaping take time)

  FollowerOptions o_;
  std::mutex context_mu_;  // context_ against the watchdog
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<Stream> stream_;
  std::atomic<uint64_t> deadline_ns_{0};  // 0: none
  std::thread watchdog_;
  v1::Welcome welcome_;
  std::mutex write_mu_;
  std::mutex mu_;
  std::unique_ptr<runtime::WorkerGroup> share_;
  uint64_t generation_ = 0;
  std::string failure_;
  std::set<std::string> sent_keys_;
  std::chrono::milliseconds heartbeat_timeout_{1000};
  // The joined leader's silence (under lost_mu_): its timeout plus the freezes it reported lately
  // (runtime/liveness.h PeerSilence). Not judged while publishing_: the reader then waits on this
  // node's own workers (bounded, PublishPlan), not on the leader.
  std::optional<runtime::PeerSilence> leader_silence_;
  std::atomic<bool> publishing_{false};
  std::atomic<bool> done_{false};
  std::atomic<bool> shutdown_{false};
  std::mutex lost_mu_;
  std::string lost_;  // why the leader was given up (watchdog), under lost_mu_
  // Leader's send to this node's publish, per plan (meaningful when both share a host's clock).
  std::vector<uint64_t> relay_ns_;
};

// "n plans, median 85 us, p90 120 us" of the relay delays.
std::string DescribeRelay(std::vector<uint64_t> v) {
  if (v.empty()) return "no plans";
  std::sort(v.begin(), v.end());
  auto at = [&](double q) { return v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))] / 1000.0; };
  return StrCat(v.size(), " plans, median ", at(0.5), " us, p90 ", at(0.9), " us, max ", v.back() / 1000.0, " us");
}

int Follower::Join() {
  auto backoff = std::chrono::milliseconds(200);
  const auto deadline = std::chrono::steady_clock::now() + o_.join_timeout;
  v1::NodeMessage hello;
  v1::Hello* h = hello.mutable_hello();
  h->set_node_rank(o_.node_rank);
  for (const engine::Device& d : o_.workers.devices) h->add_devices(d.ToString());
  h->set_protocol_version(runtime::kProtocolVersion);
  h->set_layout_sizes(LayoutSizes());
  h->set_model(o_.model);
  h->set_cpu_numerics(o_.cpu_numerics);
  auto creds = ChannelCredentials(o_.tls);
  if (!creds.ok()) {
    spdlog::critical("{}", std::string(creds.status().message()));
    return 2;
  }
  for (;;) {
    // A fresh channel each time: its own reconnect back-off would otherwise outgrow ours.
    grpc::ChannelArguments args;
    // A plan with long penalty histories may pass gRPC's 4 MiB default; the leader refuses limits
    // whose largest plan passes kMaxNodePlanBytes (runtime/protocol.h), so nothing larger comes.
    args.SetMaxReceiveMessageSize(static_cast<int>(runtime::kMaxNodePlanBytes + (1 << 20)));
    auto stub = v1::Cluster::NewStub(grpc::CreateCustomChannel(o_.leader, *creds, args));
    {
      std::lock_guard<std::mutex> lock(context_mu_);
      stream_.reset();  // before its context
      context_ = std::make_unique<grpc::ClientContext>();
    }
    stream_ = stub->Join(context_.get());
    deadline_ns_ = runtime::NowNs() + kJoinAttemptNs;
    v1::LeaderMessage first;
    if (stream_->Write(hello) && stream_->Read(&first) && first.has_welcome()) {
      welcome_ = first.welcome();
      deadline_ns_ = 0;
      {
        std::lock_guard<std::mutex> lock(lost_mu_);
        lost_.clear();
      }
      spdlog::info("joined the leader at {} as ranks {}..{} of {}", o_.leader, welcome_.first_rank(),
                   welcome_.first_rank() + static_cast<int>(o_.workers.devices.size()) - 1, welcome_.world_size());
      return 0;
    }
    const grpc::Status st = stream_->Finish();
    if (st.error_code() == grpc::StatusCode::INVALID_ARGUMENT ||
        st.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
      spdlog::critical("the leader at {} refused this node: {}", o_.leader, st.error_message());
      return 2;
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      spdlog::critical("could not join the leader at {} within {} s: {}", o_.leader, o_.join_timeout.count() / 1000.0,
                       st.error_message());
      return 1;
    }
    const auto wait = std::min<std::chrono::steady_clock::duration>(backoff, deadline - now);
    spdlog::warn("cannot join the leader at {} ({}); retrying in {:.1f} s", o_.leader, st.error_message(),
                 std::chrono::duration<double>(wait).count());
    std::this_thread::sleep_for(wait);
    backoff = std::min(2 * backoff, std::chrono::milliseconds(5000));
  }
}

void Follower::Retire() {
  std::unique_ptr<runtime::WorkerGroup> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    old = std::move(share_);
  }
  if (old) old->Kill();
}

void Follower::StartShare(const v1::Start& start) {
  Retire();
  std::lock_guard<std::mutex> lock(mu_);
  generation_ = start.generation();
  failure_.clear();
  sent_keys_.clear();
  runtime::Limits limits;
  runtime::KvSizing kv;
  if (start.limits().size() != sizeof limits || start.kv_sizing().size() != sizeof kv) {
    failure_ = "the leader's Start carries limits of another size";
    return;
  }
  std::memcpy(&limits, start.limits().data(), sizeof limits);
  std::memcpy(&kv, start.kv_sizing().data(), sizeof kv);
  kv.host_share_bytes = 0;  // this node's memory, measured here
  runtime::WorkerGroupOptions w = o_.workers;
  const int local = static_cast<int>(o_.workers.devices.size());
  w.devices.assign(limits.world_size, engine::Device::Cpu());
  for (int i = 0; i < local && welcome_.first_rank() + i < limits.world_size; ++i) {
    w.devices[welcome_.first_rank() + i] = o_.workers.devices[i];
  }
  if (w.model_dir.empty()) w.model_dir = start.model_dir();  // the leader's, on a shared volume
  w.first_rank = welcome_.first_rank();
  w.local_ranks = local;
  w.kv_sizing = kv;
  w.collective_timeout = std::chrono::milliseconds(start.collective_timeout_ms());
  w.heartbeat_timeout = heartbeat_timeout_ = std::chrono::milliseconds(start.heartbeat_timeout_ms());
  w.start_timeout = std::chrono::milliseconds(start.start_timeout_ms());
  auto share = runtime::WorkerGroup::StartShare(w, limits);
  if (!share.ok()) {
    failure_ = std::string(share.status().message());
    spdlog::error("cannot start this node's workers: {}", failure_);
    return;
  }
  share_ = std::move(*share);
  if (start.kv_blocks() != 0) share_->SetKvBlocks(start.kv_blocks());
  spdlog::info("generation {}: ranks {}..{} starting", generation_, share_->local_begin(), share_->local_end() - 1);
}

void Follower::PublishPlan(const v1::Plan& p) {
  // The previous step may still be finishing here (rank 0 on the leader is done once the last
  // collective is); a worker that failed meanwhile is reported by the report thread. Bounded by
  // the heartbeat timeout, plus the time the host kept this thread or the node's workers from a
  // CPU meanwhile (a starved node lags; one that spins without finishing does not wait), at most
  // 10 x the heartbeat timeout. The leader's silence is not judged meanwhile.
  const uint64_t start = runtime::NowNs();
  const uint64_t timeout = static_cast<uint64_t>(heartbeat_timeout_.count()) * 1'000'000;
  runtime::OwnWaitMeter meter;
  meter.Take();
  uint64_t own_wait = 0;
  // The local workers' run-queue wait at the first look past `timeout` (-1: not read yet).
  std::vector<int64_t> worker_wait0;
  publishing_ = true;
  struct Done {
    Follower* f;
    uint64_t start;
    ~Done() {
      std::lock_guard<std::mutex> lock(f->lost_mu_);  // one step for the watchdog: excused, then judged
      const uint64_t now = runtime::NowNs();
      if (f->leader_silence_) f->leader_silence_->NotListened(now - start, now);
      f->publishing_ = false;
    }
  } done{this, start};
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!share_ || p.generation() != generation_ || !failure_.empty()) return;
      if (share_->PlanAreaFree()) {
        Status s = share_->PublishPlan(p.step(), p.header(), p.seqs(), p.tokens(), p.blocks(), p.history());
        if (!s.ok()) failure_ = StrCat("step ", p.step(), ": ", std::string(s.message()));
        const uint64_t now = runtime::NowNs();
        if (now >= p.sent_ns() && relay_ns_.size() < kMaxRelaySamples) relay_ns_.push_back(now - p.sent_ns());
        return;
      }
      const uint64_t now = runtime::NowNs(), waited = now - start;
      if (waited > timeout) {
        // Past the plain timeout: how long did the host keep this thread or the workers waiting?
        own_wait += meter.Take();
        const std::vector<pid_t> pids = share_->worker_pids();
        uint64_t workers_wait = 0;
        worker_wait0.resize(share_->local_end() - share_->local_begin(), -1);
        for (int r = share_->local_begin(), i = 0; r < share_->local_end(); ++r, ++i) {
          const runtime::ThreadSched t = runtime::ReadThreadSched(pids[r], pids[r]);
          if (!t.ok) continue;
          const auto wait = static_cast<int64_t>(t.wait_ns);
          if (worker_wait0[i] < 0) worker_wait0[i] = wait;
          if (wait > worker_wait0[i])
            workers_wait = std::max(workers_wait, static_cast<uint64_t>(wait - worker_wait0[i]));
        }
        if (waited > std::min(10 * timeout, timeout + std::max(own_wait, workers_wait))) {
          failure_ =
              StrCat("step ", p.step(), ": this node's workers were still in the previous step ", waited / 1'000'000,
                     " ms after the leader's rank 0 finished it (the host kept them waiting ",
                     std::max(own_wait, workers_wait) / 1'000'000, " ms of it)");
          return;
        }
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(
        runtime::NowNs() - start > timeout ? 1000 : 20));  // past the timeout each look reads /proc
  }
}

void Follower::Handle(const v1::LeaderMessage& m) {
  switch (m.kind_case()) {
    case v1::LeaderMessage::kStart:
      StartShare(m.start());
      break;
    case v1::LeaderMessage::kKvBlocks: {
      std::lock_guard<std::mutex> lock(mu_);
      if (share_ && m.kv_blocks().generation() == generation_) share_->SetKvBlocks(m.kv_blocks().blocks());
      break;
    }
    case v1::LeaderMessage::kPlan:
      PublishPlan(m.plan());
      break;
    case v1::LeaderMessage::kStore: {
      std::lock_guard<std::mutex> lock(mu_);
      if (!share_ || m.store().generation() != generation_) break;
      runtime::ShmStore store(share_->store_slots(), share_->store_slot_count());
      for (const v1::StoreEntry& e : m.store().entries()) {
        if (store.Has(e.key())) continue;
        sent_keys_.insert(e.key());  // the leader has it: no need to send it back
        try {
          store.set(e.key(), std::vector<char>(e.value().begin(), e.value().end()));
        } catch (const std::exception& ex) {
          failure_ = StrCat("rendezvous: ", ex.what());
        }
      }
      break;
    }
    case v1::LeaderMessage::kStop: {
      Retire();
      std::lock_guard<std::mutex> lock(mu_);
      generation_ = 0;
      failure_.clear();
      if (m.stop().shutdown()) shutdown_ = true;
      break;
    }
    default:
      break;  // Ping, or a Welcome again: only news that the leader is alive
  }
}

bool Follower::Starting() {
  if (!share_) return false;
  for (int r = share_->local_begin(); r < share_->local_end(); ++r) {
    if (share_->control().ranks[r].state.load(std::memory_order_acquire) !=
        static_cast<uint32_t>(runtime::RankState::kReady)) {
      return true;
    }
  }
  return false;
}

void Follower::FillReport(v1::NodeMessage* status_message, v1::NodeMessage* keys_message) {
  v1::NodeStatus* status = status_message->mutable_status();
  // A start that failed is reported against its generation too, so the leader hears why.
  status->set_generation(share_ || !failure_.empty() ? generation_ : 0);
  status->set_failed_rank(welcome_.first_rank());
  if (share_) {
    if (failure_.empty()) {
      Status health = share_->CheckShare();
      if (!health.ok()) failure_ = std::string(health.message());
    }
    const std::vector<pid_t> pids = share_->worker_pids();
    for (int r = share_->local_end() - 1; r >= share_->local_begin(); --r) {  // the lowest rank gone or failed
      if (pids[r] <= 0 ||
          share_->control().ranks[r].state.load() == static_cast<uint32_t>(runtime::RankState::kFailed)) {
        status->set_failed_rank(r);
      }
    }
    const uint64_t now = runtime::NowNs();
    for (int r = share_->local_begin(); r < share_->local_end(); ++r) {
      const runtime::RankSlot& slot = share_->control().ranks[r];
      v1::RankStatus* rs = status->add_ranks();
      rs->set_rank(r);
      rs->set_state(slot.state.load(std::memory_order_acquire));
      if (rs->state() == static_cast<uint32_t>(runtime::RankState::kFailed)) {
        rs->set_message(std::string(slot.message, strnlen(slot.message, sizeof slot.message)));
      }
      rs->set_done_step(slot.done_step.load(std::memory_order_acquire));
      // CheckShare above judged every local heartbeat by what this host let it do
      // (runtime/liveness.h); a silence it did not excuse is in failure_.
      rs->set_alive(slot.heartbeat_ns.load(std::memory_order_relaxed) > 0 && failure_.empty());
      const uint64_t progress = slot.progress_ns.load(std::memory_order_relaxed);
      rs->set_progress_age_ns(now > progress ? now - progress : 0);
      rs->set_memory(std::string(reinterpret_cast<const char*>(&slot.memory), sizeof slot.memory));
      rs->set_steps(slot.stats.steps.load());
      rs->set_busy_ns(slot.stats.busy_ns.load());
      rs->set_exposed_comm_ns(slot.stats.exposed_comm_ns.load());
      rs->set_collective_ns(slot.stats.collective_ns.load());
      rs->set_idle_ns(slot.stats.idle_ns.load());
      rs->set_collectives(slot.stats.collectives.load());
    }
    runtime::ShmStore store(share_->store_slots(), share_->store_slot_count());
    keys_message->mutable_store()->set_generation(generation_);
    for (const auto& [key, value] : store.Entries()) {
      if (!sent_keys_.insert(key).second) continue;
      v1::StoreEntry* e = keys_message->mutable_store()->add_entries();
      e->set_key(key);
      e->set_value(std::string(value.begin(), value.end()));
    }
  }
  status->set_failure(failure_);
}

void Follower::ReportLoop() {
  runtime::OwnWaitMeter meter;  // told to the leader with each report: a freeze here is not silence
  meter.Take();
  auto next = std::chrono::steady_clock::now();
  while (!done_.load()) {
    v1::NodeMessage status, keys;
    bool starting;
    {
      std::lock_guard<std::mutex> lock(mu_);
      starting = Starting();
      FillReport(&status, &keys);
    }
    {
      std::lock_guard<std::mutex> lock(write_mu_);
      if (keys.store().entries_size() > 0 && !stream_->Write(keys)) return;
      status.mutable_status()->set_waited_ns(meter.Take());
      if (!stream_->Write(status)) return;
    }
    next += starting ? kStartingReportPeriod : kReportPeriod;
    const auto now_tp = std::chrono::steady_clock::now();
    if (next < now_tp) next = now_tp;
    std::this_thread::sleep_until(next);
  }
}

void Follower::Watchdog() {
  runtime::OwnWaitMeter meter;  // a freeze of this host is not the leader's silence
  while (!done_.load()) {
    const uint64_t deadline = deadline_ns_.load(), now = runtime::NowNs(), waited = meter.Take();
    bool cancel = false;
    {
      std::lock_guard<std::mutex> lock(lost_mu_);
      if (deadline != 0 && now > deadline) {
        lost_ = "no welcome";
        deadline_ns_ = 0;
        cancel = true;
      } else if (leader_silence_ && lost_.empty()) {
        leader_silence_->JudgeWaited(waited);
        if (!publishing_.load() && leader_silence_->Expired(now)) {
          lost_ = "the leader has been " + leader_silence_->Explain(now);
          cancel = true;
        }
      }
    }
    if (cancel) {
      std::lock_guard<std::mutex> lock(context_mu_);
      if (context_) context_->TryCancel();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

int Follower::Serve() {
  const uint64_t leader_timeout = static_cast<uint64_t>(welcome_.leader_timeout_ms()) * 1'000'000;
  {
    std::lock_guard<std::mutex> lock(lost_mu_);
    leader_silence_.emplace(leader_timeout, 5 * leader_timeout);
    leader_silence_->Heard(runtime::NowNs(), 0);
  }
  std::thread reporter([this] { ReportLoop(); });
  v1::LeaderMessage m;
  while (!shutdown_.load() && stream_->Read(&m)) {
    {
      std::lock_guard<std::mutex> lock(lost_mu_);
      leader_silence_->Heard(runtime::NowNs(), m.waited_ns());
    }
    Handle(m);
  }
  {
    std::lock_guard<std::mutex> lock(lost_mu_);
    leader_silence_.reset();
  }
  Retire();
  context_->TryCancel();
  done_ = true;
  reporter.join();
  const grpc::Status st = stream_->Finish();
  // Same-host runs (tests, benchmarks): how long a plan took from the leader to this node's workers.
  spdlog::info("plan relay, leader send to this node's publish (one clock only on one host): {}",
               DescribeRelay(relay_ns_));
  if (shutdown_.load()) {
    spdlog::info("the leader shut the group down");
    return 0;
  }
  std::string lost;
  {
    std::lock_guard<std::mutex> lock(lost_mu_);
    lost = lost_;
  }
  spdlog::critical("lost the leader at {}: {}; exiting so the group is recreated", o_.leader,
                   lost.empty() ? StrCat("stream ended (", st.error_message(), ")") : lost);
  return 1;
}

int Follower::Run() {
  watchdog_ = std::thread([this] { Watchdog(); });
  int code = Join();
  if (code == 0) code = Serve();
  done_ = true;
  watchdog_.join();
  return code;
}

}  // namespace

int RunFollower(const FollowerOptions& options) {
  Follower f(options);
  return f.Run();
}

}  // namespace kraken::cluster
