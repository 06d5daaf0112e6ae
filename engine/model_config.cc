#include "engine/model_config.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "base/json_util.h"

namespace kraken::engine {
namespace {

using json = nlohmann::json;

// Reads typed fields from a JSON object, producing messages that name the field and value.
class Fields {
 public:
  Fields(const json& j, std::string_view label) : j_(j), label_(label) {}

  StatusOr<int> Int(const char* key, std::optional<int> fallback, int lo, int hi) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) {
      if (fallback) return *fallback;
      return InvalidArgument(label_, ": missing required field '", key, "'");
    }
    if (!it->is_number_integer()) {
      return InvalidArgument(label_, ": field '", key, "' must be an integer, got ", DescribeJson(*it));
    }
    const int64_t v = it->get<int64_t>();
    if (v < lo || v > hi) {
      return InvalidArgument(label_, ": field '", key, "' (", v, ") must be in [", lo, ", ", hi, "]");
    }
    return static_cast<int>(v);
  }

  StatusOr<bool> Bool(const char* key, bool fallback) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) {
      return InvalidArgument(label_, ": field '", key, "' must be true or false, got ", DescribeJson(*it));
    }
    return it->get<bool>();
  }

  StatusOr<float> Float(const char* key, float fallback, double lo, double hi) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return fallback;
    if (!it->is_number()) {
      return InvalidArgument(label_, ": field '", key, "' must be a number, got ", DescribeJson(*it));
    }
    const double v = it->get<double>();
    if (!(v >= lo && v <= hi)) {
      return InvalidArgument(label_, ": field '", key, "' (", v, ") must be in [", lo, ", ", hi, "]");
    }
    return static_cast<float>(v);
  }

  StatusOr<std::string> String(const char* key, std::optional<std::string> fallback) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) {
      if (fallback) return *fallback;
      return InvalidArgument(label_, ": missing required field '", key, "'");
    }
    if (!it->is_string()) {
      return InvalidArgument(label_, ": field '", key, "' must be a string, got ", DescribeJson(*it));
    }
    return it->get<std::string>();
  }

  // An integer or a list of integers (Hugging Face allows both for eos/bos ids).
  StatusOr<std::vector<int>> IdList(const char* key, int vocab) const {
    std::vector<int> out;
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return out;
    std::vector<json> items = it->is_array() ? it->get<std::vector<json>>() : std::vector<json>{*it};
    for (const json& x : items) {
      if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() >= vocab) {
        return InvalidArgument(label_, ": field '", key, "' must hold token ids in [0, ", vocab, "), got ",
                               DescribeJson(*it));
      }
      out.push_back(x.get<int>());
    }
    return out;
  }

  // Rejects a field whose value would change the math in a way the engine does not implement.
  Status Require(const char* key, const json& required) const {
    auto it = j_.find(key);
    if (it != j_.end() && !it->is_null() && *it != required) {
      return Unimplemented(label_, ": field '", key, "' is ", DescribeJson(*it), "; only ", DescribeJson(required),
                           " is supported");
    }
    return absl::OkStatus();
  }

 private:
  const json& j_;
  std::string label_;
};

}  // namespace

std::string_view ArchitectureName(Architecture a) {
  switch (a) {
    case Architecture::kKraken:
      return "kraken";
    case Architecture::kGpt2:
      return "gpt2";
    case Architecture::kParallelBlock:
      return "parallel_block";
  }
  return "?";
}

Status ModelConfig::CheckWorldSize(int world) const {
  if (world < 1) return InvalidArgument("the world size must be >= 1, got ", world);
  if (arch == Architecture::kKraken) {
    if (kraken_degree % world != 0) {
      return InvalidArgument("the model's Kraken degree N = ", kraken_degree, " is not a multiple of the world size ",
                             world, ": each worker must hold whole sub-layers");
    }
    return absl::OkStatus();
  }
  if (n_head % world != 0) {
    return InvalidArgument("the model's n_head ", n_head, " is not a multiple of the world size ", world,
                           ": each worker must hold whole heads");
  }
  if (ffn_hidden % world != 0) {
    return InvalidArgument("the model's FFN width ", ffn_hidden, " is not a multiple of the world size ", world);
  }
  return absl::OkStatus();
}

int64_t ModelConfig::KvBytesPerToken(int world, int element_bytes) const {
  return 2ll * element_bytes * n_layer * n_embd * kraken_degree / world;
}

int64_t ModelConfig::ParameterCount() const {
  const int64_t d = n_embd, f = ffn_hidden, N = kraken_degree;
  const int64_t b = bias ? 1 : 0;
  int64_t per_block = 3 * d * d + d * d + 2 * d * f;  // QKV, attn out, FFN
  per_block += b * (3 * d + d + f + d);               // their biases
  const int64_t norms_per_block = arch == Architecture::kParallelBlock ? 1 : 2;
  per_block += norms_per_block * d * (1 + b);
  int64_t total = static_cast<int64_t>(vocab_size) * d + static_cast<int64_t>(n_positions) * d;
  total += per_block * N * n_layer;
  total += d * (1 + b);                                           // ln_f
  if (arch == Architecture::kKraken) total += d * N * d + b * d;  // conjunction
  return total;
}

StatusOr<ModelConfig> ParseModelConfig(std::string_view text, std::string_view label) {
  KRAKEN_ASSIGN_OR_RETURN(json j, ParseJsonStrict(text, label, /*max_depth=*/32));
  if (!j.is_object()) return InvalidArgument(label, ": not a JSON object");
  Fields f(j, label);
  ModelConfig c;
  KRAKEN_ASSIGN_OR_RETURN(std::string type, f.String("model_type", std::nullopt));
  if (type != "kraken" && type != "gpt2" && type != "parallel_block") {
    return InvalidArgument(label, ": field 'model_type' is '", type,
                           "'; expected one of 'kraken', 'gpt2', 'parallel_block'");
  }
  KRAKEN_ASSIGN_OR_RETURN(c.n_layer, f.Int("n_layer", std::nullopt, 1, kMaxLayers));
  KRAKEN_ASSIGN_OR_RETURN(c.n_embd, f.Int("n_embd", std::nullopt, 1, kMaxWidth));
  KRAKEN_ASSIGN_OR_RETURN(c.vocab_size, f.Int("vocab_size", std::nullopt, 1, kMaxVocab));
  KRAKEN_ASSIGN_OR_RETURN(c.n_positions, f.Int("n_positions", std::nullopt, 1, kMaxPositions));
  KRAKEN_ASSIGN_OR_RETURN(c.layer_norm_epsilon, f.Float("layer_norm_epsilon", 1e-5f, 1e-12, 1.0));
  const char* head_key = "n_head";
  if (type == "kraken") {
    c.arch = Architecture::kKraken;
    head_key = "n_head_per_sublayer";
    KRAKEN_ASSIGN_OR_RETURN(c.kraken_degree, f.Int("kraken_degree", std::nullopt, 1, kMaxKrakenDegree));
    KRAKEN_ASSIGN_OR_RETURN(c.n_head, f.Int(head_key, std::nullopt, 1, kMaxWidth));
    KRAKEN_ASSIGN_OR_RETURN(int e, f.Int("ffn_expansion", 2, 1, 64));
    c.ffn_hidden = e * c.n_embd;
    KRAKEN_ASSIGN_OR_RETURN(c.bias, f.Bool("bias", false));
  } else if (type == "gpt2") {
    c.arch = Architecture::kGpt2;
    KRAKEN_ASSIGN_OR_RETURN(c.n_head, f.Int(head_key, std::nullopt, 1, kMaxWidth));
    KRAKEN_ASSIGN_OR_RETURN(c.ffn_hidden, f.Int("n_inner", 4 * c.n_embd, 1, 64 * kMaxWidth));
    c.bias = true;  // Hugging Face GPT-2 always has biases
    KRAKEN_ASSIGN_OR_RETURN(std::string act, f.String("activation_function", "gelu_new"));
    if (act != "gelu_new" && act != "gelu_pytorch_tanh") {
      return Unimplemented(label, ": field 'activation_function' is '", act,
                           "'; only the tanh GELU ('gelu_new', 'gelu_pytorch_tanh') is supported");
    }
    KRAKEN_RETURN_IF_ERROR(f.Require("scale_attn_weights", true));
    KRAKEN_RETURN_IF_ERROR(f.Require("scale_attn_by_inverse_layer_idx", false));
    KRAKEN_RETURN_IF_ERROR(f.Require("add_cross_attention", false));
    KRAKEN_RETURN_IF_ERROR(f.Require("tie_word_embeddings", true));
  } else {  // parallel_block
    c.arch = Architecture::kParallelBlock;
    KRAKEN_ASSIGN_OR_RETURN(c.n_head, f.Int(head_key, std::nullopt, 1, kMaxWidth));
    KRAKEN_ASSIGN_OR_RETURN(int e, f.Int("ffn_expansion", 4, 1, 64));
    c.ffn_hidden = e * c.n_embd;
    KRAKEN_ASSIGN_OR_RETURN(c.bias, f.Bool("bias", true));
  }
  if (c.n_embd % c.n_head != 0) {
    return InvalidArgument(label, ": field 'n_embd' (", c.n_embd, ") must be divisible by '", head_key, "' (", c.n_head,
                           ")");
  }
  KRAKEN_ASSIGN_OR_RETURN(c.eos_token_ids, f.IdList("eos_token_id", c.vocab_size));
  KRAKEN_ASSIGN_OR_RETURN(c.bos_token_ids, f.IdList("bos_token_id", c.vocab_size));
  for (const char* key : {"torch_dtype", "dtype"}) {
    const auto it = j.find(key);
    if (it == j.end() || !it->is_string()) continue;
    const std::string v = it->get<std::string>();
    if (v == "float32") c.declared_dtype = DType::kF32;
    if (v == "bfloat16") c.declared_dtype = DType::kBF16;
    if (v == "float16") c.declared_dtype = DType::kF16;
  }
  return c;
}

StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  const std::filesystem::path p = std::filesystem::path(dir) / "config.json";
  std::ifstream in(p, std::ios::binary);
  if (!in) return NotFound("cannot read '", p.string(), "'");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParseModelConfig(text, p.string());
}

}  // namespace kraken::engine
