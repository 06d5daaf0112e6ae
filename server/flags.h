// Where kraken-server's settings come from, in order of precedence: the command line, then the
// KRAKEN_* environment (KRAKEN_ + the flag's long name upper-cased, '-' as '_': --max-waiting is
// KRAKEN_MAX_WAITING), then the --config file (TOML/INI, the long names as keys), then the
// defaults. CLI11 on its own lets the file beat the environment; ArgsWithEnvironment puts every
// set variable on the command line ahead of the user's own flags instead, so the file fills only
// what neither gave. A KRAKEN_* variable or config key that names no flag is refused, with the
// closest valid name, so a misspelling cannot be silently ignored.
//
//   CLI::App app;  ... options added with ->envname(EnvName(name)) and TakeLast ...
//   KRAKEN_RETURN_IF_ERROR(CheckEnvironment(app, environ));
//   std::vector<std::string> args = ArgsWithEnvironment(app, argc, argv, environ);
//   ... app.parse(...) ...
//   KRAKEN_RETURN_IF_ERROR(CheckConfigKeys(app, config_path));
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "base/status.h"
#include "core/engine.h"
#include "http/server.h"
#include "runtime/memory.h"
#include "runtime/worker_group.h"
#include "scheduler/scheduler.h"

namespace kraken::server {

/// A duration as the seconds a flag gives it in.
inline double Seconds(std::chrono::milliseconds d) {
  return std::chrono::duration<double>(d).count();
}

/// Every setting of kraken-server (docs/api.md "Flags"), each declared once in AddServerFlags.
/// A default that belongs to a module is read from that module's option struct, never restated.
struct ServerFlags {
  std::string model = "models/kraken-kjv-4way";
  std::string devices = "cpu:1";
  std::string host = "0.0.0.0";
  int port = 8001;
  int http_port = 8000;
  int http_threads = http::ServerOptions{}.threads;
  double http_idle_timeout_s = Seconds(http::ServerOptions{}.idle_timeout);
  double request_timeout_s = 0;
  std::string served_model_name;
  std::string chat_template;  // a Jinja file for /v1/chat/completions; empty: the model's own
  int threads_per_worker = runtime::WorkerGroupOptions{}.threads_per_worker;
  int max_batch_tokens = scheduler::SchedulerOptions{}.max_batch_tokens;
  int max_batch_seqs = scheduler::SchedulerOptions{}.max_batch_seqs;
  int max_waiting = 0;  // 0: AutoMaxWaiting, from the host's memory
  int num_kv_blocks = scheduler::SchedulerOptions{}.num_kv_blocks;
  int64_t kv_cache_memory = runtime::KvSizing{}.kv_cache_bytes;
  std::string kv_cache_dtype = "auto";
  double memory_utilization = 0;  // 0: the device kind's default (engine::DeviceTraits)
  int block_size = scheduler::SchedulerOptions{}.block_size;
  double kv_watermark = scheduler::SchedulerOptions{}.watermark;
  bool prefix_caching = true;  // the server's choice (SchedulerOptions leaves it off for the scheduler's own tests)
  int max_message_bytes = static_cast<int>(http::ServerOptions{}.max_body_bytes);
  double grace_period_s = 30;
  int max_restarts = runtime::WorkerGroupOptions{}.max_restarts;
  double restart_window_s = Seconds(runtime::WorkerGroupOptions{}.restart_window);
  double heartbeat_timeout_s = Seconds(runtime::WorkerGroupOptions{}.heartbeat_timeout);
  double stall_timeout_s = Seconds(runtime::WorkerGroupOptions{}.stall_timeout);
  double start_timeout_s = Seconds(runtime::WorkerGroupOptions{}.start_timeout);
  double collective_timeout_s = Seconds(runtime::WorkerGroupOptions{}.collective_timeout);
  double resume_timeout_s = Seconds(core::EngineOptions{}.resume_timeout);
  std::string tls_cert, tls_key, tls_client_ca;
  std::string api_key;
  std::string log_level = "info";
  std::string log_format = "plain";
  int metrics_port = 8002;
  std::string scheduling_policy = "priority";
  std::string cpu_isa = "auto";
  bool print_resources = false;
  // Multi-node groups (docs/runtime.md "Nodes"); LeaderWorkerSet's environment fills the unset ones.
  int nodes = 0;  // 0: LWS_GROUP_SIZE on the leader, else 1
  int cluster_port = 8003;
  std::string join;  // a follower: the leader's host[:port]
  int node_rank = 0;
  std::string node_address;
  std::string cluster_cert, cluster_key, cluster_ca;  // mutual TLS on the cluster port
  bool cluster_insecure = false;
};

/// Declares every flag on `app`, bound to `f`'s fields, with its help, its check and its
/// KRAKEN_* environment name.
void AddServerFlags(CLI::App& app, ServerFlags& f);

/// Parses the command line, the environment `env` (as environ) and the --config file into `f`
/// (CLI11 also reads each flag's KRAKEN_* variable from the process environment when neither
/// the command line nor `env` gave it),
/// then checks what one flag cannot check alone (TLS pairs, --cpu-isa against this CPU). Returns
/// the exit code when the program should stop here: 0 after --help, 2 for a bad setting (the
/// message, naming the flag or variable, is on stderr).
std::optional<int> ParseServerFlags(int argc, const char* const* argv, const char* const* env, ServerFlags& f);

/// LeaderWorkerSet's environment (https://lws.sigs.k8s.io): fills --nodes on the leader, and
/// --join and --node-rank on the other pods, where flags left them unset; --node-address from the
/// host name in a group, loopback on one node.
void ApplyLeaderWorkerSet(ServerFlags& f);

/// The waiting queue's capacity when --max-waiting is 0 (its default): as many requests as 1/32
/// of the host memory this process may use (`host_available_bytes`) holds at the worst case of
/// one waiting request, its prompt filling the context (`context_length` tokens, kept as ids by
/// the request and by the scheduler, 8 bytes a token) plus 4 KiB of parameters and buffers;
/// within [kMinAutoWaiting, kMaxAutoWaiting]. The floor lets a benchmark's burst (guidellm's
/// sweep opens 512 requests at once) queue rather than be refused; the ceiling keeps a backlog
/// short enough to drain before clients give up. Past the capacity, RESOURCE_EXHAUSTED (HTTP 429)
/// tells a load balancer to go elsewhere.
int AutoMaxWaiting(int64_t host_available_bytes, int context_length);
inline constexpr int kMinAutoWaiting = 1024;
inline constexpr int kMaxAutoWaiting = 16384;

/// "--max-waiting" -> "KRAKEN_MAX_WAITING".
std::string EnvName(const std::string& long_flag);

/// The arguments to parse: argv[0], then "--name=value" for each option of `app` whose
/// environment variable is set and non-empty in `env` (a NULL-terminated "NAME=value" array, as
/// environ), then argv[1..]. Every option must take the last value given
/// (MultiOptionPolicy::TakeLast) for the command line to win.
std::vector<std::string> ArgsWithEnvironment(const CLI::App& app, int argc, const char* const* argv,
                                             const char* const* env);

/// KRAKEN_* variables that belong to the project's other programs (kraken-cli's KRAKEN_TARGET),
/// which a shell may set for both, or to its workers (KRAKEN_TEST_CRASH_ON_TOKEN, the test hook
/// of runtime/worker.cc): the server leaves them alone.
inline constexpr const char* kOtherProgramsVariables[] = {"KRAKEN_TARGET", "KRAKEN_TEST_CRASH_ON_TOKEN"};

/// INVALID_ARGUMENT naming the first variable in `env` that starts with KRAKEN_ but is no option's
/// environment name (nor in kOtherProgramsVariables), and the closest valid name; OK otherwise.
Status CheckEnvironment(const CLI::App& app, const char* const* env);

/// Reads `file` with the app's config parser; INVALID_ARGUMENT naming the first key that is no
/// option's long name, with the file and the closest valid key, or the parser's complaint when
/// the file cannot be read. OK for an empty `file` (none given).
Status CheckConfigKeys(const CLI::App& app, const std::string& file);

/// `error` (CLI11's message for a bad value), followed by which KRAKEN_* variable supplied the
/// value when the flag it names was set from the environment in `env`.
std::string ExplainParseError(const CLI::App& app, const std::string& error, const char* const* env);

}  // namespace kraken::server
