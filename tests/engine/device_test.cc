// Devices: names parsed and printed back, each kind's traits (what runtime/, server/ and cluster/
// ask instead of branching on the kind), and the backend factory's choice per kind.
#include "engine/device.h"

#include <gtest/gtest.h>

#include "engine/backend.h"

namespace kraken::engine {
namespace {

TEST(Device, NamesRoundTrip) {
  for (const char* name : {"cpu", "cuda:0", "cuda:7", "cuda:9999"}) {
    auto d = Device::Parse(name);
    ASSERT_TRUE(d.ok()) << name;
    EXPECT_EQ(d->ToString(), name);
  }
  EXPECT_FALSE(Device::Parse("cuda:").ok());
  EXPECT_FALSE(Device::Parse("gpu").ok());
}

TEST(Device, EachKindsTraits) {
  const DeviceTraits& cpu = Device::Cpu().traits();
  EXPECT_EQ(cpu.kind, "cpu");
  EXPECT_EQ(cpu.collective, CollectiveLibrary::kGloo);
  EXPECT_FALSE(cpu.own_memory);
  EXPECT_EQ(cpu.memory_name, "host memory");
  EXPECT_DOUBLE_EQ(cpu.default_memory_utilization, 0.1);
  EXPECT_TRUE(cpu.link_presets);
  EXPECT_EQ(cpu.host_shm_bytes_per_rank, 0);

  const DeviceTraits& cuda = Device::Cuda(3).traits();
  EXPECT_EQ(cuda.kind, "cuda");
  EXPECT_EQ(cuda.collective, CollectiveLibrary::kNccl);
  EXPECT_TRUE(cuda.own_memory);
  EXPECT_EQ(cuda.memory_name, "GPU memory");
  EXPECT_DOUBLE_EQ(cuda.default_memory_utilization, 0.9);
  EXPECT_FALSE(cuda.link_presets);
  EXPECT_EQ(cuda.host_shm_bytes_per_rank, 256ll << 20);
  // Every device's name starts with its kind (cluster/hub.cc matches nodes by kind).
  EXPECT_EQ(Device::Cuda(3).ToString().rfind(cuda.kind, 0), 0u);
  EXPECT_EQ(&Device::Cuda(0).traits(), &cuda);  // one row per kind
}

TEST(BackendFactory, ChoosesTheBackendOfTheDevicesKind) {
  auto cpu = CreateBackend({.device = Device::Cpu(), .threads = 1});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->name(), "cpu");
  auto bad = CreateBackend({.device = Device::Cpu(), .threads = -1});
  EXPECT_EQ(bad.status(), absl::InvalidArgumentError("backend option 'threads' must be >= 0, got -1"));
  // A CUDA device goes to the CUDA factory: the stub in a build without the toolkit (which refuses
  // it by name), the real backend otherwise (a CUDA backend on a GPU, or an error naming the device
  // without one; tests/engine/cuda_no_device_test.cc).
  auto cuda = CreateBackend({.device = Device::Cuda(0)});
  if (cuda.ok()) {
    EXPECT_EQ((*cuda)->name(), "cuda:0");
  } else {
    EXPECT_NE(cuda.status().message().find("cuda:0"), std::string::npos) << cuda.status();
  }
}

}  // namespace
}  // namespace kraken::engine
