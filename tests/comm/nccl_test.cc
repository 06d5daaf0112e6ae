// NCCL communicator on real GPUs (label gpu): sums, broadcast and barrier over every visible
// device, one rank per device on its own thread, rendezvous through an in-memory Gloo store.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <gloo/rendezvous/hash_store.h>

#include <thread>
#include <vector>

#include "engine/comm/nccl_communicator.h"

namespace kraken::engine {
namespace {

int Devices() {
  auto n = CudaDeviceCount();
  return n.ok() ? *n : 0;
}

// Each rank r fills x[i] = (r + 1) * (i % 7 + 1); the sum over W ranks is W(W+1)/2 * (i % 7 + 1).
void RunRank(int rank, int world, gloo::rendezvous::Store* store, bool use_compute_stream, std::vector<float>* out,
             Status* status) {
  cudaSetDevice(rank);
  cudaStream_t compute = nullptr;
  if (use_compute_stream) cudaStreamCreate(&compute);
  auto comm = NcclCommunicator::Create({.rank = rank,
                                        .world_size = world,
                                        .device = rank,
                                        .store = store,
                                        .key_prefix = "t",
                                        .compute_stream = compute});
  if (!comm.ok()) {
    *status = comm.status();
    return;
  }
  const int n = 1000003;  // odd, not a multiple of any vector width
  std::vector<float> host(n);
  for (int i = 0; i < n; ++i) host[i] = static_cast<float>((rank + 1) * (i % 7 + 1));
  float* dev = nullptr;
  cudaMalloc(&dev, n * sizeof(float));
  cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  auto h = (*comm)->StartAllReduceSum(dev, n);
  if (!h.ok()) {
    *status = h.status();
    return;
  }
  *status = (*comm)->Wait(*h);
  if (status->ok() && compute != nullptr) cudaStreamSynchronize(compute);
  out->resize(n);
  cudaMemcpy(out->data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost);
  if (status->ok()) {
    // Broadcast rank 0's first float (the sum) overwrites a per-rank value.
    float mark = static_cast<float>(100 + rank);
    cudaMemcpy(dev, &mark, sizeof(float), cudaMemcpyHostToDevice);
    *status = (*comm)->Broadcast(dev, sizeof(float), 0);
    cudaMemcpy(&mark, dev, sizeof(float), cudaMemcpyDeviceToHost);
    out->push_back(mark);
  }
  if (status->ok()) *status = (*comm)->Barrier();
  cudaFree(dev);
  if (compute != nullptr) cudaStreamDestroy(compute);
}

void CheckWorld(int world, bool use_compute_stream) {
  gloo::rendezvous::HashStore store;
  std::vector<std::vector<float>> out(world);
  std::vector<Status> status(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back(RunRank, r, world, &store, use_compute_stream, &out[r], &status[r]);
  for (auto& t : threads) t.join();
  const float tri = static_cast<float>(world * (world + 1) / 2);
  for (int r = 0; r < world; ++r) {
    ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r];
    ASSERT_EQ(out[r].size(), 1000004u);
    for (int i = 0; i < 1000003; i += 9973) ASSERT_EQ(out[r][i], tri * (i % 7 + 1)) << "rank " << r << " i " << i;
    EXPECT_EQ(out[r].back(), 100.0f) << "broadcast from rank 0 reaches rank " << r;
  }
}

TEST(Nccl, SumOverAllDevicesHostWait) {
  if (Devices() == 0) GTEST_SKIP() << "no CUDA device";
  CheckWorld(Devices(), false);
}

TEST(Nccl, SumOverAllDevicesComputeStream) {
  if (Devices() == 0) GTEST_SKIP() << "no CUDA device";
  CheckWorld(Devices(), true);
}

TEST(Nccl, UnknownHandleIsRejected) {
  if (Devices() == 0) GTEST_SKIP() << "no CUDA device";
  auto comm = NcclCommunicator::Create({.rank = 0, .world_size = 1});
  ASSERT_TRUE(comm.ok()) << comm.status();
  Status s = (*comm)->Wait(CollectiveHandle{42});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kraken::engine
