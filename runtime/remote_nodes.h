// The other nodes of a multi-node worker group, as the leader's WorkerGroup drives them
// (docs/runtime.md "Nodes"). The runtime knows them only through this interface; cluster/
// implements it over gRPC (cluster/hub.h). Every rank of the group has a RankSlot in the leader's
// segment: the implementation keeps the remote ranks' slots up to date from their nodes' reports
// (state, heartbeat, progress, done step, statistics, memory, failure), so the leader supervises
// a remote rank's exit, failure and progress as it does a local one's. Liveness is the nodes'
// own business: each node judges its workers' heartbeats by its own host's scheduler, and the
// implementation judges each node by its reports, marking the node's ranks kFailed (with the
// reason in their slot's message) when it gives a node up.
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"
#include "runtime/protocol.h"

namespace kraken::runtime {

class RemoteNodes {
 public:
  virtual ~RemoteNodes() = default;
  /// Waits until every node is connected (DEADLINE_EXCEEDED naming the missing nodes once
  /// NowNs() passes `deadline_ns`), attaches `segment` (laid out by `layout`; its Control is
  /// initialized) and tells each node to start its workers for the group's generation
  /// `generation` (the nodes may know the start by a number of the implementation's own). From
  /// here until Stop the implementation writes the remote ranks' slots and their rendezvous keys
  /// into the segment.
  virtual Status Start(uint64_t generation, uint8_t* segment, const Layout& layout, uint64_t deadline_ns) = 0;
  /// Forwards the rendezvous keys the leader's workers set since the last call (called while the
  /// workers start).
  virtual void ExchangeStore() = 0;
  /// Tells every node the KV cache's block count (< 0: none fits; the nodes' workers fail).
  virtual void SetKvBlocks(int32_t blocks) = 0;
  /// Sends step `step`'s plan (already written in the attached segment) to every node. Does not
  /// block on the network.
  virtual void Publish(uint64_t step) = 0;
  /// Tells every node to stop its workers and detaches the segment: no write into it after this
  /// returns.
  virtual void Stop() = 0;
  /// Makes a Start under way, and every later one, return CANCELLED within 50 ms (the server is
  /// stopping). Thread: any.
  virtual void Cancel() = 0;
  /// Where remote rank `rank` runs, for reports: "node 1 at ipv4:10.0.0.2:41234".
  virtual std::string Where(int rank) const = 0;
};

}  // namespace kraken::runtime
