// Who may join a multi-node group, and which node rank a newcomer takes: the rules the leader's
// hub (cluster/hub.h) applies to every Hello, as pure functions of what the hub knows.
//
//   KRAKEN_ASSIGN_OR_RETURN(auto devices, CheckHello(hello, peer, rules));
//   KRAKEN_ASSIGN_OR_RETURN(int node, AssignNodeRank(hello.node_rank(), holders, peer));
#pragma once

#include <string>
#include <vector>

#include "base/status.h"
#include "engine/device.h"
#include "kraken/cluster/v1/cluster.pb.h"

namespace kraken::cluster {

/// The sizes of the runtime structures a plan carries as bytes; both ends must agree.
std::string LayoutSizes();

/// What every node of the group must share with the leader.
struct MembershipRules {
  int ranks_per_node = 1;           // the leader's workers; every node must have as many
  std::string device_kind = "cpu";  // engine::DeviceTraits::kind of the leader's devices
  std::string model;                // the model's fingerprint; empty in a Hello: the node loads the leader's
  std::string cpu_numerics;         // the leader's engine::cpu::KernelNumerics(); CPU nodes must match it
};

/// Checks a node's Hello against the rules: the same runtime protocol and plan layout
/// (FAILED_PRECONDITION: "run the same kraken-server build on every node"), the same model
/// (FAILED_PRECONDITION), workers on devices of the leader's kind (INVALID_ARGUMENT: one group
/// speaks one collective library) and as many of them as the leader has (INVALID_ARGUMENT), and,
/// for CPU workers, CPU kernels of the leader's numerics (FAILED_PRECONDITION: a rank's shard
/// would compute other bits on another node). Each message names the peer. Returns the node's
/// devices.
StatusOr<std::vector<engine::Device>> CheckHello(const v1::Hello& hello, const std::string& peer,
                                                 const MembershipRules& rules);

/// What the hub knows of one node rank (index 0 is the leader's and never assigned).
struct RankHolder {
  bool joined_once = false;  // some node held it since the hub started
  bool connected = false;    // a node's stream holds it now
  bool live = false;         // connected, and not silent past its allowance
  std::string peer;          // the holder's address, for messages
};

/// The node rank a Hello asking for `asked` takes among `ranks` (size: --nodes). 0 asks for any:
/// the lowest rank never held, else the lowest not held by a live node (a silent holder is
/// replaced). ALREADY_EXISTS when the rank (or, for 0, every rank) is held by a live node;
/// INVALID_ARGUMENT when `asked` is outside [1, nodes - 1].
StatusOr<int> AssignNodeRank(int asked, const std::vector<RankHolder>& ranks, const std::string& peer);

}  // namespace kraken::cluster
