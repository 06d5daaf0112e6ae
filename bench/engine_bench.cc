// engine_bench: prefill latency and decode throughput of one model directory on the CPU engine,
// plus the machine's GEMM rate measured in the same run (oneDNN sgemm, the fastest library GEMM
// on these machines, and our packed GEMM on the same shape). Prints one JSON object; the driver
// bench/engine_bench.py puts it beside PyTorch eager on the same weights.
//
// Decode runs once per KV-cache dtype asked for (--kv-dtypes f32,bf16), each with its share of
// the memory-bandwidth bound: the bytes a step must read (weights, plus every sequence's cached
// K and V) over the step time, against the read bandwidth measured in the same run.
//
//   build/bench/engine_bench --model DIR --prefill 128,512,2048 --decode-batch 1,8,32 --kv-dtypes f32,bf16
#include <dnnl.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <numeric>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench/bench_util.h"
#include "engine/backend.h"
#include "engine/cpu/gemm.h"
#include "engine/model.h"
#include "engine/sampler.h"

namespace kraken::engine {
namespace {

using bench::GemmFlopsPerToken;
using bench::HeadFlopsPerRow;
using bench::Median;
using bench::Now;
using bench::ParseList;

using json = nlohmann::json;

// Causal attention FLOPs of a T-token prefill: QK^T and PV, 2 flops per multiply-add.
double AttentionFlops(const ModelConfig& c, double T) {
  const double heads = static_cast<double>(c.n_head) * c.kraken_degree * c.n_layer;
  return heads * 2.0 * 2.0 * (T * (T + 1) / 2.0) * c.head_dim();
}

struct Measure {
  double gflops;
  double seconds;
};

Measure OneDnnSgemm(int m, int n, int k, int threads) {
  omp_set_num_threads(threads);
  std::vector<float> a(static_cast<size_t>(m) * k), b(static_cast<size_t>(k) * n), c(static_cast<size_t>(m) * n);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1, 1);
  for (float& x : a) x = u(rng);
  for (float& x : b) x = u(rng);
  auto run = [&] { dnnl_sgemm('N', 'N', m, n, k, 1.f, a.data(), k, b.data(), n, 0.f, c.data(), n); };
  run();
  std::vector<double> t;
  for (int i = 0; i < 7; ++i) {
    const double t0 = Now();
    run();
    t.push_back(Now() - t0);
  }
  const double s = Median(t);
  return {2.0 * m * n * k / s / 1e9, s};
}

Measure OurGemm(int m, int n, int k, int threads) {
  omp_set_num_threads(threads);
  std::vector<float> a(static_cast<size_t>(m) * k), w(static_cast<size_t>(n) * k), c(static_cast<size_t>(m) * n);
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u(-1, 1);
  for (float& x : a) x = u(rng);
  for (float& x : w) x = u(rng);
  cpu::MatrixSource src{.data = reinterpret_cast<const uint8_t*>(w.data()),
                        .dtype = DType::kF32,
                        .out_stride = k,
                        .in_stride = 1,
                        .in = k};
  src.rows.resize(n);
  std::iota(src.rows.begin(), src.rows.end(), 0);
  auto packed = cpu::PackedMatrix::Pack(src);
  cpu::GemmScratch scratch;
  auto run = [&] { cpu::Gemm(a.data(), m, k, *packed, nullptr, c.data(), n, false, &scratch); };
  run();
  std::vector<double> t;
  for (int i = 0; i < 7; ++i) {
    const double t0 = Now();
    run();
    t.push_back(Now() - t0);
  }
  const double s = Median(t);
  return {2.0 * m * n * k / s / 1e9, s};
}

struct Args {
  std::string model;
  std::string prefill = "128,512,2048";
  std::string batches = "1,8,32";
  int context = 128;
  int decode_steps = 16;
  int repeats = 3;
  int threads = 0;
  std::string kv_dtypes = "auto";  // the weights' dtype, as the server does
};

Status Run(const Args& a) {
  const int threads = a.threads > 0 ? a.threads : omp_get_num_procs();
  const std::vector<int> prefill = ParseList(a.prefill), batches = ParseList(a.batches);
  const int max_b = *std::max_element(batches.begin(), batches.end());
  const int max_t = std::max(*std::max_element(prefill.begin(), prefill.end()), max_b * a.context);
  KRAKEN_ASSIGN_OR_RETURN(auto backend, CreateBackend({.device = Device::Cpu(), .threads = threads}));
  const double t_load = Now();
  KRAKEN_ASSIGN_OR_RETURN(
      auto model, LoadModel(a.model, backend.get(), {.max_tokens = max_t, .max_seqs = max_b, .max_logit_rows = max_b}));
  const ModelConfig& cfg = model->config();
  json out;
  out["model"] = a.model;
  out["architecture"] = std::string(ArchitectureName(cfg.arch));
  out["parameters"] = cfg.ParameterCount();
  out["threads"] = threads;
  out["load_seconds"] = Now() - t_load;
  out["weight_bytes"] = model->weight_bytes();
  out["kv_cache_bytes"] = 0;

  const int bs = 16;
  const int max_prefill = *std::max_element(prefill.begin(), prefill.end());
  const int blocks_per_seq = (std::max(max_prefill, a.context + a.decode_steps) + bs - 1) / bs;
  std::vector<DType> kv_dtypes;
  std::istringstream names(a.kv_dtypes);
  for (std::string name; std::getline(names, name, ',');) {
    KRAKEN_ASSIGN_OR_RETURN(DType t, KvCacheDType(name, a.model));
    kv_dtypes.push_back(t);
  }
  // Prefill runs one sequence: its cache holds one sequence's blocks (decode makes its own).
  KRAKEN_ASSIGN_OR_RETURN(
      KvCache kv, KvCache::Create(*backend, model->kv_layout(), {.num_blocks = blocks_per_seq, .block_size = bs}));
  out["kv_cache_bytes"] = kv.bytes();
  LocalCommunicator comm;
  std::mt19937 rng(3);
  auto random_tokens = [&](int n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng() % cfg.vocab_size);
    return t;
  };

  // Prefill: one sequence of T tokens in one step; logits of the last position.
  json pre = json::array();
  for (int T : prefill) {
    if (T > cfg.n_positions) continue;
    const std::vector<int32_t> tokens = random_tokens(T);
    std::vector<int32_t> table(blocks_per_seq);
    std::iota(table.begin(), table.end(), 0);
    SequenceInput s{.tokens = tokens, .start_pos = 0, .block_table = table};
    std::vector<double> times;
    for (int r = 0; r <= a.repeats; ++r) {  // first run warms up
      const double t0 = Now();
      KRAKEN_ASSIGN_OR_RETURN(ForwardResult res, model->Forward({.seqs = {&s, 1}}, kv, comm));
      (void)res;
      if (r > 0) times.push_back(Now() - t0);
    }
    const double sec = Median(times);
    const double gemm = GemmFlopsPerToken(cfg) * T + HeadFlopsPerRow(cfg);
    const double attn = AttentionFlops(cfg, T);
    pre.push_back({{"tokens", T},
                   {"seconds", sec},
                   {"gflops_total", (gemm + attn) / sec / 1e9},
                   {"gemm_gflop", gemm / 1e9},
                   {"attention_gflop", attn / 1e9}});
  }
  out["prefill"] = pre;

  // Decode: B sequences with `context` tokens of history each, one new token per sequence per
  // step, greedy (argmax) sampling included; once per KV dtype.
  json dec = json::array();
  Sampler sampler(cfg.vocab_size);
  const KvLayout kl = model->kv_layout();
  for (DType kv_dtype : kv_dtypes) {
    KRAKEN_ASSIGN_OR_RETURN(
        KvCache kvd,
        KvCache::Create(*backend, kl, {.num_blocks = blocks_per_seq * max_b, .block_size = bs, .dtype = kv_dtype}));
    for (int B : batches) {
      std::vector<std::vector<int32_t>> tables(B), history(B);
      std::vector<SequenceInput> seqs(B);
      for (int b = 0; b < B; ++b) {
        tables[b].resize(blocks_per_seq);
        std::iota(tables[b].begin(), tables[b].end(), b * blocks_per_seq);
        history[b] = random_tokens(a.context);
        seqs[b] = {.tokens = history[b], .start_pos = 0, .block_table = tables[b]};
      }
      KRAKEN_ASSIGN_OR_RETURN(ForwardResult r, model->Forward({.seqs = seqs}, kvd, comm));
      std::vector<int32_t> next(B);
      auto sample_all = [&](const ForwardResult& res) -> Status {
        for (int b = 0; b < B; ++b) {
          KRAKEN_ASSIGN_OR_RETURN(SampledToken t, sampler.Sample(res.logits + static_cast<int64_t>(b) * res.vocab,
                                                                 {.temperature = 0.f}, {}));
          next[b] = t.token;
        }
        return absl::OkStatus();
      };
      KRAKEN_RETURN_IF_ERROR(sample_all(r));
      std::vector<double> step_times;
      for (int step = 0; step < a.decode_steps; ++step) {
        for (int b = 0; b < B; ++b) {
          seqs[b] = {.tokens = {&next[b], 1}, .start_pos = a.context + step, .block_table = tables[b]};
        }
        const double t0 = Now();
        KRAKEN_ASSIGN_OR_RETURN(r, model->Forward({.seqs = seqs}, kvd, comm));
        KRAKEN_RETURN_IF_ERROR(sample_all(r));
        step_times.push_back(Now() - t0);
      }
      const double sec = Median(step_times);
      // Bytes a step cannot avoid reading: every weight once, and each sequence's K and V at the
      // middle of the timed steps' history.
      const double kv_read = static_cast<double>(B) * (a.context + a.decode_steps / 2.0) *
                             static_cast<double>(KvCache::BytesPerBlock(kl, 1, kv_dtype));
      const double step_bytes = static_cast<double>(model->weight_bytes()) + kv_read;
      dec.push_back({{"batch", B},
                     {"context", a.context},
                     {"kv_dtype", std::string(DTypeName(kv_dtype))},
                     {"step_seconds", sec},
                     {"tokens_per_second", B / sec},
                     {"step_bytes", step_bytes},
                     {"read_gbps", step_bytes / sec / 1e9}});
    }
  }
  out["decode"] = dec;

  const Measure lib = OneDnnSgemm(2048, 1024, 1024, threads);
  const Measure ours = OurGemm(2048, 1024, 1024, threads);
  out["gemm_2048x1024x1024"] = {{"onednn_sgemm_gflops", lib.gflops}, {"kraken_packed_gflops", ours.gflops}};
  omp_set_num_threads(threads);
  const double bandwidth = bench::MemoryReadGBps();
  out["memory_read_gbps"] = bandwidth;
  for (json& d : out["decode"]) d["bandwidth_share"] = d["read_gbps"].get<double>() / bandwidth;
  std::cout << out.dump() << "\n";
  return absl::OkStatus();
}

}  // namespace
}  // namespace kraken::engine

int main(int argc, char** argv) {
  kraken::engine::Args a;
  CLI::App app{"Prefill latency and decode throughput of the CPU engine"};
  app.add_option("--model", a.model, "Model directory")->required();
  app.add_option("--prefill", a.prefill, "Prompt lengths to time, comma-separated");
  app.add_option("--decode-batch", a.batches, "Decode batch sizes, comma-separated");
  app.add_option("--context", a.context, "History tokens per sequence before decoding");
  app.add_option("--decode-steps", a.decode_steps, "Decode steps timed per batch size");
  app.add_option("--repeats", a.repeats, "Timed repeats per prefill length (median reported)");
  app.add_option("--threads", a.threads, "CPU threads (0 = all cores)");
  app.add_option("--kv-dtypes", a.kv_dtypes, "KV-cache dtypes to decode with, comma-separated (auto, f32, bf16, f16)");
  CLI11_PARSE(app, argc, argv);
  const kraken::Status s = kraken::engine::Run(a);
  if (!s.ok()) {
    std::fprintf(stderr, "engine_bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
