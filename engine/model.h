// A loaded model shard and its batched forward pass.
//
//   KRAKEN_ASSIGN_OR_RETURN(auto backend, CreateBackend({}));
//   KRAKEN_ASSIGN_OR_RETURN(auto model, LoadModel("models/kraken-4way", backend.get(), {}));
//   KRAKEN_ASSIGN_OR_RETURN(KvCache kv, KvCache::Create(*backend, model->kv_layout(), {.num_blocks = 64}));
//   LocalCommunicator comm;
//   KRAKEN_ASSIGN_OR_RETURN(ForwardResult r, model->Forward(batch, kv, comm));
//   // r.logits: [r.rows, V] — for each sequence in order, its last position (or all positions
//   // when SequenceInput::all_logits).
//
// The architectures (docs/kraken.md): "kraken" (N sub-layers, one AllReduce per layer boundary
// overlapped with the next layer's attention), "gpt2" and "parallel_block" (Megatron tensor
// parallelism). A shard (rank r of W) loads only its part: Kraken sub-layers r·N/W .. (r+1)·N/W-1;
// GPT-2 and parallel-block heads and FFN columns r·h/W .. and r·f/W ...
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "engine/backend.h"
#include "engine/batch.h"
#include "engine/communicator.h"
#include "engine/kv_cache.h"
#include "engine/model_config.h"

namespace kraken::engine {

/// Receives named intermediate tensors during Forward (for comparison with the PyTorch
/// reference): name ("attn_norm", "ffn_out", ...), layer (-1 when not per layer), sub-layer
/// (-1 when not per sub-layer) and the tensor in backend memory, valid only during the call.
using TensorCallback = std::function<void(std::string_view name, int layer, int sublayer, Mat tensor)>;

/// Largest step sizes LoadModel accepts (buffers are sized from them at load).
inline constexpr int kMaxStepTokens = 1 << 20;
inline constexpr int kMaxStepSeqs = 1 << 16;

struct ModelOptions {
  int max_tokens = 2048;       // new tokens per step, summed over sequences
  int max_seqs = 256;          // sequences per step
  int max_logit_rows = 256;    // logit rows per step (all_logits rows count one per token)
  int rank = 0;                // this shard
  int world_size = 1;          // W
  bool compute_logits = true;  // false on ranks that never sample (saves the LM head)
};

/// Logits of one step in host memory, valid until the next Forward.
struct ForwardResult {
  const float* logits = nullptr;  // [rows, vocab]; nullptr when the shard computes no logits
  int rows = 0;
  int vocab = 0;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelConfig& config() const = 0;
  virtual const ModelOptions& options() const = 0;
  /// Per-token KV-cache needs of this shard.
  virtual KvLayout kv_layout() const = 0;
  /// Bytes of prepared weights held by this shard: the checkpoint's bytes of the tensors it
  /// uses, in their stored dtype, plus the F32 widening of the 1-D tensors and wpe (norms and
  /// biases) and the zero padding of each matrix to whole 32-row panels on the CPU.
  virtual int64_t weight_bytes() const = 0;
  /// Bytes of activation buffers sized at load for the largest step (options().max_tokens rows).
  virtual int64_t activation_bytes() const = 0;

  /// Runs one step: writes the new tokens' K and V into `kv` and returns logits. Every input is
  /// validated first (INVALID_ARGUMENT naming the sequence, field, limit and value); nothing is
  /// written to the KV cache when validation fails. Errors of collectives come back as they are.
  virtual StatusOr<ForwardResult> Forward(const ForwardBatch& batch, KvCache& kv, Communicator& comm) = 0;

  /// Installs (or clears, with nullptr) the intermediate-tensor callback.
  virtual void set_tensor_callback(TensorCallback cb) = 0;
};

/// Loads `dir` (config.json + safetensors) onto `backend` (which must outlive the model).
/// Errors: NOT_FOUND for missing files; INVALID_ARGUMENT for a bad config, a missing, misshapen or
/// unexpected tensor, or a world size the architecture cannot be split into.
StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir, Backend* backend, const ModelOptions& options);

/// The checkpoint's compute dtype without loading it: the stored dtype of the token embedding
/// ("transformer.wte.weight" or "wte.weight") of `dir`, which is what a KV cache of dtype "auto"
/// uses. A directory without weights (config only, e.g. for --print-resources) gets the dtype its
/// config.json declares (ModelConfig::declared_dtype), or F32. Errors: those of Checkpoint::Open
/// and LoadModelConfig; INVALID_ARGUMENT when the embedding is missing or not F32/BF16/F16.
StatusOr<DType> WeightDType(const std::string& dir);

/// The names a KV-cache dtype flag takes (`--kv-cache-dtype`), for a CLI's allowed set.
inline const std::vector<std::string> kKvCacheDTypeNames = {"auto", "f32", "bf16", "f16"};

/// The KV cache dtype `name` stands for: "f32", "bf16", "f16", or "auto" = WeightDType(model_dir).
/// INVALID_ARGUMENT naming `--kv-cache-dtype` and the value for any other name; the errors of
/// WeightDType for "auto".
StatusOr<DType> KvCacheDType(const std::string& name, const std::string& model_dir);

}  // namespace kraken::engine
