// ttft_bench: prefill time to first token of Kraken vs standard (Megatron) tensor parallelism vs
// parallel attention + FFN, at equal parameter count, over real worker processes: W = 2 and 4
// CPU workers, T = 128 and 2048, with plain Gloo on loopback and with each link-model preset
// (link time scaled by preset GEMM rate / measured CPU GEMM rate, engine/comm/link_model.h).
// Prints TTFT per cell, Kraken's speedup (T_standard / T_kraken - 1, the paper's definition),
// the geometric mean per preset (as the paper's Figure 4), and each rank's exposed-communication
// share (time the compute path waited on a collective / step time).
//
//   bench/ttft_bench.py                # makes the three random-weight models, then runs this
//   build/bench/ttft_bench --models build/bench-models/ttft --presets none,a100-nvswitch
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>

#include <CLI/CLI.hpp>

#ifdef KRAKEN_HAVE_CLUSTER  // multi-node mode (a build with the gRPC server)
#include "cluster/follower.h"
#include "cluster/hub.h"
#endif
#include "engine/comm/link_model.h"
#include "engine/cpu/gemm.h"
#include "engine/model_config.h"
#include "runtime/worker.h"
#include "runtime/worker_group.h"

namespace kraken {
namespace {

using runtime::SeqStep;
using runtime::WorkerGroup;

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// Our packed GEMM's rate with `threads` threads at a prefill-like shape (FLOP/s).
double MeasureGemm(int threads) {
  omp_set_num_threads(threads);
  const int m = 512, n = 1024, k = 1024;
  std::vector<float> a(static_cast<size_t>(m) * k, 0.5f), w(static_cast<size_t>(n) * k, 0.25f),
      c(static_cast<size_t>(m) * n);
  engine::cpu::MatrixSource src{.data = reinterpret_cast<const uint8_t*>(w.data()),
                                .dtype = engine::DType::kF32,
                                .out_stride = k,
                                .in_stride = 1,
                                .in = k};
  src.rows.resize(n);
  std::iota(src.rows.begin(), src.rows.end(), 0);
  auto packed = engine::cpu::PackedMatrix::Pack(src);
  engine::cpu::GemmScratch scratch;
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    engine::cpu::Gemm(a.data(), m, k, *packed, nullptr, c.data(), n, false, &scratch);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * m * n * k / best;
}

// How each cell runs: the device, timed prefills, the link model raw or scaled, and for a
// multi-node run the other nodes (cluster::Hub) with their devices.
struct BenchOptions {
  std::string device = "cpu";
  int repeats = 3;
  bool raw_link = false;  // link time as the preset says (no scaling to this CPU)
  std::shared_ptr<runtime::RemoteNodes> hub;
  std::function<void(const std::string&)> set_model_dir;  // the model the other nodes load next
  std::vector<engine::Device> remote;
  std::string node_address = "127.0.0.1";
};

struct Cell {
  double ttft = 0;                    // seconds, median
  std::vector<double> exposed_share;  // per rank
};

StatusOr<std::map<int, Cell>> Measure(const std::string& model, int world, const std::vector<int>& tokens,
                                      const std::string& preset, double gemm_flops, const BenchOptions& b) {
  const std::string& device = b.device;
  const int repeats = b.repeats;
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  const int max_t = *std::max_element(tokens.begin(), tokens.end());
  // "cuda": GPUs 0 .. W-1, one worker each, NCCL between them.
  const std::string devices = device == "cuda" ? StrCat("cuda:0-", world - 1) : StrCat("cpu:", world);
  runtime::WorkerGroupOptions o{.model_dir = model,
                                .devices = *runtime::ParseDevices(devices),
                                .threads_per_worker = std::max(1, cores / world),
                                .max_tokens = max_t,
                                .max_seqs = 1,
                                .max_context = max_t,
                                .num_kv_blocks = (max_t + 15) / 16,
                                .max_history = 1};
  if (preset != "none") {
    o.link_preset = preset;
    o.measured_gemm_flops = b.raw_link ? 0 : gemm_flops;
  }
  if (b.hub) {  // this node's ranks first, then the other nodes'
    const int local = world - static_cast<int>(b.remote.size());
    o.devices.resize(local);
    o.devices.insert(o.devices.end(), b.remote.begin(), b.remote.end());
    o.local_ranks = local;
    o.remote = b.hub;
    o.collective_host = b.node_address;
    b.set_model_dir(model);
  }
  KRAKEN_ASSIGN_OR_RETURN(auto group, WorkerGroup::Start(o));
  std::map<int, Cell> out;
  std::mt19937 rng(5);
  for (int T : tokens) {
    std::vector<int32_t> prompt(T);
    for (auto& t : prompt) t = static_cast<int32_t>(rng() % group->limits().vocab_size);
    std::vector<int32_t> blocks((T + 15) / 16);
    std::iota(blocks.begin(), blocks.end(), 0);
    SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks, .sampling = {.temperature = 0.f}};
    KRAKEN_RETURN_IF_ERROR(group->RunStep({&s, 1}).status());  // warm-up
    const auto before = group->Stats();
    std::vector<double> times;
    for (int r = 0; r < repeats; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      KRAKEN_RETURN_IF_ERROR(group->RunStep({&s, 1}).status());
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const auto after = group->Stats();
    std::sort(times.begin(), times.end());
    Cell c;
    c.ttft = times[times.size() / 2];
    for (int r = 0; r < world; ++r) {
      const double busy = after[r].busy_s - before[r].busy_s;
      const double exposed = after[r].exposed_comm_s - before[r].exposed_comm_s;
      c.exposed_share.push_back(busy + exposed > 0 ? exposed / (busy + exposed) : 0.0);
    }
    out[T] = c;
  }
  return out;
}

std::string Shares(const std::vector<double>& v) {
  std::string s;
  for (double x : v) s += StrCat(s.empty() ? "" : "/", static_cast<int>(std::lround(100 * x)));
  return s + "%";
}

int Main(int argc, char** argv) {
  std::string models = "build/bench-models/ttft", worlds_s = "2,4", tokens_s = "128,2048";
  std::string presets_s = "none,a100-nvswitch,h100-nvlink4,pcie4-x16,ethernet-100g";
  std::string archs_s = "standard,parallel,kraken", listen, join, link_scale = "measured";
  int nodes = 1, local_workers = 2;
  BenchOptions b;
  CLI::App app{"Prefill TTFT: Kraken vs standard tensor parallelism vs parallel-block"};
  app.add_option("--device", b.device, "cpu (worker processes + Gloo) or cuda (one GPU per rank + NCCL)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--archs", archs_s, "Architectures to time (standard, parallel, kraken)");
  app.add_option("--link-scale", link_scale,
                 "measured: link time x (preset GEMM rate / this CPU's); raw: the preset's own link time")
      ->check(CLI::IsMember({"measured", "raw"}));
  app.add_option("--nodes", nodes, "Multi-node: this is the leader of this many nodes (--cluster-listen)");
  app.add_option("--cluster-listen", listen, "Multi-node leader: host:port the other nodes join");
  app.add_option("--join", join, "Multi-node: run as a follower node of the leader at host:port, then exit");
  app.add_option("--local-workers", local_workers, "Multi-node: CPU workers on each node");
  app.add_option("--node-address", b.node_address, "Multi-node: the address this node's workers bind");
  app.add_option("--models", models, "Directory with kraken/, standard/ and parallel/ model directories");
  app.add_option("--worlds", worlds_s, "World sizes");
  app.add_option("--tokens", tokens_s, "Prompt lengths");
  app.add_option("--presets", presets_s, "none (plain Gloo) and/or link-model presets");
  app.add_option("--repeats", b.repeats, "Timed prefills per cell (median reported)");
  CLI11_PARSE(app, argc, argv);
  b.raw_link = link_scale == "raw";
  const std::string& device = b.device;
  std::vector<int> worlds, tokens;
  for (const auto& w : Split(worlds_s)) worlds.push_back(std::stoi(w));
  for (const auto& t : Split(tokens_s)) tokens.push_back(std::stoi(t));
  const std::vector<std::string> archs = Split(archs_s);
#ifdef KRAKEN_HAVE_CLUSTER
  if (!join.empty()) {  // a follower node: its workers serve whatever the leader runs, until it ends
    cluster::FollowerOptions fo{.leader = join, .join_timeout = std::chrono::seconds(60)};
    fo.workers.devices.assign(local_workers, engine::Device::Cpu());
    fo.workers.threads_per_worker = 1;
    fo.workers.collective_host = b.node_address;
    return cluster::RunFollower(fo);
  }
  if (nodes > 1) {  // every world is all nodes' workers
    auto hub = cluster::Hub::Create({.listen = listen, .nodes = nodes, .ranks_per_node = local_workers});
    if (!hub.ok()) {
      std::fprintf(stderr, "ttft_bench: %s\n", std::string(hub.status().message()).c_str());
      return 1;
    }
    auto remote = (*hub)->AwaitNodes(std::chrono::seconds(60));
    if (!remote.ok()) {
      std::fprintf(stderr, "ttft_bench: %s\n", std::string(remote.status().message()).c_str());
      return 1;
    }
    b.hub = *hub;
    b.remote = *remote;
    worlds = {nodes * local_workers};
    b.set_model_dir = [h = *hub](const std::string& dir) { h->set_model_dir(dir); };
    std::printf("%d nodes x %d workers; followers joined from the cluster port %s\n", nodes, local_workers,
                listen.c_str());
  }
#else
  if (!join.empty() || nodes > 1) {
    std::fprintf(stderr, "ttft_bench: multi-node mode needs a build with the gRPC server (KRAKEN_BUILD_SERVER)\n");
    return 1;
  }
#endif

  std::printf("models (equal parameter count):\n");
  for (const auto& a : archs) {
    auto cfg = engine::LoadModelConfig(models + "/" + a);
    if (!cfg.ok()) {
      std::fprintf(stderr, "ttft_bench: %s (run bench/ttft_bench.py to make the models)\n",
                   std::string(cfg.status().message()).c_str());
      return 1;
    }
    std::printf("  %-9s %-15s L=%d width=%d heads=%d N=%d  %.2f M parameters\n", a.c_str(),
                std::string(engine::ArchitectureName(cfg->arch)).c_str(), cfg->n_layer, cfg->n_embd, cfg->n_head,
                cfg->kraken_degree, cfg->ParameterCount() / 1e6);
  }
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  std::map<int, double> gemm;  // per world size: the rate one worker sees
  for (int w : worlds) gemm[w] = MeasureGemm(std::max(1, cores / w));
  for (int w : worlds) {
    std::printf("W=%d: %d thread(s) per worker on %d cores; measured GEMM %.1f GFLOP/s per worker%s\n", w,
                std::max(1, cores / w), cores, gemm[w] / 1e9, w > cores ? " (workers share cores)" : "");
  }
  std::printf(
      "speed-up = T_standard / T_kraken - 1 (the paper's definition); exposed = share of each rank's step\n"
      "time spent waiting on a collective (rank 0/1/...)\n\n");

  for (const auto& preset : Split(presets_s)) {
    if (device == "cuda" && preset != "none") {
      std::fprintf(stderr, "ttft_bench: --device cuda measures the real interconnect; use --presets none\n");
      return 1;
    }
    if (preset != "none" && engine::FindLinkPreset(preset) == nullptr) {
      std::fprintf(stderr, "ttft_bench: unknown preset '%s'\n", preset.c_str());
      return 1;
    }
    if (preset == "none") {
      std::printf("== Gloo on loopback (no link model) ==\n");
    } else {
      const auto* p = engine::FindLinkPreset(preset);
      std::printf("== %s: %.0f us + bytes / %.1f GB/s, link time x%.0f (%.0f TFLOPS / measured) ==\n", preset.c_str(),
                  p->latency_s * 1e6, p->bandwidth_bytes_s / 1e9, p->device_gemm_flops / gemm[worlds[0]],
                  p->device_gemm_flops / 1e12);
    }
    std::printf("%3s %6s %12s %12s %12s %10s %10s   %-16s %-16s\n", "W", "T", "standard ms", "parallel ms", "kraken ms",
                "vs std", "vs par", "exposed std", "exposed kraken");
    double log_sum = 0, log_sum_par = 0;
    int cells = 0;
    for (int w : worlds) {
      std::map<std::string, std::map<int, Cell>> r;
      for (const auto& a : archs) {
        auto m = Measure(models + "/" + a, w, tokens, preset, gemm[w], b);
        if (!m.ok()) {
          std::fprintf(stderr, "ttft_bench: %s W=%d: %s\n", a.c_str(), w, std::string(m.status().message()).c_str());
          return 1;
        }
        r[a] = *m;
      }
      for (int T : tokens) {
        for (const auto& a : archs) {  // one machine-readable line per cell (bench/ttft_bench.py reads them)
          std::printf("cell preset=%s W=%d T=%d arch=%s ttft_s=%.6f\n", preset.c_str(), w, T, a.c_str(), r[a][T].ttft);
        }
        if (!r.count("standard") || !r.count("kraken")) continue;
        const bool par = r.count("parallel") > 0;
        const double st = r["standard"][T].ttft, pa = par ? r["parallel"][T].ttft : 0, kr = r["kraken"][T].ttft;
        log_sum += std::log(st / kr);
        if (par) log_sum_par += std::log(pa / kr);
        ++cells;
        std::printf("%3d %6d %12.1f %12s %12.1f %9.1f%% %10s   %-16s %-16s\n", w, T, st * 1e3,
                    par ? StrCat(std::lround(pa * 1e4) / 10.0).c_str() : "-", kr * 1e3, 100 * (st / kr - 1),
                    par ? StrCat(std::lround(1000 * (pa / kr - 1)) / 10.0, "%").c_str() : "-",
                    Shares(r["standard"][T].exposed_share).c_str(), Shares(r["kraken"][T].exposed_share).c_str());
      }
    }
    if (cells > 0) {
      std::printf("geomean Kraken speed-up: %.1f%% over standard TP", 100 * (std::exp(log_sum / cells) - 1));
      if (std::find(archs.begin(), archs.end(), "parallel") != archs.end()) {
        std::printf(", %.1f%% over parallel-block", 100 * (std::exp(log_sum_par / cells) - 1));
      }
      std::printf(" (%d cells)\n\n", cells);
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace kraken

int main(int argc, char** argv) {
  if (auto code = kraken::runtime::MaybeRunWorker(argc, argv)) return *code;
  return kraken::Main(argc, argv);
}
