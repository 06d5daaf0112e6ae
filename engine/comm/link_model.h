// A communicator decorator for benchmarks only: it makes each collective finish no earlier than
// alpha + bytes_on_wire / bandwidth after it started, as it would over a real interconnect,
// without using the compute thread (Wait sleeps for whatever is left, so compute that overlaps
// the collective hides it, exactly as on the emulated system).
//
// CPU compute here is roughly a thousand times slower than the GPUs such links connect, so a
// preset applied raw makes communication look free. With `measured_gemm_flops` > 0, link
// time is multiplied by (the preset device's dense GEMM rate / the GEMM rate measured here),
// which keeps the emulated system's ratio of communication to compute.
//
//   LinkModelCommunicator comm(std::move(gloo), FindLinkPreset("a100-nvswitch"), /*measured=*/230e9);
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/communicator.h"

namespace kraken::engine {

/// One interconnect. Ring AllReduce moves 2 (W - 1) / W x the buffer over each rank's link
/// (NCCL's "bus bandwidth", nccl-tests doc/PERFORMANCE.md).
struct LinkPreset {
  std::string name;
  double latency_s = 0;          // alpha: per-collective start-up
  double bandwidth_bytes_s = 0;  // per rank, per direction
  double device_gemm_flops = 0;  // dense BF16 GEMM peak of the GPUs this link joins
  std::string source;            // where the figures come from
};

/// a100-nvswitch, h100-nvlink4, pcie4-x16, ethernet-100g, ethernet-10g, ethernet-1g.
const std::vector<LinkPreset>& LinkPresets();
/// The preset called `name`, or nullptr.
const LinkPreset* FindLinkPreset(const std::string& name);

/// Seconds an AllReduce of `bytes` takes over `preset` among `world` ranks (unscaled).
double AllReduceSeconds(const LinkPreset& preset, int world, double bytes);

class LinkModelCommunicator final : public Communicator {
 public:
  /// `measured_gemm_flops` > 0 scales link time by preset.device_gemm_flops / measured; 0 = raw.
  LinkModelCommunicator(std::unique_ptr<Communicator> inner, LinkPreset preset, double measured_gemm_flops);

  int rank() const override { return inner_->rank(); }
  int world_size() const override { return inner_->world_size(); }
  StatusOr<CollectiveHandle> StartAllReduceSum(float* data, int64_t count) override;
  Status Wait(CollectiveHandle handle) override;
  Status Broadcast(void* data, int64_t bytes, int root) override { return inner_->Broadcast(data, bytes, root); }
  Status Barrier() override { return inner_->Barrier(); }
  bool TakeDeviceTiming(DeviceCollectiveTiming* t) override { return inner_->TakeDeviceTiming(t); }
  /// Link seconds per real second of collective.
  double scale() const { return scale_; }

 private:
  std::unique_ptr<Communicator> inner_;
  LinkPreset preset_;
  double scale_ = 1.0;
  std::unordered_map<uint64_t, uint64_t> deadline_ns_;  // handle -> earliest completion
};

}  // namespace kraken::engine
