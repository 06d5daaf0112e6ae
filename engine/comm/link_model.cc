#include "engine/comm/link_model.h"

#include <chrono>
#include <thread>

namespace kraken::engine {
namespace {

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace

const std::vector<LinkPreset>& LinkPresets() {
  static const std::vector<LinkPreset> presets = {
      {"a100-nvswitch", 10e-6, 300e9, 312e12,
       "NVIDIA A100 datasheet: NVLink 3 600 GB/s per GPU (300 GB/s each way) through NVSwitch, 312 TFLOPS "
       "dense BF16; ~10 us NCCL intra-node AllReduce latency"},
      {"h100-nvlink4", 8e-6, 450e9, 989e12,
       "NVIDIA H100 SXM datasheet: NVLink 4 900 GB/s per GPU (450 GB/s each way), 989 TFLOPS dense BF16"},
      {"pcie4-x16", 15e-6, 31.5e9, 312e12,
       "PCI Express 4.0 x16: 16 GT/s x 16 lanes, 128b/130b = 31.5 GB/s each way; A100 PCIe 312 TFLOPS BF16"},
      {"ethernet-100g", 20e-6, 12.5e9, 312e12,
       "100 Gb/s Ethernet = 12.5 GB/s each way; ~20 us RDMA round trip; A100 312 TFLOPS BF16"},
      // The multi-node benchmark's shaped links (bench/ttft_bench.py --multinode), used raw.
      {"ethernet-10g", 20e-6, 1.25e9, 312e12, "10 Gb/s Ethernet = 1.25 GB/s each way; alpha as ethernet-100g"},
      {"ethernet-1g", 20e-6, 0.125e9, 312e12, "1 Gb/s Ethernet = 125 MB/s each way; alpha as ethernet-100g"},
  };
  return presets;
}

const LinkPreset* FindLinkPreset(const std::string& name) {
  for (const LinkPreset& p : LinkPresets()) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

double AllReduceSeconds(const LinkPreset& p, int world, double bytes) {
  if (world <= 1) return 0.0;
  return p.latency_s + 2.0 * (world - 1) / world * bytes / p.bandwidth_bytes_s;
}

LinkModelCommunicator::LinkModelCommunicator(std::unique_ptr<Communicator> inner, LinkPreset preset,
                                             double measured_gemm_flops)
    : inner_(std::move(inner)), preset_(std::move(preset)) {
  if (measured_gemm_flops > 0) scale_ = preset_.device_gemm_flops / measured_gemm_flops;
}

StatusOr<CollectiveHandle> LinkModelCommunicator::StartAllReduceSum(float* data, int64_t count) {
  const uint64_t start = NowNs();
  KRAKEN_ASSIGN_OR_RETURN(CollectiveHandle h, inner_->StartAllReduceSum(data, count));
  const double seconds = AllReduceSeconds(preset_, world_size(), static_cast<double>(count) * sizeof(float)) * scale_;
  deadline_ns_[h.id] = start + static_cast<uint64_t>(seconds * 1e9);
  return h;
}

Status LinkModelCommunicator::Wait(CollectiveHandle h) {
  KRAKEN_RETURN_IF_ERROR(inner_->Wait(h));
  auto it = deadline_ns_.find(h.id);
  if (it != deadline_ns_.end()) {
    const uint64_t now = NowNs();
    if (it->second > now) std::this_thread::sleep_for(std::chrono::nanoseconds(it->second - now));
    deadline_ns_.erase(it);
  }
  return absl::OkStatus();
}

}  // namespace kraken::engine
