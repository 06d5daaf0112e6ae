#include "cluster/membership.h"

#include "runtime/memory.h"
#include "runtime/protocol.h"

namespace kraken::cluster {

std::string LayoutSizes() {
  return StrCat("Limits=", sizeof(runtime::Limits), " KvSizing=", sizeof(runtime::KvSizing),
                " WorkerMemory=", sizeof(runtime::WorkerMemory), " PlanHeader=", sizeof(runtime::PlanHeader),
                " PlanSeq=", sizeof(runtime::PlanSeq));
}

StatusOr<std::vector<engine::Device>> CheckHello(const v1::Hello& hello, const std::string& peer,
                                                 const MembershipRules& rules) {
  if (hello.protocol_version() != runtime::kProtocolVersion || hello.layout_sizes() != LayoutSizes()) {
    return FailedPrecondition("node at ", peer, " speaks runtime protocol ", hello.protocol_version(), " (",
                              hello.layout_sizes(), "); the leader speaks ", runtime::kProtocolVersion, " (",
                              LayoutSizes(), "): run the same kraken-server build on every node");
  }
  if (!hello.model().empty() && hello.model() != rules.model) {
    return FailedPrecondition("node at ", peer, " loaded a different model (", hello.model(), ") than the leader (",
                              rules.model, ")");
  }
  std::vector<engine::Device> devices;
  for (const std::string& d : hello.devices()) {
    const StatusOr<engine::Device> device = engine::Device::Parse(d);
    if (!device.ok())
      return InvalidArgument("node at ", peer, " reports a worker on '", d,
                             "': ", std::string(device.status().message()));
    if (device->traits().kind != rules.device_kind) {
      return InvalidArgument("node at ", peer, " has a worker on ", d, "; the leader's are ", rules.device_kind,
                             " devices, and one group speaks one collective library");
    }
    devices.push_back(*device);
  }
  if (hello.devices_size() != rules.ranks_per_node) {
    return InvalidArgument("node at ", peer, " has ", hello.devices_size(),
                           " workers; every node needs as many as the leader (", rules.ranks_per_node, ")");
  }
  if (rules.device_kind == "cpu" && hello.cpu_numerics() != rules.cpu_numerics) {
    return FailedPrecondition("node at ", peer, " runs CPU kernels of numerics '", hello.cpu_numerics(),
                              "' and the leader '", rules.cpu_numerics,
                              "': BF16-weight products would differ between ranks; give every node a --cpu-isa "
                              "that computes alike on its CPU (auto, avx512 and avx2 give the same bits on every CPU)");
  }
  return devices;
}

StatusOr<int> AssignNodeRank(int asked, const std::vector<RankHolder>& ranks, const std::string& peer) {
  const int nodes = static_cast<int>(ranks.size());
  int node = asked;
  if (node == 0) {  // the lowest rank nobody ever held, else one nobody holds now (or a silent node holds)
    for (node = 1; node < nodes && (ranks[node].connected || ranks[node].joined_once); ++node) {
    }
    if (node == nodes) {
      for (node = 1; node < nodes && ranks[node].live; ++node) {
      }
    }
    if (node == nodes)
      return absl::AlreadyExistsError(StrCat("all ", nodes - 1, " follower ranks are held by live nodes"));
  }
  if (node < 1 || node >= nodes) {
    return InvalidArgument("node rank ", asked, " from ", peer, " is not in [1, ", nodes - 1, "] (--nodes ", nodes,
                           ")");
  }
  if (ranks[node].live)
    return absl::AlreadyExistsError(StrCat("node rank ", node, " is already held by ", ranks[node].peer));
  return node;
}

}  // namespace kraken::cluster
