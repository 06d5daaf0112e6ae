// The KV cache sized from a memory budget (runtime/memory.h): the policy's arithmetic, the host
// memory it reads (cgroup limits included), and worker groups that size, refuse and keep their
// cache across a restart.
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <fstream>

#include "runtime/memory.h"
#include "runtime/worker_group.h"
#include "tests/engine/test_util.h"

namespace kraken::runtime {
namespace {

TEST(KvBudget, FollowsTheDefinitionForEachKindOfWorker) {
  const WorkerMemory m{.weight_bytes = 100, .activation_bytes = 30, .scratch_bytes = 20};
  // An explicit size wins over everything.
  EXPECT_EQ(KvBudgetBytes({.kv_cache_bytes = 5000, .memory_utilization = 0.5, .host_share_bytes = 1}, std::nullopt, m),
            5000);
  // CPU: u of the host share, less what the worker already holds.
  EXPECT_EQ(KvBudgetBytes({.memory_utilization = 0.5, .host_share_bytes = 1000}, std::nullopt, m), 500 - 150);
  // GPU: free memory less the (1 - u) of the device kept back (what the worker holds is already
  // out of `free`).
  EXPECT_EQ(KvBudgetBytes({.memory_utilization = 0.9}, engine::DeviceMemory{.total = 10000, .free = 6000}, m),
            6000 - 1000);
  // Never negative.
  EXPECT_EQ(KvBudgetBytes({.memory_utilization = 0.1, .host_share_bytes = 1000}, std::nullopt, m), 0);
  EXPECT_EQ(KvBudgetBytes({.memory_utilization = 0.5}, engine::DeviceMemory{.total = 10000, .free = 4000}, m), 0);
}

class FakeRoot : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::temp_directory_path() / ("kraken-memtest-" + std::to_string(getpid()));
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_ / "proc");
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  void Write(const std::string& rel, const std::string& text) {
    std::filesystem::create_directories((root_ / rel).parent_path());
    std::ofstream(root_ / rel) << text;
  }
  std::filesystem::path root_;
};

TEST_F(FakeRoot, HostMemoryIsTheLowerOfMemAvailableAndTheCgroupsRoom) {
  EXPECT_EQ(HostAvailableBytes(root_.string()).status().code(), absl::StatusCode::kUnavailable) << "no meminfo";
  Write("proc/meminfo", "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n");
  EXPECT_EQ(*HostAvailableBytes(root_.string()), 20000000ll * 1024) << "no cgroup";
  Write("sys/fs/cgroup/memory.max", "max\n");
  Write("sys/fs/cgroup/memory.current", "1000\n");
  EXPECT_EQ(*HostAvailableBytes(root_.string()), 20000000ll * 1024) << "cgroup v2 without a limit";
  Write("sys/fs/cgroup/memory.max", "4294967296\n");
  EXPECT_EQ(*HostAvailableBytes(root_.string()), 4294967296ll - 1000) << "a container's 4 GiB limit";
  Write("sys/fs/cgroup/memory.current", "5000000000\n");
  EXPECT_EQ(*HostAvailableBytes(root_.string()), 0) << "over its limit";
  std::filesystem::remove_all(root_ / "sys");
  Write("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
  EXPECT_EQ(*HostAvailableBytes(root_.string()), 20000000ll * 1024) << "cgroup v1 without a limit";
  Write("sys/fs/cgroup/memory/memory.limit_in_bytes", "2147483648\n");
  Write("sys/fs/cgroup/memory/memory.usage_in_bytes", "147483648\n");
  EXPECT_EQ(*HostAvailableBytes(root_.string()), 2000000000ll) << "cgroup v1 with a 2 GiB limit";
}

// The bundled-size test model on two CPU workers, its KV cache sized by `sizing`.
WorkerGroupOptions Sized(KvSizing sizing) {
  return {.model_dir = engine::testing::TestModelDir("kraken-n4-bf16"),
          .devices = *ParseDevices("cpu:2"),
          .threads_per_worker = 1,
          .max_tokens = 64,
          .max_seqs = 4,
          .kv_sizing = sizing};
}

TEST(KvSizing, TheCacheHoldsWhatTheBudgetBuysUpToMaxSeqsFullContexts) {
  auto probe = WorkerGroup::Start(Sized({.kv_cache_bytes = int64_t{1} << 40}));
  ASSERT_TRUE(probe.ok()) << probe.status();
  const Limits l = (*probe)->limits();
  EXPECT_EQ(l.num_kv_blocks, l.max_seqs * l.max_blocks_per_seq) << "a huge budget is capped at what can be used";
  const WorkerMemory m = (*probe)->Stats()[1].memory;
  ASSERT_GT(m.kv_block_bytes, 0);
  EXPECT_GT(m.weight_bytes, 0);
  EXPECT_GT(m.activation_bytes, 0);
  EXPECT_EQ(m.kv_bytes, m.kv_block_bytes * l.num_kv_blocks);
  probe->reset();

  // An explicit size: exactly the blocks it buys.
  const int want = l.max_blocks_per_seq + 3;
  auto g = WorkerGroup::Start(Sized({.kv_cache_bytes = m.kv_block_bytes * want + m.kv_block_bytes / 2}));
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)->limits().num_kv_blocks, want);
  for (const RankStatsSnapshot& s : (*g)->Stats()) {
    EXPECT_EQ(s.memory.kv_bytes, m.kv_block_bytes * want) << "rank " << s.rank;
  }
  g->reset();

  // A fraction of a host share: u * share less what the worker holds.
  const int64_t held = m.weight_bytes + m.activation_bytes + m.scratch_bytes;
  const int64_t share = 2 * (held + m.kv_block_bytes * (want + 1));  // u = 0.5 leaves want + 1 blocks
  auto u = WorkerGroup::Start(Sized({.memory_utilization = 0.5, .host_share_bytes = share}));
  ASSERT_TRUE(u.ok()) << u.status();
  // Rank 0 also holds the logits buffers, so it has less room than rank 1: the smaller count wins.
  const WorkerMemory r0 = (*u)->Stats()[0].memory, r1 = (*u)->Stats()[1].memory;
  EXPECT_EQ(r1.kv_budget_bytes, share / 2 - (r1.weight_bytes + r1.activation_bytes + r1.scratch_bytes));
  EXPECT_EQ((*u)->limits().num_kv_blocks, std::min(r0.kv_capacity_blocks(), r1.kv_capacity_blocks()));
  EXPECT_GE((*u)->limits().num_kv_blocks, l.max_blocks_per_seq);
}

TEST(KvSizing, ABudgetBelowOneFullContextIsRefusedWithTheNumbers) {
  auto plan = PlanLimits(Sized({}));
  ASSERT_TRUE(plan.ok()) << plan.status();
  const int context_blocks = plan->max_blocks_per_seq;
  auto g = WorkerGroup::Start(Sized({.kv_cache_bytes = 4096}));
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kResourceExhausted);
  const std::string msg(g.status().message());
  EXPECT_NE(msg.find("cannot hold one full-context sequence"), std::string::npos) << msg;
  EXPECT_NE(msg.find("4.0 KiB for it (--kv-cache-memory 4096 bytes)"), std::string::npos) << msg;
  EXPECT_NE(msg.find(StrCat("needs ", context_blocks, " blocks")), std::string::npos) << msg;
  auto tiny = WorkerGroup::Start(Sized({.memory_utilization = 0.5, .host_share_bytes = 1 << 20}));
  ASSERT_FALSE(tiny.ok());
  const std::string why(tiny.status().message());
  EXPECT_NE(why.find("--memory-utilization 0.5 of this worker's 1.0 MiB share"), std::string::npos) << why;
  EXPECT_NE(why.find("of weights"), std::string::npos) << why;
  // An explicit block count below one context is refused before anything starts.
  WorkerGroupOptions o = Sized({});
  o.num_kv_blocks = context_blocks - 1;
  auto fixed = WorkerGroup::Start(o);
  EXPECT_EQ(fixed.status().code(), absl::StatusCode::kInvalidArgument);
}

// After a restart the workers allocate the same cache again and report it anew.
TEST(KvSizing, ARestartBringsBackTheSameCache) {
  auto g = WorkerGroup::Start(Sized({.kv_cache_bytes = 24 << 20}));
  ASSERT_TRUE(g.ok()) << g.status();
  const int blocks = (*g)->limits().num_kv_blocks;
  const int64_t kv = (*g)->Stats()[0].memory.kv_bytes;
  kill((*g)->worker_pids()[1], SIGKILL);
  Status s;
  for (int i = 0; i < 200 && s.ok(); ++i) {
    s = (*g)->Supervise();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_EQ((*g)->limits().num_kv_blocks, blocks);
  EXPECT_EQ((*g)->Stats()[0].memory.kv_bytes, kv);
}

}  // namespace
}  // namespace kraken::runtime
