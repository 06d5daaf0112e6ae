// gemm_bench: our packed GEMM against oneDNN's sgemm on the same cores, at the prefill and decode
// shapes of a 124M (GPT-2 small, d = 768) and a 1.3B (d = 2048) model, for F32, BF16 and F16
// weights. The two run interleaved, round by round, so that a change in machine load hits both;
// each cell is the median over rounds. Prints one JSON object; docs/benchmarks.md reads it.
//
//   build/bench/gemm_bench --threads 2 --rows 128,512 --rounds 5
//
// Y[M, N] = X[M, K] · W[N, K]^T: oneDNN gets W in the same [N, K] layout (transb = 'T') and packs
// it inside every call, while ours is packed once at load time as the engine does; the decode
// rows (M = 1, 8, 32) also report the weight bytes streamed per second against the machine's read
// bandwidth. BF16 cells also time oneDNN's BF16 matmul primitive (weights reordered once into its
// own layout, the F32 activations rounded to BF16 inside every call, F32 output): on a CPU with
// AVX512-BF16 or AMX-BF16 that is the fastest a BF16 GEMM gets there (ONEDNN_VERBOSE=1 names the
// kernel), and "ratio_bf16_matmul" is ours against it.
#include <dnnl.h>
#include <omp.h>

#include <dnnl.hpp>

#include <cstdio>
#include <functional>
#include <iostream>
#include <numeric>
#include <optional>
#include <random>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"

#include "bench/bench_util.h"
#include "engine/cpu/gemm.h"

namespace kraken::engine {
namespace {

using bench::Median;
using bench::Now;
using json = nlohmann::json;

struct Shape {
  const char* model;
  const char* layer;
  int n, k;  // W [n, k]
};

// The four linear layers of a block (QKV, attention output, FFN up, FFN down) and the LM head,
// which alone is larger than the last-level cache (a decode step's weight stream).
constexpr Shape kShapes[] = {
    {"124m", "qkv", 2304, 768},       {"124m", "attn_out", 768, 768},  {"124m", "ffn_up", 3072, 768},
    {"124m", "ffn_down", 768, 3072},  {"124m", "lm_head", 50257, 768}, {"1.3b", "qkv", 6144, 2048},
    {"1.3b", "attn_out", 2048, 2048}, {"1.3b", "ffn_up", 8192, 2048},  {"1.3b", "ffn_down", 2048, 8192},
    {"1.3b", "lm_head", 50257, 2048},
};

uint16_t ToHalfBits(float f, DType t) {
  if (t == DType::kBF16) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
  return F32ToF16(f);
}

// oneDNN's BF16 matmul for Y[M, N] = bf16(X[M, K]) · W[N, K]^T with F32 output: W (BF16 bits,
// [N, K]) reordered once into the layout the primitive picks, X rounded to BF16 in every call.
class OnednnBf16Matmul {
 public:
  OnednnBf16Matmul(const uint16_t* w, int m, int n, int k, const float* x, float* y)
      : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_) {
    using dt = dnnl::memory::data_type;
    using tag = dnnl::memory::format_tag;
    const dnnl::memory::desc src({m, k}, dt::bf16, tag::ab), weights_any({k, n}, dt::bf16, tag::any),
        dst({m, n}, dt::f32, tag::ab);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, weights_any, dst), engine_);
    matmul_ = dnnl::matmul(pd);
    dnnl::memory user_w({{k, n}, dt::bf16, tag::ba}, engine_, const_cast<uint16_t*>(w));
    weights_ = dnnl::memory(pd.weights_desc(), engine_);
    dnnl::reorder(user_w, weights_).execute(stream_, user_w, weights_);
    x_f32_ = dnnl::memory({{m, k}, dt::f32, tag::ab}, engine_, const_cast<float*>(x));
    x_bf16_ = dnnl::memory(src, engine_);
    y_ = dnnl::memory(dst, engine_, y);
    round_ = dnnl::reorder(x_f32_, x_bf16_);
    stream_.wait();
  }
  void operator()() {
    round_.execute(stream_, x_f32_, x_bf16_);
    matmul_.execute(stream_, {{DNNL_ARG_SRC, x_bf16_}, {DNNL_ARG_WEIGHTS, weights_}, {DNNL_ARG_DST, y_}});
    stream_.wait();
  }

 private:
  dnnl::engine engine_;
  dnnl::stream stream_;
  dnnl::matmul matmul_;
  dnnl::reorder round_;
  dnnl::memory weights_, x_f32_, x_bf16_, y_;
};

// Median seconds of `rounds` calls of each of `fns`, interleaved call by call.
std::vector<double> Interleaved(const std::vector<std::function<void()>>& fns, int rounds) {
  for (const auto& f : fns) f();  // warm-up: packing space, page faults, oneDNN's JIT
  std::vector<std::vector<double>> t(fns.size());
  for (int r = 0; r < rounds; ++r) {
    for (size_t i = 0; i < fns.size(); ++i) {
      const double t0 = Now();
      fns[i]();
      t[i].push_back(Now() - t0);
    }
  }
  std::vector<double> med;
  for (auto& v : t) med.push_back(Median(v));
  return med;
}

struct Args {
  int threads = 0;
  std::string rows = "128,512";
  std::string decode_rows = "1,8,32";
  std::string dtypes = "f32,bf16,f16";
  std::string models = "124m,1.3b";
  int rounds = 5;
};

int Run(const Args& a) {
  if (a.threads > 0) omp_set_num_threads(a.threads);
  const int threads = omp_get_max_threads();
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1, 1);
  json out;
  out["threads"] = threads;
  std::vector<DType> dtypes;
  for (absl::string_view name : absl::StrSplit(a.dtypes, ",", absl::SkipEmpty())) {
    const std::optional<DType> t = ParseDType(absl::AsciiStrToUpper(name));
    if (!t.has_value() || !IsComputeFloat(*t)) {
      std::fprintf(stderr, "gemm_bench: --dtypes: '%s' is not f32, bf16 or f16\n", std::string(name).c_str());
      return 2;
    }
    dtypes.push_back(*t);
  }
  std::vector<int> rows = bench::ParseList(a.rows), decode_rows = bench::ParseList(a.decode_rows);
  json cells = json::array();
  for (const Shape& s : kShapes) {
    if (a.models.find(s.model) == std::string::npos) continue;
    std::vector<float> w(static_cast<size_t>(s.n) * s.k);
    for (float& x : w) x = u(rng);
    for (DType dt : dtypes) {
      std::vector<uint8_t> stored(w.size() * DTypeSize(dt));
      for (size_t i = 0; i < w.size(); ++i) {
        if (dt == DType::kF32) {
          std::memcpy(&stored[4 * i], &w[i], 4);
        } else {
          const uint16_t h = ToHalfBits(w[i], dt);
          std::memcpy(&stored[2 * i], &h, 2);
        }
      }
      cpu::MatrixSource src{.data = stored.data(), .dtype = dt, .out_stride = s.k, .in_stride = 1, .in = s.k};
      src.rows.resize(s.n);
      std::iota(src.rows.begin(), src.rows.end(), 0);
      auto packed = cpu::PackedMatrix::Pack(src);
      if (!packed.ok()) return 1;
      std::vector<int> all = rows;
      all.insert(all.end(), decode_rows.begin(), decode_rows.end());
      for (int m : all) {
        std::vector<float> x(static_cast<size_t>(m) * s.k), y(static_cast<size_t>(m) * s.n),
            y2(static_cast<size_t>(m) * s.n);
        for (float& v : x) v = u(rng);
        cpu::GemmScratch scratch;
        auto ours = [&] { cpu::Gemm(x.data(), m, s.k, *packed, nullptr, y.data(), s.n, false, &scratch); };
        auto theirs = [&] {
          dnnl_sgemm('N', 'T', m, s.n, s.k, 1.f, x.data(), s.k, w.data(), s.k, 0.f, y2.data(), s.n);
        };
        const int rounds = m <= 32 ? a.rounds * 4 : a.rounds;
        std::vector<std::function<void()>> contenders = {ours, theirs};
        std::optional<OnednnBf16Matmul> bf16_matmul;
        if (dt == DType::kBF16) {
          // oneDNN has no BF16 matmul below AVX512-BF16 emulation (e.g. under ONEDNN_MAX_CPU_ISA=AVX2):
          // then the cell has no such column.
          try {
            bf16_matmul.emplace(reinterpret_cast<const uint16_t*>(stored.data()), m, s.n, s.k, x.data(), y2.data());
            contenders.push_back([&] { (*bf16_matmul)(); });
          } catch (const dnnl::error& e) {
            std::fprintf(stderr, "(oneDNN's BF16 matmul: %s) ", e.what());
          }
        }
        const std::vector<double> t = Interleaved(contenders, rounds);
        const double flops = 2.0 * m * s.n * s.k;
        json c = {{"model", s.model},
                  {"layer", s.layer},
                  {"m", m},
                  {"n", s.n},
                  {"k", s.k},
                  {"dtype", std::string(DTypeName(dt))},
                  {"ours_gflops", flops / t[0] / 1e9},
                  {"onednn_sgemm_gflops", flops / t[1] / 1e9},
                  {"ratio", t[1] / t[0]}};
        if (m <= 32) c["ours_weight_gbps"] = static_cast<double>(packed->bytes()) / t[0] / 1e9;
        if (t.size() > 2) {
          c["onednn_bf16_matmul_gflops"] = flops / t[2] / 1e9;
          c["ratio_bf16_matmul"] = t[2] / t[0];
        }
        cells.push_back(c);
        std::fprintf(stderr, "%-5s %-8s %-4s M=%-4d ours %6.1f GFLOP/s  oneDNN %6.1f  ratio %.2f", s.model, s.layer,
                     std::string(DTypeName(dt)).c_str(), m, flops / t[0] / 1e9, flops / t[1] / 1e9, t[1] / t[0]);
        if (t.size() > 2)
          std::fprintf(stderr, "  oneDNN bf16 matmul %6.1f  ratio %.2f", flops / t[2] / 1e9, t[2] / t[0]);
        std::fprintf(stderr, "\n");
      }
    }
  }
  out["cells"] = cells;
  out["memory_read_gbps"] = bench::MemoryReadGBps();
  std::cout << out.dump() << "\n";
  return 0;
}

}  // namespace
}  // namespace kraken::engine

int main(int argc, char** argv) {
  kraken::engine::Args a;
  CLI::App app{"Our packed GEMM against oneDNN sgemm at model shapes"};
  app.add_option("--threads", a.threads, "CPU threads (0 = all cores)");
  app.add_option("--rows", a.rows, "Prefill rows M, comma-separated");
  app.add_option("--decode-rows", a.decode_rows, "Decode rows M (batch sizes), comma-separated");
  app.add_option("--dtypes", a.dtypes, "Weight dtypes, comma-separated (f32, bf16, f16)");
  app.add_option("--models", a.models, "Model shapes, comma-separated (124m, 1.3b)");
  app.add_option("--rounds", a.rounds, "Interleaved rounds per prefill cell (decode cells take 4x)");
  CLI11_PARSE(app, argc, argv);
  return kraken::engine::Run(a);
}
