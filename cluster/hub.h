// The leader's side of a multi-node worker group (docs/runtime.md "Nodes"): a gRPC service on
// --cluster-port that follower nodes (`kraken-server --join LEADER:PORT`) join, one Join stream
// each, and the runtime::RemoteNodes the leader's WorkerGroup drives them through.
//
//   KRAKEN_ASSIGN_OR_RETURN(auto hub, Hub::Create({.listen = "0.0.0.0:8003", .nodes = 2, .ranks_per_node = 2}));
//   KRAKEN_ASSIGN_OR_RETURN(std::vector<engine::Device> remote, hub->AwaitNodes(std::chrono::minutes(2)));
//   options.devices = local devices + remote;  options.remote = hub;  WorkerGroup::Start(options);
//
// Node k (1 .. nodes - 1) holds ranks k * ranks_per_node .. (k + 1) * ranks_per_node - 1: every
// node has as many workers as the leader. Each step's plan goes to every node as the bytes the
// leader's segment holds; the node writes them into its own segment (one gRPC message per node and
// step). Liveness: each node reports every 100 ms (its own workers' liveness it judges itself, and
// reports a failure at once); the hub gives up a node silent past its node timeout, 2 x
// heartbeat_timeout plus the freezes the node reported lately (runtime/liveness.h PeerSilence; at
// most 10 x heartbeat_timeout), cancels its stream and marks its ranks failed. A node whose stream
// ends marks its ranks failed at once.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "base/status.h"
#include "cluster/credentials.h"
#include "cluster/membership.h"
#include "engine/device.h"
#include "kraken/cluster/v1/cluster.grpc.pb.h"
#include "runtime/liveness.h"
#include "runtime/remote_nodes.h"

namespace kraken::cluster {

struct HubOptions {
  std::string listen = "0.0.0.0:8003";  // host:port (port 0: any; Hub::port() tells)
  int nodes = 2;                        // including the leader
  int ranks_per_node = 1;               // the leader's workers; every node must have as many
  std::string device_kind = "cpu";      // the leader's: "cpu" or "cuda"; every node's must match
  std::string model;                    // the model's fingerprint; a node with another is refused
  std::string model_dir;                // sent to the nodes: where a node given no model finds it
  std::string cpu_numerics;             // the leader's engine::cpu::KernelNumerics(); CPU nodes must match
  std::chrono::milliseconds heartbeat_timeout{1000};  // a node silent 2 x this long (plus its freezes) is given up
  std::chrono::milliseconds collective_timeout{30000};
  std::chrono::milliseconds start_timeout{120000};
  ClusterTls tls;  // mutual TLS on the port (cluster/credentials.h), or explicitly insecure
  // What a connection that has not joined may hold: its Hello must come within hello_timeout, and
  // at most max_pending connections may wait for theirs at once (more are refused at once).
  std::chrono::milliseconds hello_timeout{5000};
  int max_pending = 16;
};

class Hub final : public runtime::RemoteNodes, private v1::Cluster::Service {
 public:
  /// Listens on options.listen. UNAVAILABLE when it cannot; INVALID_ARGUMENT for nodes < 2.
  static StatusOr<std::shared_ptr<Hub>> Create(const HubOptions& options);
  ~Hub() override;

  int port() const { return port_; }
  /// The model directory the next Start names (for nodes given none; benchmarks switch models).
  void set_model_dir(const std::string& dir) {
    std::lock_guard<std::mutex> lock(mu_);
    options_.model_dir = dir;
  }
  /// Waits until every follower node has joined; their devices in rank order. DEADLINE_EXCEEDED
  /// naming the node ranks still missing after `timeout`.
  StatusOr<std::vector<engine::Device>> AwaitNodes(std::chrono::milliseconds timeout);

  Status Start(uint64_t generation, uint8_t* segment, const runtime::Layout& layout, uint64_t deadline_ns) override;
  void ExchangeStore() override;
  void SetKvBlocks(int32_t blocks) override;
  void Publish(uint64_t step) override;
  void Stop() override;
  /// Ends AwaitNodes and Start at once (CANCELLED), now and from now on: the server is stopping.
  void Cancel() override;
  std::string Where(int rank) const override;

 private:
  struct Node {
    bool joined_once = false;
    bool connected = false;
    uint64_t connection = 0;  // which Join stream is the current one
    grpc::ServerContext* context = nullptr;
    std::string peer;
    std::vector<engine::Device> devices;
    runtime::PeerSilence silence{0, 0};  // since its last message, judged by the node timeout
    std::string lost;                    // why the watchdog ended its stream ("" when it did not)
    std::vector<v1::LeaderMessage> outbox;
    std::set<std::string> sent_keys;  // rendezvous keys sent in this generation
  };
  explicit Hub(const HubOptions& options) : options_(options), nodes_(options.nodes) {}
  grpc::Status Join(grpc::ServerContext* context,
                    grpc::ServerReaderWriter<v1::LeaderMessage, v1::NodeMessage>* stream) override;
  // Checks a Hello (cluster/membership.h); the node rank it takes, or the refusal.
  StatusOr<int> Admit(const v1::Hello& hello, const std::string& peer);
  // The writer of one connection: the outbox in order, a Ping when idle for 100 ms.
  void WriteLoop(int node, uint64_t connection, grpc::ServerReaderWriter<v1::LeaderMessage, v1::NodeMessage>* stream);
  // Every 20 ms until the hub closes: cancels the Join streams whose Hello is overdue and those of
  // nodes silent past their node timeout.
  void WatchStreams();
  // Mirrors a node's report into its ranks' slots (under mu_).
  void Apply(int node, const v1::NodeStatus& status);
  void SetRemoteKeys(const v1::StoreEntries& entries);
  void FailNode(int node, const std::string& why, int rank);  // marks `rank` of `node` failed (under mu_)
  void Send(int node, v1::LeaderMessage message);             // under mu_
  int first_rank(int node) const { return node * options_.ranks_per_node; }
  // The follower nodes not joined (and, with `fresh`, silent past the node timeout), as
  // "1 (not joined), 2 (silent for 2200 ms (allowed ...))"; empty when every node is there (under mu_).
  std::string Unready(bool fresh) const;

  HubOptions options_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Node> nodes_;  // index = node rank; 0 (the leader) unused
  uint64_t connections_ = 0;
  bool closing_ = false;
  bool cancelled_ = false;  // Cancel
  // Join streams waiting for their Hello, with the NowNs() deadline after which the watchdog
  // cancels them.
  std::map<grpc::ServerContext*, uint64_t> pending_;
  std::thread watchdog_;
  // The attached segment (between Start and Stop).
  uint8_t* segment_ = nullptr;
  runtime::Layout layout_{};
  uint64_t generation_ = 0;  // of the attached start, as the nodes know it
  uint64_t starts_ = 0;
};

}  // namespace kraken::cluster
