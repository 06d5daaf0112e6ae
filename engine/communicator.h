// Collectives between the ranks of a tensor-parallel world. The models call these at their
// reduction points; W = 1 uses LocalCommunicator, whose sums are the local values themselves.
// The multi-process runtime adds Gloo (CPU workers) and NCCL (GPU workers) implementations.
//
//   KRAKEN_ASSIGN_OR_RETURN(CollectiveHandle h, comm.StartAllReduceSum(buf, n));
//   ... independent compute (Kraken: the next layer's attention) ...
//   KRAKEN_RETURN_IF_ERROR(comm.Wait(h));     // buf now holds the sum over ranks
#pragma once

#include <cstdint>

#include "base/status.h"

namespace kraken::engine {

/// Identifies one in-flight collective of a communicator.
struct CollectiveHandle {
  uint64_t id = 0;
};

/// Collective time measured on the device (CUDA events) rather than by the host.
struct DeviceCollectiveTiming {
  uint64_t collective_ns = 0;  // start to completion on the communication stream, summed
  uint64_t exposed_ns = 0;     // the compute stream stalled waiting for a collective, summed
  uint64_t count = 0;          // collectives these sums cover
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
  /// A communicator whose Wait does not block the host (NCCL ordering a compute stream) times its
  /// collectives on the device: it fills `t` for the collectives waited on since the last call
  /// and returns true. Call only once the compute stream has drained (after
  /// Backend::Synchronize). Host-blocking communicators return false: the caller's host timing
  /// of Wait is already the exposed time.
  virtual bool TakeDeviceTiming(DeviceCollectiveTiming* t) { return false; }
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
