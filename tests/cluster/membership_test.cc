// Who may join a multi-node group and which node rank a newcomer takes (cluster/membership.h),
// without a network: each refusal's message, and the rank assignment across joins, silences and
// replacements.
#include "cluster/membership.h"

#include <gtest/gtest.h>

#include "runtime/protocol.h"

namespace kraken::cluster {
namespace {

v1::Hello Hello(std::vector<std::string> devices, std::string model = "fp", std::string cpu_numerics = "f32") {
  v1::Hello h;
  h.set_protocol_version(runtime::kProtocolVersion);
  h.set_layout_sizes(LayoutSizes());
  h.set_model(model);
  h.set_cpu_numerics(cpu_numerics);
  for (auto& d : devices) h.add_devices(d);
  return h;
}

const MembershipRules kRules{.ranks_per_node = 2, .device_kind = "cpu", .model = "fp", .cpu_numerics = "f32"};

TEST(CheckHello, ANodeOfTheSameBuildModelKindAndSizeJoinsWithItsDevices) {
  auto devices = CheckHello(Hello({"cpu", "cpu"}), "10.0.0.2:5000", kRules);
  ASSERT_TRUE(devices.ok()) << devices.status();
  EXPECT_EQ(*devices, (std::vector<engine::Device>{engine::Device::Cpu(), engine::Device::Cpu()}));
  // A node that loaded no model of its own takes the leader's.
  EXPECT_TRUE(CheckHello(Hello({"cpu", "cpu"}, ""), "p", kRules).ok());
}

TEST(CheckHello, EachDifferenceIsRefusedByName) {
  v1::Hello old_build = Hello({"cpu", "cpu"});
  old_build.set_protocol_version(runtime::kProtocolVersion - 1);
  auto s = CheckHello(old_build, "p", kRules).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("run the same kraken-server build on every node"), std::string::npos) << s;

  v1::Hello other_layout = Hello({"cpu", "cpu"});
  other_layout.set_layout_sizes("Limits=1");
  EXPECT_EQ(CheckHello(other_layout, "p", kRules).status().code(), absl::StatusCode::kFailedPrecondition);

  EXPECT_EQ(CheckHello(Hello({"cpu", "cpu"}, "other"), "10.0.0.3:1", kRules).status(),
            absl::FailedPreconditionError("node at 10.0.0.3:1 loaded a different model (other) than the leader (fp)"));
  EXPECT_EQ(CheckHello(Hello({"cpu", "cuda:1"}), "p", kRules).status(),
            absl::InvalidArgumentError("node at p has a worker on cuda:1; the leader's are cpu devices, and one "
                                       "group speaks one collective library"));
  EXPECT_EQ(CheckHello(Hello({"cpu", "tpu"}), "p", kRules).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckHello(Hello({"cpu"}), "p", kRules).status(),
            absl::InvalidArgumentError("node at p has 1 workers; every node needs as many as the leader (2)"));
}

// A CPU node must compute what the leader computes (engine::cpu::KernelNumerics): every F32
// level is "f32" on any CPU and they mix freely; a BF16-product level joins only a leader of the
// same level on the same CPU design; a node that does not say is refused.
TEST(CheckHello, ACpuNodeWithOtherKernelNumericsIsRefusedByName) {
  EXPECT_TRUE(CheckHello(Hello({"cpu", "cpu"}, "fp", "f32"), "p", kRules).ok());
  MembershipRules amx = kRules;
  amx.cpu_numerics = "amx on GenuineIntel family 6 model 143";
  EXPECT_TRUE(CheckHello(Hello({"cpu", "cpu"}, "fp", "amx on GenuineIntel family 6 model 143"), "p", amx).ok());
  EXPECT_EQ(CheckHello(Hello({"cpu", "cpu"}, "fp", "avx512bf16 on AuthenticAMD family 26 model 2"), "10.0.0.4:7", amx)
                .status(),
            absl::FailedPreconditionError(
                "node at 10.0.0.4:7 runs CPU kernels of numerics 'avx512bf16 on AuthenticAMD family 26 model 2' and "
                "the leader 'amx on GenuineIntel family 6 model 143': BF16-weight products would differ between "
                "ranks; give every node a --cpu-isa that computes alike on its CPU (auto, avx512 and avx2 give the "
                "same bits on every CPU)"));
  // The same level on another CPU design: its dot-product rounding is that design's.
  EXPECT_EQ(CheckHello(Hello({"cpu", "cpu"}, "fp", "amx on GenuineIntel family 6 model 173"), "p", amx).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(CheckHello(Hello({"cpu", "cpu"}, "fp", "f32"), "p", amx).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(
      CheckHello(Hello({"cpu", "cpu"}, "fp", "amx on GenuineIntel family 6 model 143"), "p", kRules).status().code(),
      absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(CheckHello(Hello({"cpu", "cpu"}, "fp", ""), "p", kRules).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // GPU workers do not run the CPU kernels: their nodes' numerics do not matter.
  MembershipRules cuda = amx;
  cuda.device_kind = "cuda";
  EXPECT_TRUE(CheckHello(Hello({"cuda:0", "cuda:1"}, "fp", "f32"), "p", cuda).ok());
}

// The rank assigned, or -1 (with the refusal reported) when it was refused.
int RankOf(const StatusOr<int>& r) {
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : -1;
}

// Ranks of a 4-node group; index 0 is the leader's.
std::vector<RankHolder> Ranks() {
  return std::vector<RankHolder>(4);
}

TEST(AssignNodeRank, AnyRankTakesTheLowestNeverHeldThenTheLowestNotHeldByALiveNode) {
  auto r = Ranks();
  EXPECT_EQ(RankOf(AssignNodeRank(0, r, "p")), 1);
  r[1] = {.joined_once = true, .connected = true, .live = true, .peer = "a"};
  EXPECT_EQ(RankOf(AssignNodeRank(0, r, "p")), 2);
  // Rank 2's node left: a newcomer prefers rank 3, which nobody held, so 2's node can come back.
  r[2] = {.joined_once = true};
  EXPECT_EQ(RankOf(AssignNodeRank(0, r, "p")), 3);
  r[3] = {.joined_once = true, .connected = true, .live = true, .peer = "c"};
  EXPECT_EQ(RankOf(AssignNodeRank(0, r, "p")), 2);
  // Every rank held by a live node: refused; one holder gone silent: it is replaced.
  r[2] = {.joined_once = true, .connected = true, .live = true, .peer = "b"};
  EXPECT_EQ(AssignNodeRank(0, r, "p").status(),
            absl::AlreadyExistsError("all 3 follower ranks are held by live nodes"));
  r[3].live = false;
  EXPECT_EQ(RankOf(AssignNodeRank(0, r, "p")), 3);
}

TEST(AssignNodeRank, AnAskedRankIsTakenUnlessALiveNodeHoldsItOrItIsOutOfRange) {
  auto r = Ranks();
  EXPECT_EQ(RankOf(AssignNodeRank(2, r, "p")), 2);
  r[2] = {.joined_once = true, .connected = true, .live = true, .peer = "10.0.0.9:7"};
  EXPECT_EQ(AssignNodeRank(2, r, "p").status(), absl::AlreadyExistsError("node rank 2 is already held by 10.0.0.9:7"));
  r[2].live = false;  // silent past its allowance: the asking node replaces it
  EXPECT_EQ(RankOf(AssignNodeRank(2, r, "p")), 2);
  EXPECT_EQ(AssignNodeRank(4, r, "10.0.0.5:1").status(),
            absl::InvalidArgumentError("node rank 4 from 10.0.0.5:1 is not in [1, 3] (--nodes 4)"));
  EXPECT_EQ(AssignNodeRank(-1, r, "p").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kraken::cluster
