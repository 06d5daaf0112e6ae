// The CUDA backend's behaviour where no GPU is usable (label unit: runs in the CUDA build on any
// machine): creating it fails with a precise FAILED_PRECONDITION instead of crashing, and device
// names are validated before the driver is asked anything.
#include <gtest/gtest.h>

#include "engine/backend.h"
#include "engine/comm/nccl_communicator.h"

namespace kraken::engine {
namespace {

TEST(CudaBackendNoDevice, MalformedDeviceNamesAreInvalidArguments) {
  for (const char* name : {"cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "cuda:99999", "cudax", "gpu:0", ""}) {
    auto d = Device::Parse(name);
    ASSERT_FALSE(d.ok()) << name;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << name << ": " << d.status();
    EXPECT_NE(d.status().message().find(std::string("'") + name + "'"), std::string::npos) << d.status();
  }
  EXPECT_EQ(*Device::Parse("cuda"), Device::Cuda(0));
  EXPECT_EQ(*Device::Parse("cuda:12"), Device::Cuda(12));
  EXPECT_EQ(Device::Parse("cuda:12")->ToString(), "cuda:12");
}

TEST(CudaBackendNoDevice, WithoutADeviceCreationFailsWithTheDriversReason) {
  if (CudaDeviceCount().ok()) GTEST_SKIP() << "a CUDA device is present";
  auto b = CreateBackend({.device = Device::Cuda(0)});
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition) << b.status();
  EXPECT_NE(b.status().message().find("no usable CUDA device"), std::string::npos) << b.status();
  EXPECT_NE(b.status().message().find("cuda:0"), std::string::npos) << b.status();
}

}  // namespace
}  // namespace kraken::engine
