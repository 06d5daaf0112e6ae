// Model hyper-parameters from a Hugging Face style config.json.
//
//   KRAKEN_ASSIGN_OR_RETURN(ModelConfig cfg, LoadModelConfig("models/kraken-4way"));
//   cfg.head_dim();   // n_embd / n_head
//
// Three `model_type`s (docs/model_formats.md has every key):
//   "kraken"          docs/kraken.md: N = kraken_degree sub-layers of width d = n_embd, each with
//                     n_head_per_sublayer heads and an FFN of ffn_expansion * d.
//   "gpt2"            Hugging Face GPT-2 (GPT2LMHeadModel), read as is.
//   "parallel_block"  GPT-J style y = x + Attn(LN(x)) + FFN(LN(x)), learned positions.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "engine/dtype.h"

namespace kraken::engine {

enum class Architecture { kKraken, kGpt2, kParallelBlock };

/// "kraken", "gpt2" or "parallel_block".
std::string_view ArchitectureName(Architecture a);

struct ModelConfig {
  Architecture arch = Architecture::kKraken;
  int n_layer = 0;        // L
  int n_embd = 0;         // d: width of each sub-layer (Kraken) or of the model (others)
  int n_head = 0;         // h: heads per sub-layer (Kraken) or per layer (others)
  int kraken_degree = 1;  // N: parallel sub-layers per layer; 1 for the other architectures
  int ffn_hidden = 0;     // FFN inner width (e * d)
  int vocab_size = 0;     // V
  int n_positions = 0;    // P: learned positions = longest context
  bool bias = false;      // Linear and LayerNorm biases present
  float layer_norm_epsilon = 1e-5f;
  std::vector<int> eos_token_ids;  // may be empty
  std::vector<int> bos_token_ids;  // may be empty
  // The weights' dtype as the writer declared it ("torch_dtype", or "dtype" in newer Hugging Face
  // configs: "float32", "bfloat16", "float16"); nullopt when absent or another value. Advisory:
  // the checkpoint's own tensors are authoritative (WeightDType in model.h).
  std::optional<DType> declared_dtype;

  int head_dim() const { return n_embd / n_head; }
  /// Number of (layer, sub-layer) attention blocks, i.e. L * N.
  int num_blocks() const { return n_layer * kraken_degree; }
  /// Parameter count of the checkpoint (tied embedding counted once, biases included).
  int64_t ParameterCount() const;
  /// OK when the model shards over `world` ranks (tensor parallelism); INVALID_ARGUMENT naming the
  /// number that does not divide otherwise. Kraken: each rank holds whole sub-layers, so N must be
  /// a multiple of `world` (docs/kraken.md); the Megatron-sharded architectures split heads and
  /// the FFN width, so n_head and ffn_hidden must be.
  Status CheckWorldSize(int world) const;
  /// Bytes of K and V one cached token takes on each of `world` ranks with elements of
  /// `element_bytes` bytes: 2 * L * d * N / world (Kraken: N / world sub-layers of width d per rank;
  /// the other architectures have N = 1 and shard the width d). docs/kraken.md "KV cache".
  int64_t KvBytesPerToken(int world, int element_bytes) const;
};

/// Limits that keep a hostile config from requesting absurd allocations.
inline constexpr int kMaxLayers = 1024;
inline constexpr int kMaxWidth = 1 << 16;
inline constexpr int kMaxVocab = 1 << 22;
inline constexpr int kMaxPositions = 1 << 20;
inline constexpr int kMaxKrakenDegree = 64;

/// Parses config.json text. Errors (INVALID_ARGUMENT) name the field, the rule and the value,
/// e.g. "config.json: field 'n_embd' (678) must be divisible by 'n_head_per_sublayer' (4)".
StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text, std::string_view label = "config.json");
/// Reads and parses `<dir>/config.json`. NOT_FOUND when the file is missing.
StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

}  // namespace kraken::engine
