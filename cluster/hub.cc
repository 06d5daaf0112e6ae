#include "cluster/hub.h"

#include <cstring>
#include <thread>

#include "cluster/membership.h"
#include "engine/device.h"
#include "proto/grpc_status.h"
#include "runtime/shm.h"
#include "runtime/shm_store.h"

namespace kraken::cluster {
namespace {

constexpr auto kPingPeriod = std::chrono::milliseconds(100);

std::string Bytes(const void* p, size_t n) {
  return std::string(static_cast<const char*>(p), n);
}

}  // namespace

StatusOr<std::shared_ptr<Hub>> Hub::Create(const HubOptions& o) {
  if (o.nodes < 2) return InvalidArgument("a multi-node group needs --nodes >= 2, got ", o.nodes);
  if (o.ranks_per_node < 1 || o.nodes * o.ranks_per_node > runtime::kMaxWorld) {
    return InvalidArgument(o.nodes, " nodes x ", o.ranks_per_node, " workers exceed the largest world size ",
                           runtime::kMaxWorld);
  }
  KRAKEN_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds, ServerCredentials(o.tls));
  std::shared_ptr<Hub> hub(new Hub(o));
  grpc::ServerBuilder builder;
  builder.AddListeningPort(o.listen, creds, &hub->port_);
  builder.RegisterService(static_cast<v1::Cluster::Service*>(hub.get()));
  // A node sends its reports and rendezvous keys (a few KiB for 64 ranks); nothing near 1 MiB.
  builder.SetMaxReceiveMessageSize(1 << 20);
  // Each Join stream holds one of the server's threads for its life: the joined nodes, those
  // waiting for their Hello (max_pending) and the server's own pollers fit; a call beyond is
  // refused RESOURCE_EXHAUSTED by gRPC before it costs a thread.
  grpc::ResourceQuota quota("kraken-cluster");
  quota.SetMaxThreads(o.nodes + o.max_pending + 8);  // docs/deploy.md "The cluster port" states it
  builder.SetResourceQuota(quota);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);  // a port in use fails the start (never shared)
  hub->server_ = builder.BuildAndStart();
  if (!hub->server_ || hub->port_ == 0)
    return absl::UnavailableError(StrCat("cannot listen on ", o.listen,
                                         " for the cluster (--cluster-port): is the port in use by another process?"));
  hub->watchdog_ = std::thread([raw = hub.get()] { raw->WatchStreams(); });
  return hub;
}

void Hub::WatchStreams() {
  runtime::OwnWaitMeter meter;  // a freeze of this host is not the nodes' silence
  std::unique_lock<std::mutex> lock(mu_);
  while (!closing_) {
    const uint64_t now = runtime::NowNs(), waited = meter.Take();
    for (auto& [context, deadline] : pending_) {
      if (deadline != 0 && now > deadline) {
        context->TryCancel();  // its Read returns false; Join refuses it
        deadline = 0;
      }
    }
    for (int n = 1; n < options_.nodes; ++n) {
      Node& node = nodes_[n];
      if (!node.connected || !node.lost.empty()) continue;
      node.silence.JudgeWaited(waited);
      if (node.silence.Expired(now)) {
        node.lost = node.silence.Explain(now);
        node.context->TryCancel();  // its Join ends and fails the node's ranks
      }
    }
    cv_.wait_for(lock, std::chrono::milliseconds(20));
  }
}

Hub::~Hub() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    v1::LeaderMessage m;
    m.mutable_stop()->set_shutdown(true);
    for (size_t n = 1; n < nodes_.size(); ++n) Send(static_cast<int>(n), m);
  }
  // The writers flush the shutdown within a ping period; then every stream is ended.
  std::this_thread::sleep_for(2 * kPingPeriod);
  {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
    for (Node& n : nodes_) {
      if (n.connected && n.context != nullptr) n.context->TryCancel();
    }
  }
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

StatusOr<int> Hub::Admit(const v1::Hello& hello, const std::string& peer) {
  KRAKEN_ASSIGN_OR_RETURN(std::vector<engine::Device> devices, CheckHello(hello, peer,
                                                                          {.ranks_per_node = options_.ranks_per_node,
                                                                           .device_kind = options_.device_kind,
                                                                           .model = options_.model,
                                                                           .cpu_numerics = options_.cpu_numerics}));
  std::vector<RankHolder> ranks(nodes_.size());
  const uint64_t now = runtime::NowNs();
  for (size_t n = 0; n < nodes_.size(); ++n) {
    ranks[n] = {.joined_once = nodes_[n].joined_once,
                .connected = nodes_[n].connected,
                .live = nodes_[n].connected && !nodes_[n].silence.Expired(now),
                .peer = nodes_[n].peer};
  }
  KRAKEN_ASSIGN_OR_RETURN(const int node, AssignNodeRank(hello.node_rank(), ranks, peer));
  if (nodes_[node].connected) nodes_[node].context->TryCancel();  // a silent holder: the newcomer replaces it
  nodes_[node].devices = std::move(devices);
  return node;
}

grpc::Status Hub::Join(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<v1::LeaderMessage, v1::NodeMessage>* stream) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<int>(pending_.size()) >= options_.max_pending)
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "too many connections are joining at once");
    pending_[context] = runtime::NowNs() + static_cast<uint64_t>(options_.hello_timeout.count()) * 1'000'000;
  }
  v1::NodeMessage first;
  const bool read = stream->Read(&first);
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.erase(context);
  }
  if (!read || !first.has_hello()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        StrCat("a Join stream starts with Hello, within ", options_.hello_timeout.count(), " ms"));
  }
  int node = 0;
  uint64_t connection = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the leader is shutting down");
    auto admitted = Admit(first.hello(), context->peer());
    if (!admitted.ok()) return ToGrpc(admitted.status());
    node = *admitted;
    Node& n = nodes_[node];
    n.connected = n.joined_once = true;
    n.connection = connection = ++connections_;
    n.context = context;
    n.peer = context->peer();
    const uint64_t timeout = static_cast<uint64_t>(options_.heartbeat_timeout.count()) * 1'000'000;
    n.silence = runtime::PeerSilence(2 * timeout, 10 * timeout);
    n.silence.Heard(runtime::NowNs(), 0);
    n.lost.clear();
    n.outbox.clear();
    v1::LeaderMessage welcome;
    welcome.mutable_welcome()->set_first_rank(first_rank(node));
    welcome.mutable_welcome()->set_world_size(options_.nodes * options_.ranks_per_node);
    welcome.mutable_welcome()->set_leader_timeout_ms(static_cast<uint32_t>(2 * options_.heartbeat_timeout.count()));
    n.outbox.push_back(std::move(welcome));
  }
  cv_.notify_all();
  std::thread writer([&] { WriteLoop(node, connection, stream); });
  v1::NodeMessage m;
  while (stream->Read(&m)) {
    std::lock_guard<std::mutex> lock(mu_);
    if (nodes_[node].connection != connection) break;  // replaced
    nodes_[node].silence.Heard(runtime::NowNs(), m.has_status() ? m.status().waited_ns() : 0);
    if (m.has_status()) Apply(node, m.status());
    if (m.has_store()) SetRemoteKeys(m.store());
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    Node& n = nodes_[node];
    if (n.connection == connection) {
      n.connected = false;
      n.context = nullptr;
      FailNode(node, StrCat("node ", node, " at ", n.peer, n.lost.empty() ? " disconnected" : " has been " + n.lost),
               first_rank(node));
    }
  }
  context->TryCancel();
  cv_.notify_all();
  writer.join();
  return grpc::Status::OK;
}

void Hub::WriteLoop(int node, uint64_t connection,
                    grpc::ServerReaderWriter<v1::LeaderMessage, v1::NodeMessage>* stream) {
  runtime::OwnWaitMeter meter;  // told to the node with each batch: a freeze here is not silence
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    Node& n = nodes_[node];
    if (n.connection != connection || !n.connected) return;
    std::vector<v1::LeaderMessage> batch;
    if (!cv_.wait_for(lock, kPingPeriod,
                      [&] { return !n.outbox.empty() || n.connection != connection || !n.connected; })) {
      batch.emplace_back().mutable_ping();
    }
    batch.insert(batch.end(), std::make_move_iterator(n.outbox.begin()), std::make_move_iterator(n.outbox.end()));
    n.outbox.clear();
    lock.unlock();
    if (!batch.empty()) batch.front().set_waited_ns(meter.Take());
    bool ok = true;
    for (const v1::LeaderMessage& m : batch) ok = ok && stream->Write(m);
    lock.lock();
    if (!ok) return;  // the reader sees the stream end too
  }
}

void Hub::Send(int node, v1::LeaderMessage message) {
  Node& n = nodes_[node];
  if (!n.connected) return;
  n.outbox.push_back(std::move(message));
  cv_.notify_all();
}

void Hub::Apply(int node, const v1::NodeStatus& status) {
  if (segment_ == nullptr || status.generation() != generation_) return;
  auto* control = runtime::At<runtime::Control>(segment_, 0);
  const uint64_t now = runtime::NowNs();
  for (const v1::RankStatus& rs : status.ranks()) {
    const int r = rs.rank();
    if (r < first_rank(node) || r >= first_rank(node) + options_.ranks_per_node) continue;
    runtime::RankSlot& slot = control->ranks[r];
    const uint32_t state = slot.state.load(std::memory_order_acquire);
    if (state == static_cast<uint32_t>(runtime::RankState::kFailed)) continue;  // its news is out already
    // Memory is read by the leader once a state is seen: written only with a new state.
    if (rs.state() != state && rs.memory().size() == sizeof(runtime::WorkerMemory)) {
      std::memcpy(&slot.memory, rs.memory().data(), sizeof(runtime::WorkerMemory));
    }
    if (rs.state() == static_cast<uint32_t>(runtime::RankState::kFailed)) {
      std::snprintf(slot.message, sizeof slot.message, "%s (on node %d at %s)", rs.message().c_str(), node,
                    nodes_[node].peer.c_str());
    }
    slot.stats.steps.store(rs.steps(), std::memory_order_relaxed);
    slot.stats.busy_ns.store(rs.busy_ns(), std::memory_order_relaxed);
    slot.stats.exposed_comm_ns.store(rs.exposed_comm_ns(), std::memory_order_relaxed);
    slot.stats.collective_ns.store(rs.collective_ns(), std::memory_order_relaxed);
    slot.stats.idle_ns.store(rs.idle_ns(), std::memory_order_relaxed);
    slot.stats.collectives.store(rs.collectives(), std::memory_order_relaxed);
    slot.done_step.store(rs.done_step(), std::memory_order_release);
    slot.progress_ns.store(now - std::min(now, rs.progress_age_ns()), std::memory_order_relaxed);
    if (rs.alive()) slot.heartbeat_ns.store(now, std::memory_order_relaxed);
    slot.state.store(rs.state(), std::memory_order_release);
  }
  if (!status.failure().empty()) {
    FailNode(node, StrCat(status.failure(), " (on node ", node, " at ", nodes_[node].peer, ")"), status.failed_rank());
  }
}

void Hub::FailNode(int node, const std::string& why, int rank) {
  if (segment_ == nullptr) return;
  if (rank < first_rank(node) || rank >= first_rank(node) + options_.ranks_per_node) rank = first_rank(node);
  runtime::RankSlot& slot = runtime::At<runtime::Control>(segment_, 0)->ranks[rank];
  if (slot.state.load(std::memory_order_acquire) == static_cast<uint32_t>(runtime::RankState::kFailed)) return;
  std::snprintf(slot.message, sizeof slot.message, "%s", why.c_str());
  slot.state.store(static_cast<uint32_t>(runtime::RankState::kFailed), std::memory_order_release);
}

void Hub::SetRemoteKeys(const v1::StoreEntries& entries) {
  if (segment_ == nullptr || entries.generation() != generation_) return;
  runtime::ShmStore store(runtime::At<runtime::StoreSlot>(segment_, layout_.store), layout_.store_slots);
  for (const v1::StoreEntry& e : entries.entries()) {
    if (store.Has(e.key())) continue;
    try {
      store.set(e.key(), std::vector<char>(e.value().begin(), e.value().end()));
    } catch (const std::exception&) {
      return;  // a full store: the rendezvous times out and names the ranks
    }
  }
}

std::string Hub::Unready(bool fresh) const {
  const uint64_t now = runtime::NowNs();
  std::string out;
  for (int n = 1; n < options_.nodes; ++n) {
    if (!nodes_[n].connected) {
      StrAppend(&out, out.empty() ? "" : ", ", n, " (not joined)");
    } else if (fresh && nodes_[n].silence.Expired(now)) {
      StrAppend(&out, out.empty() ? "" : ", ", n, " (", nodes_[n].silence.Explain(now), ")");
    }
  }
  return out;
}

void Hub::Cancel() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
  }
  cv_.notify_all();
}

StatusOr<std::vector<engine::Device>> Hub::AwaitNodes(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return cancelled_ || Unready(/*fresh=*/false).empty(); })) {
    return absl::DeadlineExceededError(StrCat("node(s) ", Unready(false), " did not join within ", timeout.count(),
                                              " ms (followers run kraken-server --join <this host>:", port_, ")"));
  }
  if (cancelled_) return absl::CancelledError("the server is stopping");
  std::vector<engine::Device> out;
  for (int n = 1; n < options_.nodes; ++n) out.insert(out.end(), nodes_[n].devices.begin(), nodes_[n].devices.end());
  return out;
}

Status Hub::Start(uint64_t /*generation*/, uint8_t* segment, const runtime::Layout& layout, uint64_t deadline_ns) {
  std::unique_lock<std::mutex> lock(mu_);
  // A node silent past its node timeout is dropped by the watchdog (it must join again); one that
  // joined meanwhile is waited for.
  for (std::string unready = Unready(true); !unready.empty(); unready = Unready(true)) {
    const uint64_t now = runtime::NowNs();
    if (cancelled_) return absl::CancelledError("the server is stopping");
    if (now >= deadline_ns) {
      return absl::DeadlineExceededError(StrCat("node(s) ", unready, " not ready to start in time"));
    }
    cv_.wait_for(lock, std::chrono::nanoseconds(std::min<uint64_t>(deadline_ns - now, 50'000'000)));
  }
  segment_ = segment;
  layout_ = layout;
  // The nodes know each start by the hub's own count: a group started anew on the same hub (a
  // benchmark's next model) counts its generations from 1 again, and a late report from the
  // previous one must not be taken for the new one's.
  generation_ = ++starts_;
  const auto* control = runtime::At<runtime::Control>(segment, 0);
  v1::LeaderMessage m;
  v1::Start* s = m.mutable_start();
  s->set_generation(generation_);
  s->set_limits(Bytes(&control->limits, sizeof control->limits));
  s->set_kv_sizing(Bytes(&control->kv_sizing, sizeof control->kv_sizing));
  s->set_kv_blocks(control->kv_blocks.load(std::memory_order_acquire));
  s->set_collective_timeout_ms(static_cast<uint32_t>(options_.collective_timeout.count()));
  s->set_heartbeat_timeout_ms(static_cast<uint32_t>(options_.heartbeat_timeout.count()));
  s->set_start_timeout_ms(static_cast<uint32_t>(options_.start_timeout.count()));
  s->set_model_dir(options_.model_dir);
  for (int n = 1; n < options_.nodes; ++n) {
    nodes_[n].sent_keys.clear();
    Send(n, m);
  }
  return absl::OkStatus();
}

void Hub::ExchangeStore() {
  std::lock_guard<std::mutex> lock(mu_);
  if (segment_ == nullptr) return;
  runtime::ShmStore store(runtime::At<runtime::StoreSlot>(segment_, layout_.store), layout_.store_slots);
  const auto entries = store.Entries();
  for (int n = 1; n < options_.nodes; ++n) {
    v1::LeaderMessage m;
    m.mutable_store()->set_generation(generation_);
    for (const auto& [key, value] : entries) {
      if (!nodes_[n].sent_keys.insert(key).second) continue;
      v1::StoreEntry* e = m.mutable_store()->add_entries();
      e->set_key(key);
      e->set_value(std::string(value.begin(), value.end()));
    }
    if (m.store().entries_size() > 0) Send(n, std::move(m));
  }
}

void Hub::SetKvBlocks(int32_t blocks) {
  std::lock_guard<std::mutex> lock(mu_);
  v1::LeaderMessage m;
  m.mutable_kv_blocks()->set_generation(generation_);
  m.mutable_kv_blocks()->set_blocks(blocks);
  for (int n = 1; n < options_.nodes; ++n) Send(n, m);
}

void Hub::Publish(uint64_t step) {
  std::lock_guard<std::mutex> lock(mu_);
  if (segment_ == nullptr) return;
  const auto* h = runtime::At<runtime::PlanHeader>(segment_, layout_.plan_header);
  v1::LeaderMessage m;
  v1::Plan* p = m.mutable_plan();
  p->set_generation(generation_);
  p->set_step(step);
  p->set_header(Bytes(h, sizeof *h));
  p->set_seqs(Bytes(segment_ + layout_.plan_seqs, sizeof(runtime::PlanSeq) * h->num_seqs));
  p->set_tokens(Bytes(segment_ + layout_.tokens, sizeof(int32_t) * h->num_tokens));
  p->set_blocks(Bytes(segment_ + layout_.blocks, sizeof(int32_t) * h->num_block_ids));
  p->set_history(Bytes(segment_ + layout_.history, sizeof(int32_t) * h->num_history));
  p->set_sent_ns(runtime::NowNs());
  for (int n = 1; n < options_.nodes; ++n) Send(n, m);
}

void Hub::Stop() {
  std::lock_guard<std::mutex> lock(mu_);
  segment_ = nullptr;
  v1::LeaderMessage m;
  m.mutable_stop()->set_shutdown(false);
  for (int n = 1; n < options_.nodes; ++n) Send(n, m);
}

std::string Hub::Where(int rank) const {
  std::lock_guard<std::mutex> lock(mu_);
  const int node = rank / options_.ranks_per_node;
  if (node < 1 || node >= options_.nodes) return "no node";
  return StrCat("node ", node, " at ", nodes_[node].peer.empty() ? "(not joined)" : nodes_[node].peer);
}

}  // namespace kraken::cluster
