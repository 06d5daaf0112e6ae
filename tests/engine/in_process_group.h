// A tensor-parallel world of threads in one process, for testing sharded models without the
// multi-process runtime: collectives block until every rank has arrived, then sum in rank order.
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
      g_->AllReduce(rank_, data, count);
      return CollectiveHandle{++next_};
    }
    Status Wait(CollectiveHandle) override { return absl::OkStatus(); }
    Status Broadcast(void*, int64_t, int) override { return Unimplemented("not needed by the tests"); }
    Status Barrier() override {
      g_->AllReduce(rank_, nullptr, 0);
      return absl::OkStatus();
    }

   private:
    InProcessGroup* g_;
    int rank_;
    uint64_t next_ = 0;
  };

  void AllReduce(int rank, float* data, int64_t count) {
    std::unique_lock<std::mutex> lock(mu_);
    bufs_[rank] = data;
    const uint64_t gen = generation_;
    if (++arrived_ < world_) {
      cv_.wait(lock, [&] { return generation_ != gen; });
      return;
    }
    for (int64_t i = 0; i < count; ++i) {
      float s = bufs_[0][i];
      for (int r = 1; r < world_; ++r) s += bufs_[r][i];
      for (int r = 0; r < world_; ++r) bufs_[r][i] = s;
    }
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }

  const int world_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::vector<float*> bufs_;
};

}  // namespace kraken::engine::testing
