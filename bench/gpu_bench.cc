// gpu_bench: single-GPU prefill and decode of one Kraken model on the CUDA backend, and the
// prefill GEMMs' achieved rate as a share of the GPU's dense BF16 peak. Built with
// KRAKEN_ENABLE_CUDA=ON; needs a GPU to run.
//
//   build-gpu/bench/gpu_bench                          # synthetic BF16 Kraken, 4 sub-layers
//   build-gpu/bench/gpu_bench --model models/kraken-kjv-4way --prefill 32,128
//
// Without --model it writes a random-weight BF16 Kraken checkpoint (--layers, --width,
// --degree, --heads; default 12 layers x 4 sub-layers of width 1024, ~460M parameters) to
// --scratch and loads it. Prints, with the figures also as one JSON line at the end:
//   - TTFT: wall time of one prompt's prefill step (embedding to last-position logits on the
//     host), median of 5 after 2 warm-ups, for each --prefill length;
//   - decode tokens/s for each --decode-batch: B sequences with a 128-token context each, then
//     --decode-steps steps of one token per sequence (logits of every sequence copied back), with
//     a KV cache of --kv-cache-dtype (auto: the weights' dtype, BF16 for the synthetic model);
//   - GEMM share: each distinct prefill GEMM shape of the model timed alone through
//     Backend::Linear (activation rounding to BF16 included), FLOP-weighted, divided by the peak
//     (--peak-tflops, or the datasheet's dense BF16 figure for the detected GPU: 989.4 TFLOP/s for
//     H100/H200 SXM, 312 for A100).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench/bench_util.h"
#include "engine/backend.h"
#include "engine/kv_cache.h"
#include "engine/model.h"

namespace kraken::engine {
namespace {

using bench::GemmFlopsPerToken;
using bench::HeadFlopsPerRow;
using bench::Median;
using bench::Now;
using bench::ParseList;

using json = nlohmann::json;

// Random BF16 values ~ U(-a, a) from a xorshift generator (fast enough for ~10^9 weights).
struct Bf16Noise {
  uint64_t s = 0x9e3779b97f4a7c15ull;
  uint16_t Next(float a) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const float u = static_cast<float>(s >> 40) / static_cast<float>(1ull << 24);  // [0, 1)
    const float f = (2.f * u - 1.f) * a;
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
};

struct Shape {
  int layers, width, degree, heads, vocab = 50304, positions = 4096;
};

// Writes config.json and model.safetensors of a BF16 Kraken with `s` (no biases, LayerNorm
// weights 1, the layout of docs/kraken.md "The authors' checkpoint").
Status WriteSyntheticKraken(const std::string& dir, const Shape& s) {
  std::filesystem::create_directories(dir);
  const int64_t d = s.width, f = 2 * s.width, N = s.degree;
  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors = {{"transformer.wte.weight", {s.vocab, d}},
                                                                       {"transformer.wpe.weight", {s.positions, d}},
                                                                       {"transformer.ln_f.weight", {d}},
                                                                       {"transformer.conjunction.weight", {d, N * d}}};
  for (int i = 0; i < N; ++i) {
    for (int l = 0; l < s.layers; ++l) {
      const std::string p = "transformer.h." + std::to_string(i) + "." + std::to_string(l) + ".";
      tensors.push_back({p + "ln_1.weight", {d}});
      tensors.push_back({p + "ln_2.weight", {d}});
      tensors.push_back({p + "attn.c_attn.weight", {3 * d, d}});
      tensors.push_back({p + "attn.c_proj.weight", {d, d}});
      tensors.push_back({p + "mlp.c_fc.weight", {f, d}});
      tensors.push_back({p + "mlp.c_proj.weight", {d, f}});
    }
  }
  json header = json::object();
  int64_t offset = 0;
  for (const auto& [name, shape] : tensors) {
    int64_t n = 1;
    for (int64_t e : shape) n *= e;
    header[name] = {{"dtype", "BF16"}, {"shape", shape}, {"data_offsets", {offset, offset + 2 * n}}};
    offset += 2 * n;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::ofstream out(dir + "/model.safetensors", std::ios::binary);
  const uint64_t hl = h.size();
  out.write(reinterpret_cast<const char*>(&hl), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  Bf16Noise noise;
  std::vector<uint16_t> buf;
  for (const auto& [name, shape] : tensors) {
    int64_t n = 1;
    for (int64_t e : shape) n *= e;
    buf.resize(n);
    const bool norm = name.find("ln_") != std::string::npos;
    const float a = 0.02f * 1.7320508f / (name.find("c_proj") != std::string::npos ? 2.f : 1.f);
    for (int64_t i = 0; i < n; ++i) buf[i] = norm ? 0x3f80 /* 1.0 */ : noise.Next(a);
    out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(2 * n));
  }
  if (!out) return Internal("cannot write ", dir, "/model.safetensors");
  json config = {{"model_type", "kraken"},         {"n_layer", s.layers},        {"n_embd", s.width},
                 {"n_head_per_sublayer", s.heads}, {"kraken_degree", s.degree},  {"ffn_expansion", 2},
                 {"vocab_size", s.vocab},          {"n_positions", s.positions}, {"bias", false},
                 {"layer_norm_epsilon", 1e-5},     {"torch_dtype", "bfloat16"}};
  std::ofstream(dir + "/config.json") << config.dump(2);
  return absl::OkStatus();
}

// Datasheet dense BF16 tensor-core peak (TFLOP/s) by compute capability and name.
double DatasheetPeak(const cudaDeviceProp& p) {
  const std::string name = p.name;
  if (p.major == 9) return name.find("PCIe") != std::string::npos ? 756.0 : 989.4;  // H100/H200 SXM
  if (p.major == 8 && p.minor == 0) return 312.0;                                   // A100
  if (p.major == 10) return 2250.0;                                                 // B200
  return 0.0;
}

int Main(int argc, char** argv) {
  CLI::App app{"Single-GPU prefill/decode benchmark of the CUDA backend"};
  std::string model_dir, scratch = "/tmp/kraken-gpu-bench-model", device = "cuda:0";
  std::string prefill_s = "128,512,2048", batch_s = "1,8,32";
  int decode_steps = 64;
  std::string kv_dtype_s = "auto";
  double peak = 0;
  Shape shape{12, 1024, 4, 8};
  app.add_option("--model", model_dir, "Model directory (default: a synthetic BF16 Kraken)");
  app.add_option("--scratch", scratch, "Where the synthetic model is written");
  app.add_option("--device", device, "CUDA device");
  app.add_option("--prefill", prefill_s, "Prompt lengths");
  app.add_option("--decode-batch", batch_s, "Decode batch sizes");
  app.add_option("--decode-steps", decode_steps, "Decode steps per batch size")->check(CLI::Range(1, 4096));
  app.add_option("--kv-cache-dtype", kv_dtype_s, "KV-cache element type: auto (the weights'), f32, bf16, f16")
      ->check(CLI::IsMember(kKvCacheDTypeNames));
  app.add_option("--peak-tflops", peak, "Dense BF16 peak of this GPU (default: datasheet by model)");
  app.add_option("--layers", shape.layers, "Synthetic model: layers")->check(CLI::Range(1, 256));
  app.add_option("--width", shape.width, "Synthetic model: sub-layer width d")->check(CLI::Range(8, 16384));
  app.add_option("--degree", shape.degree, "Synthetic model: sub-layers N")->check(CLI::Range(1, 64));
  app.add_option("--heads", shape.heads, "Synthetic model: heads per sub-layer")->check(CLI::Range(1, 256));
  CLI11_PARSE(app, argc, argv);
  const std::vector<int> prompts = ParseList(prefill_s), batches = ParseList(batch_s);

  if (model_dir.empty()) {
    model_dir = scratch;
    const double t0 = Now();
    if (Status s = WriteSyntheticKraken(model_dir, shape); !s.ok()) {
      std::fprintf(stderr, "gpu_bench: %s\n", std::string(s.message()).c_str());
      return 1;
    }
    std::printf("synthetic model written to %s in %.1f s\n", model_dir.c_str(), Now() - t0);
  }
  auto parsed = Device::Parse(device);
  if (!parsed.ok()) {
    std::fprintf(stderr, "gpu_bench: %s\n", std::string(parsed.status().message()).c_str());
    return 1;
  }
  auto backend = CreateBackend({.device = *parsed});
  if (!backend.ok()) {
    std::fprintf(stderr, "gpu_bench: %s\n", std::string(backend.status().message()).c_str());
    return 1;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  if (peak <= 0) peak = DatasheetPeak(prop);
  const int max_prompt = *std::max_element(prompts.begin(), prompts.end());
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  const int context = 128;
  auto model = LoadModel(
      model_dir, backend->get(),
      {.max_tokens = std::max(max_prompt, max_batch * context), .max_seqs = max_batch, .max_logit_rows = max_batch});
  if (!model.ok()) {
    std::fprintf(stderr, "gpu_bench: %s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  Model& m = **model;
  const ModelConfig& c = m.config();
  const int bs = 16;
  const int per_seq = (std::max(max_prompt, context + decode_steps) + bs - 1) / bs;
  auto resolved = KvCacheDType(kv_dtype_s, model_dir);
  if (!resolved.ok()) {
    std::fprintf(stderr, "gpu_bench: %s\n", std::string(resolved.status().message()).c_str());
    return 1;
  }
  const DType kv_dtype = *resolved;
  auto kv = KvCache::Create(**backend, m.kv_layout(),
                            {.num_blocks = per_seq * max_batch, .block_size = bs, .dtype = kv_dtype});
  if (!kv.ok()) {
    std::fprintf(stderr, "gpu_bench: %s\n", std::string(kv.status().message()).c_str());
    return 1;
  }
  LocalCommunicator comm;
  std::printf("device: %s (sm_%d%d), dense BF16 peak used: %.1f TFLOP/s\n", prop.name, prop.major, prop.minor, peak);
  std::printf("model: %s, %d layers x %d sub-layers, width %d, %d heads, vocab %d, weights %.2f GB\n",
              model_dir.c_str(), c.n_layer, c.kraken_degree, c.n_embd, c.n_head, c.vocab_size, m.weight_bytes() / 1e9);
  std::printf("KV cache: %s\n", std::string(DTypeName(kv_dtype)).c_str());
  json result = {{"device", prop.name},
                 {"peak_tflops", peak},
                 {"model", model_dir},
                 {"kv_cache_dtype", std::string(DTypeName(kv_dtype))}};

  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, c.vocab_size - 1);
  auto tables = [&](int seq) {
    std::vector<int32_t> t(per_seq);
    for (int j = 0; j < per_seq; ++j) t[j] = seq * per_seq + j;
    return t;
  };

  // TTFT per prompt length.
  const std::vector<int32_t> table0 = tables(0);
  for (int T : prompts) {
    std::vector<int32_t> prompt(T);
    for (auto& t : prompt) t = tok(rng);
    std::vector<double> times;
    for (int rep = 0; rep < 7; ++rep) {
      SequenceInput s{.tokens = prompt, .start_pos = 0, .block_table = table0};
      const double t0 = Now();
      auto r = m.Forward({.seqs = {&s, 1}}, *kv, comm);
      const double t1 = Now();
      if (!r.ok()) {
        std::fprintf(stderr, "gpu_bench: prefill: %s\n", std::string(r.status().message()).c_str());
        return 1;
      }
      if (rep >= 2) times.push_back(t1 - t0);
    }
    const double ttft = Median(times);
    const double flops = T * GemmFlopsPerToken(c) + HeadFlopsPerRow(c);
    std::printf("prefill T=%5d: TTFT %8.2f ms  (%.1f TFLOP/s of GEMM work over the whole step, %.1f%% of peak)\n", T,
                ttft * 1e3, flops / ttft / 1e12, peak > 0 ? 100 * flops / ttft / 1e12 / peak : 0.0);
    result["ttft_ms"][std::to_string(T)] = ttft * 1e3;
  }

  // Decode throughput.
  for (int B : batches) {
    std::vector<std::vector<int32_t>> tbl(B), ctx(B);
    std::vector<SequenceInput> seqs(B);
    for (int b = 0; b < B; ++b) {
      tbl[b] = tables(b);
      ctx[b].resize(context);
      for (auto& t : ctx[b]) t = tok(rng);
      seqs[b] = {.tokens = ctx[b], .start_pos = 0, .block_table = tbl[b]};
    }
    if (auto r = m.Forward({.seqs = seqs}, *kv, comm); !r.ok()) {
      std::fprintf(stderr, "gpu_bench: context: %s\n", std::string(r.status().message()).c_str());
      return 1;
    }
    std::vector<int32_t> next(B);
    double t0 = 0;
    const int warm = 4;
    for (int step = 0; step < decode_steps + warm; ++step) {
      if (step == warm) t0 = Now();
      for (int b = 0; b < B; ++b) {
        next[b] = tok(rng);
        seqs[b] = {.tokens = {&next[b], 1}, .start_pos = context + step, .block_table = tbl[b]};
      }
      if (auto r = m.Forward({.seqs = seqs}, *kv, comm); !r.ok()) {
        std::fprintf(stderr, "gpu_bench: decode: %s\n", std::string(r.status().message()).c_str());
        return 1;
      }
    }
    const double dt = Now() - t0;
    const double tps = static_cast<double>(B) * decode_steps / dt;
    std::printf("decode batch %3d: %9.1f tokens/s  (%.2f ms per step)\n", B, tps, dt / decode_steps * 1e3);
    result["decode_tokens_per_s"][std::to_string(B)] = tps;
  }

  // The prefill GEMMs alone, at the largest prompt length, through Backend::Linear.
  {
    const int T = max_prompt;
    const int d = c.n_embd, f = c.ffn_hidden;
    struct G {
      const char* name;
      int out, in;
      double count;  // how many of this shape one prefill step runs
    };
    const double NL = static_cast<double>(c.kraken_degree) * c.n_layer;
    const std::vector<G> gemms = {
        {"qkv", 3 * d, d, NL}, {"attn_proj", d, d, NL}, {"fc", f, d, NL}, {"fc_proj", d, f, NL}};
    Bf16Noise noise;
    double total_flops = 0, total_time = 0;
    for (const G& g : gemms) {
      std::vector<uint16_t> w(static_cast<size_t>(g.out) * g.in);
      for (auto& x : w) x = noise.Next(0.03f);
      TensorInfo t{.name = g.name,
                   .dtype = DType::kBF16,
                   .shape = {g.out, g.in},
                   .data = reinterpret_cast<const uint8_t*>(w.data()),
                   .nbytes = w.size() * 2};
      auto lw = (*backend)->PrepareLinear({.tensor = &t});
      auto x = (*backend)->Allocate(static_cast<int64_t>(T) * g.in);
      auto y = (*backend)->Allocate(static_cast<int64_t>(T) * g.out);
      if (!lw.ok() || !x.ok() || !y.ok()) {
        std::fprintf(stderr, "gpu_bench: GEMM setup failed\n");
        return 1;
      }
      const Mat xm(x->data(), T, g.in), ym(y->data(), T, g.out);
      for (int i = 0; i < 3; ++i) (*backend)->Linear(xm, **lw, nullptr, ym, false);
      (void)(*backend)->Synchronize();
      const int reps = 20;
      const double t0 = Now();
      for (int i = 0; i < reps; ++i) (*backend)->Linear(xm, **lw, nullptr, ym, false);
      (void)(*backend)->Synchronize();
      const double each = (Now() - t0) / reps;
      const double flops = 2.0 * T * g.out * g.in;
      std::printf("GEMM %-9s [%d x %d] x [%d x %d]^T: %7.3f ms, %6.1f TFLOP/s (%.1f%% of peak)\n", g.name, T, g.in,
                  g.out, g.in, each * 1e3, flops / each / 1e12, peak > 0 ? 100 * flops / each / 1e12 / peak : 0.0);
      total_flops += flops * g.count;
      total_time += each * g.count;
    }
    const double share = peak > 0 ? total_flops / total_time / 1e12 / peak : 0.0;
    std::printf("prefill GEMMs at T=%d: %.1f TFLOP/s, %.1f%% of the BF16 peak\n", T, total_flops / total_time / 1e12,
                100 * share);
    result["prefill_gemm_tflops"] = total_flops / total_time / 1e12;
    result["prefill_gemm_share_of_peak"] = share;
  }
  std::printf("%s\n", result.dump().c_str());
  return 0;
}

}  // namespace
}  // namespace kraken::engine

int main(int argc, char** argv) {
  return kraken::engine::Main(argc, argv);
}
