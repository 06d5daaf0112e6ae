// Collectives between GPU worker processes with NCCL (one rank per GPU). Built only with
// KRAKEN_ENABLE_CUDA=ON; it links cudart and libnccl from the CUDA toolkit.
//
// The ncclUniqueId travels through the rendezvous store the caller provides (the runtime keeps it
// in its shared-memory segment, runtime/shm_store.h): rank 0 creates it and sets
// "<key_prefix>/nccl_id"; every other rank waits for that key. Each communicator has its own
// non-blocking CUDA stream, so collectives overlap with the compute stream:
//
//   StartAllReduceSum(buf, n)  — records an event on the compute stream; the communication stream
//                                waits for it, then runs ncclAllReduce(sum) in place; the host
//                                does not block.
//   Wait(h)                    — makes the compute stream wait for the collective's completion
//                                event (the host does not block), or, with no compute stream,
//                                blocks the host until it completes.
//   TakeDeviceTiming(&t)       — after the step: collective and exposed time from CUDA events.
//
// All buffers are device memory of the communicator's GPU. A peer that dies makes NCCL report an
// asynchronous error. Without a compute stream, Wait polls ncclCommGetAsyncError while it waits,
// aborts the communicator and returns UNAVAILABLE (sticky), so the runtime rebuilds all
// communicators. With a compute stream, Wait returns at once and the dead peer's collective stays
// pending on the device, so the step's synchronisation does not return: the front-end's stall
// watchdog (RankSlot::progress_ns, runtime/worker_group.cc) ends the worker and restarts the group.
// Reference: NCCL User Guide, "Creating a communicator" and "Fault tolerance"
// (docs.nvidia.com/deeplearning/nccl/user-guide).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "engine/communicator.h"

namespace gloo::rendezvous {
class Store;
}

namespace kraken::engine {

struct NcclOptions {
  int rank = 0;
  int world_size = 1;
  int device = 0;                            // CUDA device ordinal this rank uses
  gloo::rendezvous::Store* store = nullptr;  // shared by all ranks; used only inside Create
  std::string key_prefix = "kraken";         // distinguishes communicator generations
  void* compute_stream = nullptr;            // cudaStream_t the model computes on; null = host waits
  std::chrono::milliseconds timeout{30000};  // rendezvous and per-Wait limit
};

/// Number of CUDA devices visible to this process, or an error naming the CUDA error when there is
/// no usable device or driver (any CUDA error counts as "no device").
StatusOr<int> CudaDeviceCount();

class NcclCommunicator final : public Communicator {
 public:
  /// Sets the device, exchanges the unique id and runs ncclCommInitRank.
  /// Errors: FAILED_PRECONDITION when no CUDA device or driver is usable (the message names the
  /// CUDA error), INVALID_ARGUMENT for a bad rank/world/device, UNAVAILABLE when the id does not
  /// arrive within the timeout or NCCL initialisation fails.
  static StatusOr<std::unique_ptr<NcclCommunicator>> Create(const NcclOptions& options);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  /// `data`: device pointer to `count` floats. Errors: UNAVAILABLE after a communicator failure.
  StatusOr<CollectiveHandle> StartAllReduceSum(float* data, int64_t count) override;
  Status Wait(CollectiveHandle handle) override;
  /// `data`: device pointer. Blocks the host until done.
  Status Broadcast(void* data, int64_t bytes, int root) override;
  Status Barrier() override;
  /// With a compute stream: CUDA-event timing of the collectives waited on since the last call
  /// (collective = its start on the communication stream to its completion; exposed = how long
  /// the compute stream, having reached Wait, still waited for it). Adds no synchronisation: the
  /// events are read here, after the step. False without a compute stream.
  bool TakeDeviceTiming(DeviceCollectiveTiming* t) override;

 public:
  struct Impl;  // CUDA and NCCL handles (defined in the .cc)

 private:
  NcclCommunicator() = default;
  Status HostWaitStream();  // blocks until the communication stream's work so far is done
  Status Fail(const std::string& what);
  Status HostWait(void* event);

  int rank_ = 0, world_ = 1;
  std::chrono::milliseconds timeout_{30000};
  std::unique_ptr<Impl> impl_;
  Status failure_;  // sticky
};

}  // namespace kraken::engine
