// Small helpers the benchmark programs share: wall-clock time, list flags, medians, and the GEMM
// FLOP counts of a model step (the numerator of every "share of peak" figure).
#pragma once

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "engine/model_config.h"

namespace kraken::bench {

/// Seconds on the steady clock.
inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// "128,512,2048" -> {128, 512, 2048} (empty items skipped; std::stoi throws on non-numbers).
inline std::vector<int> ParseList(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) v.push_back(std::stoi(item));
  }
  return v;
}

/// The upper median of a non-empty sample.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// GEMM FLOPs per token through the layers (QKV, attention output, FFN of every sub-layer; N = 1
/// for GPT-2 and parallel-block).
inline double GemmFlopsPerToken(const engine::ModelConfig& c) {
  const double d = c.n_embd, f = c.ffn_hidden, N = c.kraken_degree, L = c.n_layer;
  return 2 * (3 * d * d + d * d + 2 * d * f) * N * L;
}

/// GEMM FLOPs per row that needs logits: the conjunction (Kraken) and the LM head.
inline double HeadFlopsPerRow(const engine::ModelConfig& c) {
  const double d = c.n_embd, N = c.kraken_degree;
  return 2 * d * c.vocab_size + (c.arch == engine::Architecture::kKraken ? 2 * d * N * d : 0.0);
}

/// Read bandwidth of main memory in GB/s: the OpenMP team summing a 1 GiB buffer of 64-bit
/// integers, best of 5. Integer addition is associative, so the compiler vectorizes the sum and
/// the loop is bound by memory, not by an add chain (a float sum in order would measure the
/// adder's latency).
inline double MemoryReadGBps() {
  const size_t n = (1ull << 30) / sizeof(uint64_t);
  std::vector<uint64_t> buf(n, 1);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = Now();
    uint64_t total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
    for (size_t i = 0; i < n; ++i) total += buf[i];
    const double sec = Now() - t0;
    if (total != n) std::abort();
    best = std::max(best, n * sizeof(uint64_t) / sec / 1e9);
  }
  return best;
}

}  // namespace kraken::bench
