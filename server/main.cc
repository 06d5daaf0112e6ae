// kraken-server: serves a model over gRPC (kraken.v1.Kraken, grpc.health.v1.Health, reflection) and
// over OpenAI-compatible HTTP (openai/api.h), with Prometheus /metrics on its own port.
// Every flag is also an environment variable (KRAKEN_<FLAG>, e.g. KRAKEN_PORT) and a key of the
// TOML/INI file given with --config; the command line wins over the environment, which wins over
// the file (server/flags.h). See docs/api.md and README.md.
//
// main() runs these in order: parse flags; load the model's config and generation defaults;
// start the workers (runtime::WorkerGroup) and the serving core (core::Engine); serve gRPC and HTTP;
// wait for SIGTERM (drain) or for the workers to fail for good (exit 1).
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>

#include <chrono>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/strings/str_join.h"
#include "base/json_util.h"
#include "cluster/follower.h"
#include "cluster/hub.h"
#include "core/admission.h"
#include "core/engine.h"
#include "core/serving_metrics.h"
#include "engine/cpu/kernels.h"
#include "engine/model.h"
#include "engine/model_config.h"
#include "http/server.h"
#include "openai/api.h"
#include "runtime/memory.h"
#include "runtime/worker.h"
#include "runtime/worker_group.h"
#include "server/flags.h"
#include "server/json_log.h"
#include "server/kserve_service.h"
#include "server/read_file.h"
#include "server/reflection.h"
#include "server/service.h"

extern char** environ;

namespace {

using namespace kraken;

using Flags = server::ServerFlags;

// What requests may ask for: the model's limits and its generation defaults (Hugging Face's
// generation_config.json, when present).
core::RequestLimits LoadLimits(const std::string& model, const engine::ModelConfig& config) {
  core::RequestLimits limits;
  limits.context_length = config.n_positions;
  limits.vocab_size = config.vocab_size;
  limits.eos_token_id = config.eos_token_ids.empty() ? -1 : config.eos_token_ids.front();
  try {
    auto parsed = ParseJsonStrict(server::ReadWholeFile(model + "/generation_config.json"), "generation_config.json",
                                  /*max_depth=*/8);
    if (!parsed.ok()) throw std::runtime_error(std::string(parsed.status().message()));
    const nlohmann::json& g = *parsed;
    if (g.contains("temperature")) limits.default_temperature = g["temperature"].get<float>();
    if (g.contains("top_p")) limits.default_top_p = g["top_p"].get<float>();
    if (g.contains("max_new_tokens")) {
      const int64_t n = g["max_new_tokens"].get<int64_t>();
      if (n < 1 || n > config.n_positions)
        throw std::runtime_error(StrCat("max_new_tokens ", n, " is outside [1, ", config.n_positions, "]"));
      limits.default_max_tokens = static_cast<uint32_t>(n);
    }
    if (g.contains("eos_token_id")) {
      const auto& e = g["eos_token_id"];  // an id or a list of ids (the first is used)
      if (e.is_number_integer())
        limits.eos_token_id = e.get<int>();
      else if (e.is_array() && !e.empty())
        limits.eos_token_id = e[0].get<int>();
    }
  } catch (const std::exception& e) {
    spdlog::info("no usable generation_config.json ({}); built-in defaults apply", e.what());
  }
  return limits;
}

StatusOr<runtime::WorkerGroupOptions> WorkerOptions(const Flags& f, const engine::ModelConfig& config,
                                                    const core::RequestLimits& limits) {
  runtime::WorkerGroupOptions wo;
  wo.model_dir = f.model;
  KRAKEN_ASSIGN_OR_RETURN(wo.devices, runtime::ParseDevices(f.devices));  // the one place --devices is parsed
  wo.threads_per_worker = f.threads_per_worker;
  wo.max_tokens = f.max_batch_tokens;
  wo.max_seqs = f.max_batch_seqs;
  wo.block_size = f.block_size;
  wo.num_kv_blocks = f.num_kv_blocks;
  wo.kv_sizing.kv_cache_bytes = f.kv_cache_memory;
  KRAKEN_ASSIGN_OR_RETURN(wo.kv_sizing.kv_dtype, engine::KvCacheDType(f.kv_cache_dtype, f.model));
  wo.kv_sizing.memory_utilization =
      f.memory_utilization > 0 ? f.memory_utilization : wo.devices.front().traits().default_memory_utilization;
  wo.max_restarts = f.max_restarts;
  auto ms = [](double seconds) { return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000 + 0.5)); };
  wo.restart_window = ms(f.restart_window_s);
  wo.heartbeat_timeout = ms(f.heartbeat_timeout_s);
  wo.stall_timeout = ms(f.stall_timeout_s);
  wo.start_timeout = ms(f.start_timeout_s);
  wo.collective_timeout = ms(f.collective_timeout_s);
  return wo;
}

// --print-resources: what this configuration needs, as JSON on stdout. Returns the exit code.
int PrintResources(const Flags& f, const runtime::WorkerGroupOptions& wo, const engine::ModelConfig& config) {
  auto lim = runtime::PlanLimits(wo);
  if (!lim.ok()) {
    spdlog::critical("{}", lim.status().ToString());
    return 2;
  }
  if (Status split = config.CheckWorldSize(lim->world_size); !split.ok()) {
    spdlog::critical("{}", std::string(split.message()));
    return 2;
  }
  const int64_t segment = static_cast<int64_t>(runtime::ComputeLayout(*lim).total);
  const engine::DeviceTraits& device = wo.devices.front().traits();
  // This node's workers (every node of a multi-node group has as many as the leader).
  const int local = wo.local_ranks > 0 ? wo.local_ranks : lim->world_size;
  const int64_t collective_shm = device.host_shm_bytes_per_rank * local;
  const int64_t per_token =
      config.KvBytesPerToken(lim->world_size, static_cast<int>(engine::DTypeSize(wo.kv_sizing.kv_dtype)));
  nlohmann::json j{{"model", f.model},
                   {"devices", f.devices},
                   {"world_size", lim->world_size},
                   {"nodes", lim->world_size / local},
                   {"gpus", device.own_memory ? local : 0},
                   {"grpc_port", f.port},
                   {"http_port", f.http_port},
                   {"metrics_port", f.metrics_port},
                   {"cluster_port", f.cluster_port},
                   {"grace_period_seconds", f.grace_period_s},
                   {"dispatch_segment_bytes", segment},
                   {"nccl_shm_bytes", collective_shm},
                   {"shm_bytes_required", segment + collective_shm},
                   {"kv_cache_bytes_per_token_per_worker", per_token},
                   {"kv_cache_dtype", engine::DTypeName(wo.kv_sizing.kv_dtype)},
                   {"cpu_kernels", engine::cpu::Kernels().isa},
                   {"memory_utilization", wo.kv_sizing.memory_utilization}};
  // The pool is known here only when a flag fixes it; otherwise each worker sizes it from its
  // memory when it starts (the log and GetModelInfo give the result).
  int64_t blocks = lim->num_kv_blocks;
  if (blocks == 0 && wo.kv_sizing.kv_cache_bytes > 0)
    blocks = wo.kv_sizing.kv_cache_bytes / (per_token * lim->block_size);
  j["kv_cache_blocks_per_worker"] = blocks > 0 ? nlohmann::json(blocks) : nlohmann::json(nullptr);
  j["kv_cache_bytes_per_worker"] =
      blocks > 0 ? nlohmann::json(per_token * blocks * lim->block_size) : nlohmann::json(nullptr);
  std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

// The name the APIs give the model: --served-model-name, else the model folder's name.
std::string ServedModelName(const Flags& f) {
  if (!f.served_model_name.empty()) return f.served_model_name;
  std::string dir = f.model;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir.substr(dir.find_last_of('/') + 1);
}

// `rank0`: rank 0's memory as it reported it (it also holds the logits buffers); `kv_dtype`: the
// KV cache's element type ("auto" resolved).
kraken::v1::ModelInfo MakeModelInfo(const Flags& f, const engine::ModelConfig& config,
                                    const core::RequestLimits& limits, const runtime::WorkerGroup& group,
                                    const runtime::WorkerMemory& rank0, engine::DType kv_dtype) {
  const int world = group.world_size();
  const runtime::Limits rl = group.limits();
  kraken::v1::ModelInfo info;
  info.set_model_name(ServedModelName(f));
  info.set_architecture(std::string(engine::ArchitectureName(config.arch)));
  info.set_kraken_degree(config.kraken_degree);
  info.set_world_size(world);
  info.set_context_length(config.n_positions);
  info.set_vocab_size(config.vocab_size);
  info.set_eos_token_id(limits.eos_token_id);
  info.set_default_max_tokens(limits.default_max_tokens);
  info.set_max_stop_strings(limits.max_stop_strings);
  info.set_max_stop_string_bytes(limits.max_stop_string_bytes);
  info.set_max_top_logprobs(limits.max_top_logprobs);
  info.set_max_n(static_cast<uint32_t>(limits.max_n));
  info.set_max_waiting_requests(f.max_waiting);
  info.set_max_batch_tokens(f.max_batch_tokens);
  info.set_max_batch_sequences(f.max_batch_seqs);
  info.set_devices(f.devices);
  info.set_kv_cache_blocks(rl.num_kv_blocks);
  info.set_kv_cache_block_size(rl.block_size);
  info.set_kv_cache_tokens(static_cast<uint64_t>(rl.num_kv_blocks) * rl.block_size);
  info.set_kv_cache_bytes(rank0.kv_bytes);
  info.set_weight_bytes(rank0.weight_bytes);
  info.set_kv_cache_dtype(std::string(engine::DTypeName(kv_dtype)));
  return info;
}

// Plain text, TLS, or mutual TLS. INVALID_ARGUMENT naming the file that cannot be read.
StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(const Flags& f) {
  if (f.tls_cert.empty()) return grpc::InsecureServerCredentials();
  try {
    grpc::SslServerCredentialsOptions ssl(f.tls_client_ca.empty()
                                              ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    ssl.pem_key_cert_pairs.push_back({server::ReadWholeFile(f.tls_key), server::ReadWholeFile(f.tls_cert)});
    if (!f.tls_client_ca.empty()) ssl.pem_root_certs = server::ReadWholeFile(f.tls_client_ca);
    return grpc::SslServerCredentials(ssl);
  } catch (const std::exception& e) {
    return InvalidArgument("TLS: ", e.what());
  }
}

// What serves the APIs: gRPC, the OpenAI-compatible HTTP API, and the /metrics endpoint.
// Members are destroyed in reverse order: each server before the services and API it serves.
struct Frontends {
  std::unique_ptr<server::KrakenService> service;
  std::unique_ptr<server::KserveService> kserve;  // KServe v2 on the gRPC port
  std::unique_ptr<server::ReflectionV1> reflection;
  std::unique_ptr<openai::Api> api;
  std::unique_ptr<grpc::Server> grpc;
  std::unique_ptr<http::Server> http;          // null with --http-port -1
  std::unique_ptr<http::Server> metrics_http;  // null with --metrics-port -1
};

// Takes SIGTERM and SIGINT (blocked in every thread, `sigs`) from the moment the leader starts.
// Before the server serves (loading, waiting for nodes, starting workers) there is nothing in
// flight to drain: the first signal ends the process at once, exit 0 (its workers follow through
// their lifeline within 100 ms, follower nodes when their stream ends). Once Serving() has been
// called, WaitAndDrain drains on it instead.
class Signals {
 public:
  explicit Signals(const sigset_t& sigs) : sigs_(sigs) {
    waiter_ = std::thread([this] {
      while (true) {
        int s = 0;
        sigwait(&sigs_, &s);
        std::lock_guard<std::mutex> l(mu_);
        if (done_) return;
        if (!serving_) {
          spdlog::info("signal {} before the server began serving: exiting", s);
          spdlog::default_logger()->flush();
          std::_Exit(0);
        }
        if (count_++ == 0)
          first_ = s;
        else
          spdlog::warn("second signal {}: ending the grace period now", s);
      }
    });
  }
  ~Signals() {
    {
      std::lock_guard<std::mutex> l(mu_);
      done_ = true;
    }
    kill(getpid(), SIGTERM);  // release the waiter (the signal is blocked: sigwait takes it)
    waiter_.join();
  }
  void Serving() {
    std::lock_guard<std::mutex> l(mu_);
    serving_ = true;
  }
  int first() {
    std::lock_guard<std::mutex> l(mu_);
    return first_;
  }
  int count() {
    std::lock_guard<std::mutex> l(mu_);
    return count_;
  }

 private:
  sigset_t sigs_;
  std::mutex mu_;
  bool serving_ = false, done_ = false;
  int first_ = 0, count_ = 0;
  std::thread waiter_;
};

// Waits for SIGTERM/SIGINT or for the engine to fail for good, then drains: health NOT_SERVING
// (and /health 503), new calls UNAVAILABLE (503), in-flight requests get the grace period (a
// second signal ends it), then everything stops within a further 7 s at most (a restart under way
// is abandoned at once, the servers get 2 s to flush, the workers 5 s to exit). Returns the exit
// code: 0 after a signal, 1 when the workers failed beyond the restart limit.
int WaitAndDrain(Signals& signals, double grace_period_s, core::Engine& engine, Frontends& fe, core::Health& health) {
  while (signals.first() == 0 && !engine.fatal()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const bool fatal = engine.fatal();
  health.StartDraining();
  if (fatal) {
    spdlog::critical("workers failed beyond the restart limit; exiting");
  } else {
    spdlog::info("signal {}: draining (grace period {} s)", signals.first(), grace_period_s);
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_period_s);
    while (engine.active() > 0 && std::chrono::steady_clock::now() < until && signals.count() < 2 && !engine.fatal())
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  engine.Stop();  // ends what is left with UNAVAILABLE
  // Every server gets the same 2 s to flush what its clients have not read, side by side (an open
  // KServe stream keeps the gRPC shutdown waiting its full time).
  const auto flush = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  std::thread grpc_stop([&] { fe.grpc->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2)); });
  if (fe.http) fe.http->Stop(flush);
  if (fe.metrics_http) fe.metrics_http->Stop(flush);
  grpc_stop.join();
  spdlog::info("stopped");
  return fatal || engine.fatal() ? 1 : 0;
}

core::EngineOptions MakeEngineOptions(const Flags& f, const engine::ModelConfig& config, const runtime::Limits& rl,
                                      core::ServingMetrics* metrics, core::Health* health) {
  core::EngineOptions eo;
  eo.metrics = metrics;
  eo.context_length = config.n_positions;
  eo.scheduler = {.num_kv_blocks = rl.num_kv_blocks,
                  .block_size = rl.block_size,
                  .max_batch_tokens = f.max_batch_tokens,
                  .max_batch_seqs = f.max_batch_seqs,
                  .max_waiting = f.max_waiting,
                  .watermark = f.kv_watermark,
                  .policy = f.scheduling_policy == "fcfs" ? scheduler::SchedulingPolicy::kFcfs
                                                          : scheduler::SchedulingPolicy::kPriority,
                  .prefix_caching = f.prefix_caching};
  eo.on_serving = [health](bool serving) { health->SetServing(serving); };
  eo.resume_timeout = std::chrono::milliseconds(static_cast<int64_t>(f.resume_timeout_s * 1000 + 0.5));
  return eo;
}

// Starts the workers; the exit code when they cannot serve this configuration.
StatusOr<std::unique_ptr<runtime::WorkerGroup>> StartWorkers(const Flags& f, const runtime::WorkerGroupOptions& wo) {
  const auto t0 = std::chrono::steady_clock::now();
  KRAKEN_ASSIGN_OR_RETURN(auto group, runtime::WorkerGroup::Start(wo));
  const runtime::Limits rl = group->limits();
  spdlog::info("{} worker(s) on {} ready in {:.1f} s", group->world_size(), f.devices,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  spdlog::info("CPU kernels: {} (built: {}; --cpu-isa {})", engine::cpu::Kernels().isa,
               absl::StrJoin(engine::cpu::BuiltCpuIsas(), ", "), f.cpu_isa);
  for (const runtime::RankStatsSnapshot& s : group->Stats()) {
    const runtime::WorkerMemory& m = s.memory;
    spdlog::info(
        "rank {}: KV cache {} blocks of {} tokens = {} tokens, {} {} (budget {}); weights {}, activations {}, "
        "scratch {}",
        s.rank, rl.num_kv_blocks, rl.block_size, static_cast<int64_t>(rl.num_kv_blocks) * rl.block_size,
        runtime::FormatBytes(m.kv_bytes), engine::DTypeName(wo.kv_sizing.kv_dtype),
        runtime::FormatBytes(m.kv_budget_bytes), runtime::FormatBytes(m.weight_bytes),
        runtime::FormatBytes(m.activation_bytes), runtime::FormatBytes(m.scratch_bytes));
  }
  spdlog::info("prefix caching {}", f.prefix_caching ? "on (--no-prefix-caching turns it off)" : "off");
  return group;
}

// One HTTP server on host:port with `routes`; the port it listens on, or why it cannot. `api`
// answers the errors the transport finds itself (413, 404, 405).
StatusOr<std::unique_ptr<http::Server>> StartHttp(const Flags& f, int port, bool tls, const openai::Api& api,
                                                  const std::function<void(http::Server&)>& routes) {
  http::ServerOptions ho{.threads = f.http_threads,
                         .max_body_bytes = static_cast<size_t>(f.max_message_bytes),
                         .idle_timeout = std::chrono::milliseconds(static_cast<int64_t>(f.http_idle_timeout_s * 1000)),
                         .too_large = [&api](uint64_t size, uint64_t limit) { return api.TooLarge(size, limit); },
                         .not_routed = &openai::Api::NotRouted};
  if (tls) ho.tls = http::TlsFiles{.cert_chain = f.tls_cert, .private_key = f.tls_key, .client_ca = f.tls_client_ca};
  auto server = std::make_unique<http::Server>(std::move(ho));
  routes(*server);
  auto bound = server->Listen(f.host, port);
  if (!bound.ok())
    return Status(bound.status().code(), StrCat(std::string(bound.status().message()), " (",
                                                port == f.metrics_port ? "--metrics-port" : "--http-port", ")"));
  server->Start();
  spdlog::info("{} on {}://{}:{}", port == f.metrics_port ? "metrics" : "OpenAI-compatible API", tls ? "https" : "http",
               f.host, *bound);
  return server;
}

// Starts gRPC, the OpenAI-compatible HTTP API and /metrics over `engine`. The exit code when one
// cannot listen.
StatusOr<Frontends> StartFrontends(const Flags& f, const core::Admission& door, server::ServiceOptions so,
                                   std::shared_ptr<const tokenizer::ModelChatTemplate> chat_template,
                                   metrics::Registry& registry, core::Health& health) {
  Frontends fe;
  KRAKEN_ASSIGN_OR_RETURN(auto creds, Credentials(f));
  auto metrics_text = [&registry] { return registry.Serialize(); };
  fe.api = std::make_unique<openai::Api>(door, openai::ApiOptions{.served_model_name = so.info.model_name(),
                                                                  .chat_template = std::move(chat_template),
                                                                  .metrics_text = metrics_text,
                                                                  .version = KRAKEN_VERSION});
  if (f.metrics_port >= 0) {
    KRAKEN_ASSIGN_OR_RETURN(fe.metrics_http, StartHttp(f, f.metrics_port, false, *fe.api, [&](http::Server& s) {
                              s.Route("GET", "/metrics", [metrics_text](const http::Request&) -> http::Reply {
                                return http::Response{.status = 200,
                                                      .content_type = "text/plain; version=0.0.4; charset=utf-8",
                                                      .body = metrics_text()};
                              });
                            }));
  }
  if (f.http_port >= 0) {
    KRAKEN_ASSIGN_OR_RETURN(fe.http, StartHttp(f, f.http_port, !f.tls_cert.empty(), *fe.api,
                                               [&](http::Server& s) { fe.api->Register(s); }));
  }
  fe.kserve =
      std::make_unique<server::KserveService>(door, server::KserveOptions{.model_name = so.info.model_name(),
                                                                          .server_version = KRAKEN_VERSION,
                                                                          .max_message_bytes = so.max_message_bytes});
  fe.service = std::make_unique<server::KrakenService>(door, std::move(so));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(f.host + ":" + std::to_string(f.port), creds, &bound_port);
  // The service refuses (and counts) bodies over --max-message-bytes itself; gRPC's own ceiling,
  // which refuses before the service sees a call, sits at server::kTransportLimitFactor times it.
  builder.SetMaxReceiveMessageSize(f.max_message_bytes * server::kTransportLimitFactor);
  // gRPC sets SO_REUSEPORT by default: a second server on the same port would "start" and take
  // half the connections. Off, a port in use fails the start.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterService(fe.service.get());
  builder.RegisterService(fe.kserve.get());
  // Reflection v1 lists what v1alpha lists (grpcurl asks v1 first).
  fe.reflection = std::make_unique<server::ReflectionV1>(std::vector<std::string>{
      kraken::v1::Kraken::service_full_name(), inference::GRPCInferenceService::service_full_name(),
      server::HealthServiceName(), grpc::reflection::v1::ServerReflection::service_full_name(),
      "grpc.reflection.v1alpha.ServerReflection"});
  builder.RegisterService(fe.reflection.get());
  fe.grpc = builder.BuildAndStart();
  if (!fe.grpc || bound_port == 0)
    return absl::UnavailableError(
        StrCat("cannot listen on ", f.host, ":", f.port, " for gRPC (--port): is the port in use by another process?"));
  // Overall and per-service gRPC health: SERVING while the door's Health is ready.
  health.OnChange([service = fe.grpc->GetHealthCheckService()](bool ready) {
    service->SetServingStatus(ready);
    service->SetServingStatus("kraken.v1.Kraken", ready);
  });
  return fe;
}

// Lets the process hold as many connections as its hard limit allows (thousands of SSE streams
// each hold a descriptor; the soft limit is often 1024).
void RaiseDescriptorLimit() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

// What a multi-node group's nodes compare to be sure they loaded the same model: a hash of its
// config.json (the weights' shapes follow from it).
std::string ModelFingerprint(const std::string& model) {
  try {
    return StrCat("config.json#", std::hash<std::string>{}(server::ReadWholeFile(model + "/config.json")));
  } catch (const std::exception&) {
    return "no config.json";
  }
}

// The cluster port's security as the flags set it (cluster/credentials.h).
cluster::ClusterTls ClusterTlsOf(const Flags& f) {
  return {
      .cert_file = f.cluster_cert, .key_file = f.cluster_key, .ca_file = f.cluster_ca, .insecure = f.cluster_insecure};
}

// --join: this process is a follower node; it starts its workers when the leader says so.
int RunFollowerNode(const Flags& f) {
  auto devices = runtime::ParseDevices(f.devices);
  if (!devices.ok()) {
    spdlog::critical("{}", std::string(devices.status().message()));
    return 2;
  }
  cluster::FollowerOptions fo{.leader = f.join,
                              .node_rank = f.node_rank,
                              .model = ModelFingerprint(f.model),
                              .cpu_numerics = engine::cpu::KernelNumerics()};
  fo.tls = ClusterTlsOf(f);
  fo.workers.model_dir = f.model;
  fo.workers.devices = *devices;
  fo.workers.threads_per_worker = f.threads_per_worker;
  fo.workers.collective_host = f.node_address;
  fo.join_timeout = std::chrono::milliseconds(static_cast<int64_t>(f.start_timeout_s * 1000 + 0.5));
  spdlog::info("follower node: joining the leader at {} with {} worker(s) on {} (CPU kernels: {})", f.join,
               devices->size(), f.devices, engine::cpu::Kernels().isa);
  return cluster::RunFollower(fo);
}

// --nodes > 1: serves the followers on --cluster-port, waits for all of them to join, and makes
// `wo` span every node (this node's ranks first).
Status JoinNodes(const Flags& f, runtime::WorkerGroupOptions& wo) {
  const int local = static_cast<int>(wo.devices.size());
  KRAKEN_ASSIGN_OR_RETURN(auto hub, cluster::Hub::Create({.listen = StrCat(f.host, ":", f.cluster_port),
                                                          .nodes = f.nodes,
                                                          .ranks_per_node = local,
                                                          .device_kind = std::string(wo.devices.front().traits().kind),
                                                          .model = ModelFingerprint(f.model),
                                                          .model_dir = f.model,
                                                          .cpu_numerics = engine::cpu::KernelNumerics(),
                                                          .heartbeat_timeout = wo.heartbeat_timeout,
                                                          .collective_timeout = wo.collective_timeout,
                                                          .start_timeout = wo.start_timeout,
                                                          .tls = ClusterTlsOf(f)}));
  spdlog::info("leader of {} nodes: waiting for {} follower(s) on port {}", f.nodes, f.nodes - 1, hub->port());
  KRAKEN_ASSIGN_OR_RETURN(std::vector<engine::Device> remote, hub->AwaitNodes(wo.start_timeout));
  wo.devices.insert(wo.devices.end(), remote.begin(), remote.end());
  wo.local_ranks = local;
  wo.remote = hub;
  return absl::OkStatus();
}

// --nodes > 1: checks the world split and the cluster's TLS, then waits for the followers (exit
// code 2 for a configuration that cannot work, 1 when the nodes did not come; 0 when formed).
int FormGroup(const Flags& f, const engine::ModelConfig& config, runtime::WorkerGroupOptions& wo) {
  // Before waiting for anyone: every node has as many workers as this one.
  if (Status split = config.CheckWorldSize(f.nodes * static_cast<int>(wo.devices.size())); !split.ok()) {
    spdlog::critical("{} ({} nodes x {} workers)", std::string(split.message()), f.nodes, wo.devices.size());
    return 2;
  }
  if (Status tls = ClusterTlsOf(f).Check(); !tls.ok()) {
    spdlog::critical("{}", std::string(tls.message()));
    return 2;
  }
  if (Status joined = JoinNodes(f, wo); !joined.ok()) {
    spdlog::critical("{}", std::string(joined.message()));
    return joined.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

// The workers are up: the engine, the front door and the front-ends over them, until a signal or
// a fatal worker failure. Returns the exit code.
int Serve(const Flags& f, const engine::ModelConfig& config, const core::RequestLimits& limits,
          const runtime::WorkerGroupOptions& wo, const tokenizer::Tokenizer& tok,
          std::shared_ptr<const tokenizer::ModelChatTemplate> chat_template,
          std::unique_ptr<runtime::WorkerGroup> group, Signals& signals) {
  const runtime::Limits rl = group->limits();
  const int world = group->world_size();
  metrics::Registry registry;
  core::ServingMetrics serving_metrics(registry, world, KRAKEN_VERSION, ServedModelName(f), f.devices,
                                       engine::cpu::Kernels().isa);
  const runtime::WorkerMemory rank0 = group->Stats().front().memory;
  serving_metrics.PublishCacheConfig({.block_size = rl.block_size,
                                      .num_blocks = rl.num_kv_blocks,
                                      .memory_utilization = wo.kv_sizing.memory_utilization,
                                      .kv_cache_bytes = rank0.kv_bytes,
                                      .cache_dtype = std::string(engine::DTypeName(wo.kv_sizing.kv_dtype)),
                                      .prefix_caching = f.prefix_caching});
  core::Health health;
  kraken::v1::ModelInfo info = MakeModelInfo(f, config, limits, *group, rank0, wo.kv_sizing.kv_dtype);
  core::Engine engine(std::move(group), &tok, MakeEngineOptions(f, config, rl, &serving_metrics, &health));
  const core::Admission door(
      tok, health,
      [&engine](core::RequestParams p, core::Clock::time_point arrival, core::Clock::time_point deadline) {
        return engine.SubmitSamples(std::move(p), arrival, deadline);
      },
      core::AdmissionOptions{
          .limits = limits,
          .api_key = f.api_key,
          .metrics = &serving_metrics,
          .request_timeout = std::chrono::milliseconds(static_cast<int64_t>(f.request_timeout_s * 1000 + 0.5))});
  server::ServiceOptions so{.info = std::move(info), .max_message_bytes = f.max_message_bytes};
  signals.Serving();  // from the first accepted request on, a signal drains
  auto fe = StartFrontends(f, door, so, std::move(chat_template), registry, health);
  if (!fe.ok()) {
    spdlog::critical("{}", std::string(fe.status().message()));
    return fe.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  health.SetServing(true);
  spdlog::info("serving {} ({}, N = {}, world size {}) on {}:{}{}{}", so.info.model_name(), so.info.architecture(),
               so.info.kraken_degree(), world, f.host, f.port, f.tls_cert.empty() ? "" : " with TLS",
               f.api_key.empty() ? "" : ", API key required");
  const int code = WaitAndDrain(signals, f.grace_period_s, engine, *fe, health);
  health.OnChange(nullptr);  // the gRPC server, whose health service it publishes to, goes first
  return code;
}

// Everything after the flags: returns the exit code.
int Run(const Flags& given, const sigset_t& sigs) {
  Signals signals(sigs);
  auto config = engine::LoadModelConfig(given.model);
  if (!config.ok()) {
    spdlog::critical("cannot load model: {}", config.status().ToString());
    return 2;
  }
  Flags f = given;
  if (f.max_waiting == 0) {  // from the memory this process may use
    const StatusOr<int64_t> host = runtime::HostAvailableBytes();
    f.max_waiting = server::AutoMaxWaiting(host.ok() ? *host : 0, config->n_positions);
    spdlog::info("waiting queue: {} requests (--max-waiting 0: from {} of host memory available)", f.max_waiting,
                 host.ok() ? runtime::FormatBytes(*host) : "unreadable");
  }
  core::RequestLimits limits = LoadLimits(f.model, *config);
  limits.max_n = std::max(1, std::min(limits.max_n, f.max_waiting));  // n samples queue as n requests
  limits.max_samples = std::max(1, f.max_waiting);                    // so do several prompts' samples
  auto wo = WorkerOptions(f, *config, limits);
  if (!wo.ok()) {
    spdlog::critical("{}", std::string(wo.status().message()));
    return 2;
  }
  wo->collective_host = f.node_address;
  if (f.print_resources) {
    const std::vector<engine::Device> local = wo->devices;  // every node has as many workers as the leader
    for (int n = 1; n < f.nodes; ++n) wo->devices.insert(wo->devices.end(), local.begin(), local.end());
    wo->local_ranks = static_cast<int>(local.size());
    return PrintResources(f, *wo, *config);
  }
  auto tok = tokenizer::Tokenizer::FromModelDir(f.model);
  if (!tok.ok()) {
    spdlog::critical("cannot load tokenizer: {}", tok.status().ToString());
    return 2;
  }
  auto chat = tokenizer::LoadChatTemplate(f.model, f.chat_template);
  if (!chat.ok()) {
    spdlog::critical("cannot load the chat template: {}", std::string(chat.status().message()));
    return 2;
  }
  std::shared_ptr<const tokenizer::ModelChatTemplate> chat_template;
  if (chat->has_value()) {
    spdlog::info("chat template: {}", (*chat)->origin);
    chat_template = std::make_shared<const tokenizer::ModelChatTemplate>(std::move(**chat));
  } else {
    spdlog::info("chat template: none (/v1/chat/completions answers 400; --chat-template FILE gives one)");
  }
  if (auto creds = Credentials(f); !creds.ok()) {
    spdlog::critical("{}", std::string(creds.status().message()));
    return 2;
  }
  RaiseDescriptorLimit();
  if (f.nodes > 1) {
    if (int code = FormGroup(f, *config, *wo)) return code;
  }
  auto group = StartWorkers(f, *wo);
  if (!group.ok()) {
    spdlog::critical("workers failed to start: {}", group.status().ToString());
    // A configuration the machine cannot serve (bad flags, a KV budget below one context) is exit 2.
    const absl::StatusCode code = group.status().code();
    return code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kResourceExhausted ? 2 : 1;
  }
  return Serve(f, *config, limits, *wo, **tok, std::move(chat_template), std::move(*group), signals);
}

}  // namespace

int main(int argc, char** argv) {
  if (auto code = kraken::runtime::MaybeRunWorker(argc, argv)) return *code;
  Flags f;
  if (auto code = server::ParseServerFlags(argc, argv, environ, f)) return *code;
  // Logs go to stderr; stdout carries only data (--print-resources).
  spdlog::set_default_logger(spdlog::stderr_color_mt("kraken"));
  spdlog::set_level(spdlog::level::from_str(f.log_level));
  // One JSON object per line; messages are escaped by JsonLogSink (server/json_log.h).
  if (f.log_format == "json") kraken::server::UseJsonLogs();
  server::ApplyLeaderWorkerSet(f);
  if (!f.join.empty() && !f.print_resources)
    return RunFollowerNode(f);  // default signal handling: SIGTERM ends it and its workers
  // SIGTERM and SIGINT are taken by a waiting thread; block them before any thread starts.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return Run(f, sigs);
}
