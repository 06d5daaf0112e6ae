// The worker process: one per device. It maps the dispatch segment, loads its shard of the
// model, joins its peers' communicator, warms up, and then runs every step plan the front-end
// publishes until told to shut down. Rank 0 also samples and writes the step result.
//
// Any binary that starts a WorkerGroup must hand its arguments to MaybeRunWorker first thing
// in main(), because the front-end re-executes that same binary in worker mode:
//
//   int main(int argc, char** argv) {
//     if (auto code = kraken::runtime::MaybeRunWorker(argc, argv)) return *code;
//     ...
//   }
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "engine/device.h"

namespace kraken::runtime {

/// Command line of a worker (built by WorkerGroup, parsed by MaybeRunWorker).
struct WorkerArgs {
  size_t segment_bytes = 0;  // the segment itself arrives as descriptor kSegmentFd
  int rank = 0;
  int world = 1;
  std::string model_dir;
  engine::Device device;
  int threads = 1;
  int parent_pid = 0;
  int collective_timeout_ms = 30000;
  std::string link_preset;                    // benchmarks: emulate this interconnect
  double measured_gemm_flops = 0;             // with link_preset: scale link time to this CPU (0 = raw)
  std::string collective_host = "127.0.0.1";  // the address Gloo binds (multi-node: this node's)
};

/// Descriptors a worker inherits: the dispatch segment, and the read end of a pipe whose write
/// end only the front-end holds (end of file = the front-end is gone, however it ended).
inline constexpr int kSegmentFd = 3;
inline constexpr int kLifelineFd = 4;

/// The flag that marks a worker's command line.
inline constexpr const char* kWorkerFlag = "--kraken-worker";

/// Renders `args` as the arguments after the binary name.
std::vector<std::string> WorkerCommandLine(const WorkerArgs& args);

/// If argv carries kWorkerFlag, runs the worker to completion and returns its exit code
/// (0 after an orderly shutdown, non-zero when it failed, with the reason in its rank slot and on
/// stderr). Otherwise returns nullopt at once.
std::optional<int> MaybeRunWorker(int argc, char** argv);

}  // namespace kraken::runtime
