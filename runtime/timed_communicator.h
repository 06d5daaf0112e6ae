// A communicator decorator that records, for one rank, how long collectives were in flight and
// how long the compute path was blocked waiting on them (the communication Kraken exists to
// hide: exposed = blocked in Wait; hidden = in flight minus exposed).
#pragma once

#include <memory>
#include <unordered_map>

#include "engine/communicator.h"
#include "runtime/protocol.h"
#include "runtime/shm.h"

namespace kraken::runtime {

class TimedCommunicator final : public engine::Communicator {
 public:
  /// `stats` lives in the shared segment; it must outlive this object.
  /// `slot` lives in the shared segment; it must outlive this object. Every collective event
  /// also stamps slot->progress_ns, which the supervisor reads to tell a slow step from a hung one.
  TimedCommunicator(std::unique_ptr<engine::Communicator> inner, RankSlot* slot)
      : inner_(std::move(inner)), slot_(slot), stats_(&slot->stats) {}

  int rank() const override { return inner_->rank(); }
  int world_size() const override { return inner_->world_size(); }
  StatusOr<engine::CollectiveHandle> StartAllReduceSum(float* data, int64_t count) override {
    const uint64_t t = NowNs();
    KRAKEN_ASSIGN_OR_RETURN(engine::CollectiveHandle h, inner_->StartAllReduceSum(data, count));
    started_[h.id] = t;
    slot_->progress_ns.store(t, std::memory_order_relaxed);
    return h;
  }
  Status Wait(engine::CollectiveHandle h) override {
    const uint64_t t0 = NowNs();
    Status s = inner_->Wait(h);
    const uint64_t t1 = NowNs();
    slot_->progress_ns.store(t1, std::memory_order_relaxed);
    exposed_ns_ += t1 - t0;
    stats_->exposed_comm_ns.fetch_add(t1 - t0, std::memory_order_relaxed);
    auto it = started_.find(h.id);
    if (it != started_.end()) {
      stats_->collective_ns.fetch_add(t1 - it->second, std::memory_order_relaxed);
      stats_->collectives.fetch_add(1, std::memory_order_relaxed);
      started_.erase(it);
    }
    return s;
  }
  Status Broadcast(void* data, int64_t bytes, int root) override { return inner_->Broadcast(data, bytes, root); }
  Status Barrier() override { return inner_->Barrier(); }

  /// Nanoseconds spent blocked in Wait since the last call (and resets the count).
  uint64_t TakeExposedNs() {
    const uint64_t e = exposed_ns_;
    exposed_ns_ = 0;
    return e;
  }

 private:
  std::unique_ptr<engine::Communicator> inner_;
  RankSlot* slot_;
  RankStats* stats_;
  std::unordered_map<uint64_t, uint64_t> started_;
  uint64_t exposed_ns_ = 0;
};

}  // namespace kraken::runtime
