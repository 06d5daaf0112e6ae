// Small helpers the benchmark programs share: wall-clock time, list flags, medians, and the GEMM
// FLOP counts of a model step (the numerator of every "share of peak" figure).
#pragma once

#include <algorithm>
#include <chrono>
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

}  // namespace kraken::bench
