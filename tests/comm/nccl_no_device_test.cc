// Runs in every KRAKEN_ENABLE_CUDA=ON build: on a machine without a usable GPU or driver, creating
// an NCCL communicator fails with FAILED_PRECONDITION naming the CUDA error, never a crash.
#include <gtest/gtest.h>

#include "engine/comm/nccl_communicator.h"

namespace kraken::engine {
namespace {

TEST(NcclNoDevice, CreateFailsWithPreciseError) {
  auto count = CudaDeviceCount();
  if (count.ok()) GTEST_SKIP() << "this machine has " << *count << " CUDA device(s)";
  EXPECT_EQ(count.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(count.status().message().find("cudaGetDeviceCount failed with cuda"), std::string::npos) << count.status();
  auto comm = NcclCommunicator::Create({.rank = 0, .world_size = 1});
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(comm.status().message().find("no usable CUDA device"), std::string::npos) << comm.status();
}

TEST(NcclNoDevice, InvalidRankIsRejectedBeforeTouchingCuda) {
  auto comm = NcclCommunicator::Create({.rank = 2, .world_size = 2});
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(comm.status().message(), "rank must be in [0, 2), got 2");
}

}  // namespace
}  // namespace kraken::engine
