// Collectives between the ranks of a tensor-parallel world. The models call these at their
// reduction points; W = 1 uses LocalCommunicator, whose sums are the local values themselves.
// The multi-process runtime adds Gloo (CPU workers) and NCCL (GPU workers) implementations.
//
//   KRAKEN_ASSIGN_OR_RETURN(CollectiveHandle h, comm.StartAllReduceSum(buf, n));
//   ... independent compute (Kraken: the next layer's attention) ...
//   KRAKEN_RETURN_IF_ERROR(comm.Wait(h));     // buf now holds the sum over ranks
#pragma once

#include <cstdint>

#include "engine/status.h"

namespace kraken::engine {

/// Identifies one in-flight collective of a communicator.
struct CollectiveHandle {
  uint64_t id = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  /// Starts an in-place sum over ranks of `count` floats at `data` (backend memory), which must
  /// not be touched until Wait returns. Errors: UNAVAILABLE when a peer is gone.
  virtual StatusOr<CollectiveHandle> StartAllReduceSum(float* data, int64_t count) = 0;
  /// Blocks until the collective finishes.
  virtual Status Wait(CollectiveHandle handle) = 0;
  /// Copies `bytes` at `data` from rank `root` to every rank (blocking).
  virtual Status Broadcast(void* data, int64_t bytes, int root) = 0;
  /// Returns once every rank has called it.
  virtual Status Barrier() = 0;
};

/// World of one rank: every collective completes at once and leaves the data unchanged.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  StatusOr<CollectiveHandle> StartAllReduceSum(float*, int64_t) override { return CollectiveHandle{++next_}; }
  Status Wait(CollectiveHandle) override { return absl::OkStatus(); }
  Status Broadcast(void*, int64_t, int) override { return absl::OkStatus(); }
  Status Barrier() override { return absl::OkStatus(); }

 private:
  uint64_t next_ = 0;
};

}  // namespace kraken::engine
