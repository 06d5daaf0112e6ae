// Collectives between CPU worker processes with Gloo (Facebook's collective library; Debian
// libgloo-dev): TCP on loopback; rendezvous through a store the caller provides (the runtime
// keeps it in its shared-memory segment, runtime/shm_store.h).
// Gloo's collectives are blocking, so one communication thread runs them in submission order
// while the compute thread goes on; Wait blocks only until that collective has finished.
//
//   KRAKEN_ASSIGN_OR_RETURN(auto comm, GlooCommunicator::Create({.rank = r, .world_size = W,
//                                                                 .store = &store}));
//   KRAKEN_ASSIGN_OR_RETURN(CollectiveHandle h, comm->StartAllReduceSum(buf, n));
//   ... compute ...
//   KRAKEN_RETURN_IF_ERROR(comm->Wait(h));
//
// A failed or timed-out collective (a peer died) makes this and every later call return
// UNAVAILABLE: the runtime then rebuilds all communicators.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "engine/communicator.h"

namespace gloo {
class Context;
namespace rendezvous {
class Store;
}
}  // namespace gloo

namespace kraken::engine {

struct GlooOptions {
  int rank = 0;
  int world_size = 1;
  gloo::rendezvous::Store* store = nullptr;  // shared by all ranks; used only inside Create
  std::string host = "127.0.0.1";
  std::chrono::milliseconds timeout{30000};  // connection and per-collective limit
};

class GlooCommunicator final : public Communicator {
 public:
  /// Connects the full mesh. UNAVAILABLE (naming this rank) if the peers do not all appear within
  /// the timeout.
  static StatusOr<std::unique_ptr<GlooCommunicator>> Create(const GlooOptions& options);
  ~GlooCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  StatusOr<CollectiveHandle> StartAllReduceSum(float* data, int64_t count) override;
  Status Wait(CollectiveHandle handle) override;
  Status Broadcast(void* data, int64_t bytes, int root) override;
  Status Barrier() override;

 private:
  enum class Op { kAllReduce, kBroadcast, kBarrier };
  struct Job {
    uint64_t id;
    Op op;
    void* data;
    int64_t count;  // floats (AllReduce) or bytes (Broadcast)
    int root;
  };
  GlooCommunicator() = default;
  StatusOr<CollectiveHandle> Enqueue(Op op, void* data, int64_t count, int root);
  void Loop();

  int rank_ = 0, world_ = 1;
  std::chrono::milliseconds timeout_{30000};
  std::shared_ptr<gloo::Context> context_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  uint64_t next_id_ = 0;  // last id handed out
  uint64_t done_id_ = 0;  // every id <= this has finished
  Status failure_;        // sticky: the first failure
  bool stop_ = false;
};

}  // namespace kraken::engine
