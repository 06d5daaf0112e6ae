#include "server/flags.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "base/closest.h"
#include "engine/cpu/kernels.h"
#include "engine/model.h"

namespace kraken::server {
namespace {

constexpr const char* kPrefix = "KRAKEN_";

// The long names ("max-waiting") of every option that has one.
std::vector<std::string> LongNames(const CLI::App& app) {
  std::vector<std::string> out;
  for (const CLI::Option* o : app.get_options()) {
    if (!o->get_lnames().empty()) out.push_back(o->get_lnames().front());
  }
  return out;
}

std::vector<std::string> EnvNames(const CLI::App& app) {
  std::vector<std::string> out;
  for (const CLI::Option* o : app.get_options()) {
    if (!o->get_envname().empty()) out.push_back(o->get_envname());
  }
  return out;
}

}  // namespace

int AutoMaxWaiting(int64_t host_available_bytes, int context_length) {
  const int64_t per_request = 4096 + 8 * static_cast<int64_t>(std::max(context_length, 1));
  const int64_t fits = std::max<int64_t>(host_available_bytes, 0) / 32 / per_request;
  return static_cast<int>(std::clamp<int64_t>(fits, kMinAutoWaiting, kMaxAutoWaiting));
}

std::string EnvName(const std::string& long_flag) {
  std::string name = kPrefix;
  for (char c : long_flag.substr(long_flag.find_first_not_of('-'))) {
    name += c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return name;
}

std::vector<std::string> ArgsWithEnvironment(const CLI::App& app, int argc, const char* const* argv,
                                             const char* const* env) {
  std::vector<std::string> args;
  args.emplace_back(argc > 0 ? argv[0] : "kraken-server");
  for (const CLI::Option* o : app.get_options()) {
    const std::string& var = o->get_envname();
    if (var.empty() || o->get_lnames().empty()) continue;
    for (const char* const* e = env; e != nullptr && *e != nullptr; ++e) {
      const char* eq = std::strchr(*e, '=');
      if (eq == nullptr || static_cast<size_t>(eq - *e) != var.size() || std::strncmp(*e, var.c_str(), var.size()) != 0)
        continue;
      if (eq[1] != '\0') args.push_back("--" + o->get_lnames().front() + "=" + std::string(eq + 1));
    }
  }
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  return args;
}

Status CheckEnvironment(const CLI::App& app, const char* const* env) {
  std::vector<std::string> known = EnvNames(app);
  const std::vector<std::string> others(std::begin(kOtherProgramsVariables), std::end(kOtherProgramsVariables));
  for (const char* const* e = env; e != nullptr && *e != nullptr; ++e) {
    const std::string entry = *e;
    if (entry.rfind(kPrefix, 0) != 0) continue;
    const std::string name = entry.substr(0, entry.find('='));
    if (std::find(known.begin(), known.end(), name) != known.end()) continue;
    if (std::find(others.begin(), others.end(), name) != others.end()) continue;
    return InvalidArgument("environment variable ", name, " is not a kraken-server setting (did you mean ",
                           Closest(name, known), "?); every KRAKEN_* variable names a flag: see kraken-server --help");
  }
  return absl::OkStatus();
}

Status CheckConfigKeys(const CLI::App& app, const std::string& file) {
  if (file.empty()) return absl::OkStatus();
  std::vector<CLI::ConfigItem> items;
  try {
    items = app.get_config_formatter_base()->from_file(file);
  } catch (const CLI::Error& e) {
    return InvalidArgument("config file '", file, "': ", e.what());
  }
  const std::vector<std::string> known = LongNames(app);
  for (const CLI::ConfigItem& item : items) {
    if (item.name == "++" || item.name == "--") continue;  // section markers
    const std::string key = item.fullname();
    if (item.parents.empty() && std::find(known.begin(), known.end(), key) != known.end()) continue;
    return InvalidArgument("config file '", file, "': key '", key, "' is not a kraken-server setting (did you mean '",
                           Closest(key, known), "'?); keys are the long flag names: see kraken-server --help");
  }
  return absl::OkStatus();
}

std::string ExplainParseError(const CLI::App& app, const std::string& error, const char* const* env) {
  for (const CLI::Option* o : app.get_options()) {
    if (o->get_envname().empty() || o->get_lnames().empty()) continue;
    if (error.find("--" + o->get_lnames().front() + ":") == std::string::npos) continue;
    const std::string& var = o->get_envname();
    for (const char* const* e = env; e != nullptr && *e != nullptr; ++e) {
      if (std::strncmp(*e, var.c_str(), var.size()) == 0 && (*e)[var.size()] == '=') {
        return error + " (the value came from the environment variable " + var + ")";
      }
    }
  }
  return error;
}

namespace {

// The KV cache's flags: its size (a budget, or a block count) and its element type.
template <typename Opt>
void AddKvCacheFlags(const Opt& opt, ServerFlags& f) {
  opt("--memory-utilization", f.memory_utilization,
      "fraction of each worker's device memory it may use, weights, activations and KV cache included (GPU: the "
      "device's memory; CPU: its even share of the host's available memory); the KV cache gets the rest; 0 = 0.9 "
      "on GPUs, 0.1 on CPUs")
      ->check(CLI::Range(0.0, 1.0));
  opt("--kv-cache-memory", f.kv_cache_memory,
      "KV cache bytes per worker (e.g. 512MiB, 4GiB, 2GB); 0 = sized by --memory-utilization")
      ->transform(CLI::AsSizeValue(true));
  opt("--kv-cache-dtype", f.kv_cache_dtype,
      "element type of the KV cache: auto (the weights' dtype), f32, bf16 or f16; attention computes in F32 "
      "either way")
      ->check(CLI::IsMember(engine::kKvCacheDTypeNames));
  opt("--num-kv-blocks", f.num_kv_blocks,
      "KV blocks per worker, overriding --kv-cache-memory and --memory-utilization; 0 = sized from memory")
      ->check(CLI::Range(0, 1 << 30));
  opt("--block-size", f.block_size, "tokens per KV block")->check(CLI::Range(1, 1024));
  opt("--kv-watermark", f.kv_watermark, "fraction of KV blocks admission keeps free")->check(CLI::Range(0.0, 0.5));
}

// --prefix-caching (default) / --no-prefix-caching; KRAKEN_PREFIX_CACHING=false turns it off too.
void AddPrefixCachingFlag(CLI::App& app, ServerFlags& f) {
  app.add_flag("--prefix-caching,!--no-prefix-caching", f.prefix_caching,
               "reuse the KV of full blocks an earlier request computed for the same leading tokens (automatic "
               "prefix caching; on CPU workers outputs are bit-identical with or without a hit)")
      ->envname(EnvName("--prefix-caching"))
      ->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
}

// A multi-node group's flags (docs/runtime.md "Nodes").
template <typename Opt>
void AddNodeFlags(const Opt& opt, ServerFlags& f) {
  opt("--nodes", f.nodes,
      "nodes in this worker group, the leader's included (the leader waits for the others to --join); 0 = "
      "LeaderWorkerSet's LWS_GROUP_SIZE when set, else 1")
      ->check(CLI::Range(0, 64));
  opt("--cluster-port", f.cluster_port, "the port a multi-node leader serves its followers on")
      ->check(CLI::Range(0, 65535));
  opt("--join", f.join,
      "run as a follower node of the leader at HOST[:PORT] (default port: --cluster-port): start this node's "
      "workers and serve no API; default on a LeaderWorkerSet worker pod: LWS_LEADER_ADDRESS");
  opt("--node-rank", f.node_rank,
      "this follower's node rank, 1 .. nodes - 1; 0 = LeaderWorkerSet's LWS_WORKER_INDEX, else the lowest free")
      ->check(CLI::Range(0, 63));
  opt("--node-address", f.node_address,
      "the address this node's workers bind for collectives (Gloo); default: 127.0.0.1 on one node, this host's "
      "name in a multi-node group");
  opt("--cluster-cert", f.cluster_cert,
      "a multi-node group's mutual TLS: this node's certificate chain (PEM), signed by --cluster-ca; the leader's "
      "must name the address its followers dial");
  opt("--cluster-key", f.cluster_key, "the private key of --cluster-cert (PEM)");
  opt("--cluster-ca", f.cluster_ca, "the group's CA certificate (PEM): every node must present one it signed");
}

// The supervision timers and the restart budget (docs/api.md "Timers").
template <class Opt>
void AddTimerFlags(const Opt& opt, ServerFlags& f) {
  opt("--grace-period", f.grace_period_s, "seconds in-flight requests get after SIGTERM")
      ->check(CLI::Range(0.0, 86400.0));
  opt("--max-restarts", f.max_restarts,
      "worker failures tolerated within --restart-window; one more and the server exits non-zero")
      ->check(CLI::Range(0, 1000));
  opt("--restart-window", f.restart_window_s, "seconds over which worker failures are counted")
      ->check(CLI::Range(0.001, 86400.0));
  opt("--heartbeat-timeout", f.heartbeat_timeout_s,
      "seconds a worker's heartbeat may be silent by its own fault (time its host kept it from a CPU is excused) "
      "before it is restarted; a follower node and the leader give each other twice as long")
      ->check(CLI::Range(0.2, 3600.0));
  opt("--resume-timeout", f.resume_timeout_s,
      "seconds a request in flight waits for the workers to come back after a failure before it fails "
      "UNAVAILABLE (never past its own deadline)")
      ->check(CLI::Range(0.0, 86400.0));
  opt("--stall-timeout", f.stall_timeout_s,
      "seconds a step may go without progress (from when it was handed out) before its workers are restarted")
      ->check(CLI::Range(0.01, 86400.0));
  opt("--start-timeout", f.start_timeout_s, "seconds the workers get to load the model and report ready")
      ->check(CLI::Range(0.001, 86400.0));
  opt("--collective-timeout", f.collective_timeout_s,
      "seconds one AllReduce may take inside a worker before the worker fails")
      ->check(CLI::Range(0.01, 86400.0));
}

}  // namespace

void AddServerFlags(CLI::App& app, ServerFlags& f) {
  app.set_config("--config", "", "TOML/INI file with any of these flags as keys")
      ->envname(EnvName("--config"))
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  // Config keys that name no flag are refused after parsing (CheckConfigKeys), by name;
  // every flag's variable is EnvName of it.
  auto opt = [&](const std::string& name, auto& var, const char* help) {
    // The last value given wins: ArgsWithEnvironment puts the environment's first.
    return app.add_option(name, var, help)
        ->envname(EnvName(name))
        ->capture_default_str()
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  };
  opt("--model", f.model, "model directory (config.json, model.safetensors, tokenizer.json)");
  opt("--devices", f.devices, "one worker per device: cpu:N, cuda:0-7, cuda:0,2");
  opt("--host", f.host, "address to listen on");
  opt("--port", f.port, "gRPC port")->check(CLI::Range(0, 65535));
  opt("--http-port", f.http_port, "OpenAI-compatible HTTP port; -1 = off")->check(CLI::Range(-1, 65535));
  opt("--http-threads", f.http_threads, "I/O threads of the HTTP server (connections are not threads)")
      ->check(CLI::Range(1, 64));
  opt("--http-idle-timeout", f.http_idle_timeout_s,
      "seconds an HTTP connection may sit idle, take to send a request, or leave a response unread")
      ->check(CLI::Range(0.05, 86400.0));
  opt("--request-timeout", f.request_timeout_s,
      "seconds a generation request may take from arrival, on every API (a gRPC deadline may be shorter); 0 = none")
      ->check(CLI::Range(0.0, 86400.0));
  opt("--chat-template", f.chat_template,
      "Jinja chat template file for /v1/chat/completions; default: the model's chat_template.jinja or "
      "tokenizer_config.json chat_template");
  opt("--served-model-name", f.served_model_name,
      "the model's name in the APIs (OpenAI 'model', /v1/models); default: the model folder's name");
  opt("--threads-per-worker", f.threads_per_worker, "CPU threads per worker; 0 = cores / workers");
  opt("--max-batch-tokens", f.max_batch_tokens, "token budget of one step")->check(CLI::Range(1, 1 << 20));
  opt("--max-batch-seqs", f.max_batch_seqs, "sequences per step")->check(CLI::Range(1, 4096));
  opt("--max-waiting", f.max_waiting,
      "waiting-queue capacity (beyond: RESOURCE_EXHAUSTED); 0 = from the host's memory (1024 to 16384)")
      ->check(CLI::Range(0, 1 << 20));
  AddKvCacheFlags(opt, f);
  opt("--max-message-bytes", f.max_message_bytes, "largest request message (bytes); larger ones get RESOURCE_EXHAUSTED")
      ->check(CLI::Range(1024, 256 << 20));
  AddTimerFlags(opt, f);
  opt("--tls-cert", f.tls_cert, "PEM certificate chain (enables TLS)");
  opt("--tls-key", f.tls_key, "PEM private key");
  opt("--tls-client-ca", f.tls_client_ca, "PEM CA: require and verify client certificates");
  opt("--api-key", f.api_key, "require 'authorization: Bearer <key>' on API calls");
  opt("--log-level", f.log_level, "trace, debug, info, warn, error");
  opt("--log-format", f.log_format, "plain or json (one JSON object per line)")
      ->check(CLI::IsMember({"plain", "json"}));
  opt("--cpu-isa", f.cpu_isa,
      "highest CPU kernel level to use: auto (the best this CPU has, amx and avx512bf16 aside), amx (AMX-BF16 "
      "tiles for BF16 weights, with BF16-rounded activations), avx512bf16 (the same product with AVX512-BF16 dot "
      "products), avx512 or avx2; the workers inherit it")
      ->check(CLI::IsMember({"auto", "amx", "avx512bf16", "avx512", "avx2"}));
  app.add_flag("--print-resources", f.print_resources,
               "print what this configuration needs (workers, GPUs, shared memory, KV cache) as JSON and exit");
  opt("--metrics-port", f.metrics_port, "Prometheus /metrics port; -1 = off")->check(CLI::Range(-1, 65535));
  opt("--scheduling-policy", f.scheduling_policy,
      "order of the waiting queue: priority (the request's priority, then arrival) or fcfs (arrival only)")
      ->check(CLI::IsMember({"priority", "fcfs"}));
  AddPrefixCachingFlag(app, f);
  AddNodeFlags(opt, f);
  app.add_flag("--cluster-insecure", f.cluster_insecure,
               "run a multi-node group's cluster port in plaintext, without authentication (only on a network that "
               "is itself trusted: anyone who can reach the port could join the group and read every prompt)")
      ->envname(EnvName("--cluster-insecure"));
}

void ApplyLeaderWorkerSet(ServerFlags& f) {
  auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    return v == nullptr ? "" : v;
  };
  const std::string index = env("LWS_WORKER_INDEX"), size = env("LWS_GROUP_SIZE"), leader = env("LWS_LEADER_ADDRESS");
  const int worker_index = index.empty() ? -1 : std::atoi(index.c_str());
  if (f.join.empty() && worker_index > 0 && !leader.empty()) f.join = leader;
  if (f.node_rank == 0 && worker_index > 0) f.node_rank = worker_index;
  if (f.nodes == 0) f.nodes = size.empty() ? 1 : std::max(1, std::atoi(size.c_str()));
  if (!f.join.empty() && f.join.find(':') == std::string::npos) f.join += ":" + std::to_string(f.cluster_port);
  if (f.node_address.empty()) {  // one node: loopback; a group: this host's name (its pod IP in Kubernetes)
    char host[256] = {};
    const bool group = f.nodes > 1 || !f.join.empty();
    f.node_address = group && gethostname(host, sizeof host - 1) == 0 && host[0] != '\0' ? host : "127.0.0.1";
  }
}

std::optional<int> ParseServerFlags(int argc, const char* const* argv, const char* const* env, ServerFlags& f) {
  CLI::App app{
      "kraken-server: streaming gRPC inference for Kraken transformers.\n"
      "Every flag is also a KRAKEN_* environment variable and a --config key; the command line wins over "
      "the environment, which wins over the file."};
  AddServerFlags(app, f);
  if (Status checked = CheckEnvironment(app, env); !checked.ok()) {
    std::fprintf(stderr, "kraken-server: %s\n", std::string(checked.message()).c_str());
    return 2;
  }
  {
    std::vector<std::string> args = ArgsWithEnvironment(app, argc, argv, env);
    std::vector<const char*> cargs;
    for (const std::string& a : args) cargs.push_back(a.c_str());
    try {
      app.parse(static_cast<int>(cargs.size()), cargs.data());
    } catch (const CLI::Success& e) {
      return app.exit(e);  // --help
    } catch (const CLI::ParseError& e) {
      std::fprintf(stderr, "kraken-server: %s\nRun with --help for more information.\n",
                   ExplainParseError(app, e.what(), env).c_str());
      return 2;
    }
    const CLI::Option* config_opt = app.get_config_ptr();
    const std::string config_file = config_opt->empty() ? "" : config_opt->as<std::string>();
    if (Status keys = CheckConfigKeys(app, config_file); !keys.ok()) {
      std::fprintf(stderr, "kraken-server: %s\n", std::string(keys.message()).c_str());
      return 2;
    }
  }
  if (f.tls_cert.empty() != f.tls_key.empty()) {
    std::fprintf(stderr, "kraken-server: --tls-cert and --tls-key must be given together\n");
    return 2;
  }
  if (!f.tls_client_ca.empty() && f.tls_cert.empty()) {
    std::fprintf(stderr, "kraken-server: --tls-client-ca needs --tls-cert and --tls-key\n");
    return 2;
  }
  // The kernels read the cap from KRAKEN_CPU_ISA (engine/cpu/kernels.h), in this process and in
  // the workers it starts; the flag, wherever it came from, is what they see.
  if (f.cpu_isa == "auto") {
    unsetenv("KRAKEN_CPU_ISA");
  } else {
    setenv("KRAKEN_CPU_ISA", f.cpu_isa.c_str(), 1);
  }
  const StatusOr<const engine::cpu::KernelTable*> kernels =
      engine::cpu::SelectKernels(std::getenv("KRAKEN_CPU_ISA"), &engine::cpu::CpuHasFeature);
  if (!kernels.ok()) {
    std::fprintf(stderr, "kraken-server: --cpu-isa: %s\n", std::string(kernels.status().message()).c_str());
    return 2;
  }
  return std::nullopt;
}

}  // namespace kraken::server
