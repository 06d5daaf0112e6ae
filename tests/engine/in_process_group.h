// A tensor-parallel world of threads in one process, for testing sharded models without the
// multi-process runtime. StartAllReduceSum returns at once; the last rank to start sums every
// rank's buffer in rank order (writing into all of them while the others compute), and Wait
// blocks until that has happened — so a model that touched its buffer between Start and Wait
// would race and fail the tests.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

#include "engine/communicator.h"

namespace kraken::engine::testing {

class InProcessGroup {
 public:
  explicit InProcessGroup(int world) : world_(world), bufs_(world) {}

  /// The communicator of `rank`; the group must outlive it.
  std::unique_ptr<Communicator> Member(int rank) { return std::make_unique<Rank>(this, rank); }

 private:
  class Rank final : public Communicator {
   public:
    Rank(InProcessGroup* g, int rank) : g_(g), rank_(rank) {}
    int rank() const override { return rank_; }
    int world_size() const override { return g_->world_; }
    StatusOr<CollectiveHandle> StartAllReduceSum(float* data, int64_t count) override {
      return CollectiveHandle{g_->Start(rank_, data, count)};
    }
    Status Wait(CollectiveHandle h) override {
      g_->WaitFor(h.id);
      return absl::OkStatus();
    }
    Status Broadcast(void*, int64_t, int) override { return Unimplemented("not needed by the tests"); }
    Status Barrier() override {
      g_->WaitFor(g_->Start(rank_, nullptr, 0));
      return absl::OkStatus();
    }

   private:
    InProcessGroup* g_;
    int rank_;
  };

  // Registers this rank's buffer; returns the generation the collective completes.
  uint64_t Start(int rank, float* data, int64_t count) {
    std::lock_guard<std::mutex> lock(mu_);
    bufs_[rank] = data;
    const uint64_t done = generation_ + 1;
    if (++arrived_ == world_) {
      for (int64_t i = 0; i < count; ++i) {
        float s = bufs_[0][i];
        for (int r = 1; r < world_; ++r) s += bufs_[r][i];
        for (int r = 0; r < world_; ++r) bufs_[r][i] = s;
      }
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    }
    return done;
  }

  void WaitFor(uint64_t generation) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return generation_ >= generation; });
  }

  const int world_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::vector<float*> bufs_;
};

}  // namespace kraken::engine::testing
