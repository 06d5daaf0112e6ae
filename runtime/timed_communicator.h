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
    step_.exposed_ns += t1 - t0;
    auto it = started_.find(h.id);
    if (it != started_.end()) {
      step_.collective_ns += t1 - it->second;
      ++step_.count;
      started_.erase(it);
    }
    return s;
  }
  Status Broadcast(void* data, int64_t bytes, int root) override { return inner_->Broadcast(data, bytes, root); }
  Status Barrier() override { return inner_->Barrier(); }

  /// Publishes the step's collective figures to the rank's stats and returns its exposed
  /// nanoseconds. Call after the step's device work has drained. When the inner communicator
  /// times on the device (NCCL: Wait only orders the compute stream, so the host sees ~0), its
  /// CUDA-event figures replace the host's.
  uint64_t EndStep() {
    engine::DeviceCollectiveTiming t;
    if (!inner_->TakeDeviceTiming(&t)) t = step_;
    step_ = {};
    stats_->exposed_comm_ns.fetch_add(t.exposed_ns, std::memory_order_relaxed);
    stats_->collective_ns.fetch_add(t.collective_ns, std::memory_order_relaxed);
    stats_->collectives.fetch_add(t.count, std::memory_order_relaxed);
    return t.exposed_ns;
  }

 private:
  std::unique_ptr<engine::Communicator> inner_;
  RankSlot* slot_;
  RankStats* stats_;
  std::unordered_map<uint64_t, uint64_t> started_;
  engine::DeviceCollectiveTiming step_;  // host-measured figures of the current step
};

}  // namespace kraken::runtime
