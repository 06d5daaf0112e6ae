// A follower node of a multi-node worker group (`kraken-server --join LEADER:PORT`;
// docs/runtime.md "Nodes"). It joins the leader's Cluster service (cluster/hub.h), and for each
// Start the leader sends it spawns this node's workers (a runtime::WorkerGroup share) with their
// global ranks, forwards their rendezvous keys, reports their state every 100 ms, and writes every
// step plan it receives into the node's own segment. It serves no API.
//
// It retries an unreachable leader with back-off (0.2 s doubling to 5 s), saying why each time,
// until `join_timeout`; once joined, losing the leader (the stream ends, or the leader is silent
// for the Welcome's leader_timeout) kills its workers and ends the process non-zero, so that
// LeaderWorkerSet recreates the group. A Stop with shutdown (the leader is ending) ends it with 0.
#pragma once

#include <chrono>
#include <string>

#include "cluster/credentials.h"
#include "runtime/worker_group.h"

namespace kraken::cluster {

struct FollowerOptions {
  std::string leader;        // host:port of the leader's --cluster-port
  int node_rank = 0;         // 1 .. nodes - 1; 0 = the leader assigns the lowest free one
  std::string model;         // the model's fingerprint (the leader refuses another); empty with no model_dir
  std::string cpu_numerics;  // this node's engine::cpu::KernelNumerics() (the leader refuses other than its own)
  // model_dir (empty: the path the leader loads), devices (this node's, in rank order),
  // threads_per_worker, collective_host, worker_binary; the limits, timeouts and ranks come from
  // the leader.
  runtime::WorkerGroupOptions workers;
  std::chrono::milliseconds join_timeout{120000};  // give up reaching the leader after this long
  ClusterTls tls;  // mutual TLS to the leader (cluster/credentials.h), or explicitly insecure
};

/// Runs the follower until the leader ends it or is lost. Returns the process exit code: 0 after
/// the leader's shutdown, 1 when the leader was lost or never reached, 2 when it refused this node
/// (a different build, model or CPU kernel numerics, a node rank out of range, a different worker
/// count) or the TLS settings are incomplete or unreadable.
int RunFollower(const FollowerOptions& options);

}  // namespace kraken::cluster
