// Machinery shared by the three architectures: weight loading with name/shape checks, the
// per-step input validation and layout, embeddings, self-attention over the paged KV cache, the
// GELU FFN, and the final norm + tied LM head. Each architecture (kraken.cc, gpt2.cc,
// parallel_block.cc) writes only its layer loop, imperatively, over buffers allocated at load.
#pragma once

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "engine/model.h"
#include "engine/safetensors.h"

namespace kraken::engine::models {

/// Looks tensors up by name, checks shape and dtype, and remembers which were used so that
/// unexpected tensors can be reported.
class WeightLoader {
 public:
  explicit WeightLoader(const Checkpoint& ckpt) : ckpt_(ckpt) {}
  /// The tensor `name` with exactly `shape`. INVALID_ARGUMENT "missing tensor" / "has shape".
  StatusOr<const TensorInfo*> Get(const std::string& name, std::vector<int64_t> shape);
  /// Like Get, but nullptr (not an error) when absent.
  StatusOr<const TensorInfo*> GetOptional(const std::string& name, std::vector<int64_t> shape);
  /// Marks `name` as used if present (buffers the engine ignores, e.g. GPT-2's attn.bias).
  void Ignore(const std::string& name);
  /// Marks every tensor whose name starts with `prefix` as used (another shard's weights).
  void IgnorePrefix(const std::string& prefix);
  /// INVALID_ARGUMENT naming the first tensor never asked for.
  Status CheckAllUsed() const;

 private:
  const Checkpoint& ckpt_;
  std::set<std::string> used_;
};

/// Weights of one attention block (LN1, fused QKV, output projection) on this shard.
struct AttentionWeights {
  Buffer ln_w, ln_b;                        // [d]; ln_b empty without biases
  std::unique_ptr<LinearWeight> qkv, proj;  // [3·hl·dh, d], [d, hl·dh]
  Buffer qkv_b, proj_b;                     // may be empty; proj_b only where it is added once
};

/// Weights of one FFN (LN2 where the architecture has one, W1, W2).
struct FfnWeights {
  Buffer ln_w, ln_b;
  std::unique_ptr<LinearWeight> fc, proj;  // [fl, d], [d, fl]
  Buffer fc_b, proj_b;
};

class TransformerModel : public Model {
 public:
  const ModelConfig& config() const override { return config_; }
  const ModelOptions& options() const override { return options_; }
  KvLayout kv_layout() const override { return kv_layout_; }
  int64_t weight_bytes() const override { return weight_bytes_; }
  int64_t activation_bytes() const override { return activation_bytes_; }
  void set_tensor_callback(TensorCallback cb) override { callback_ = std::move(cb); }
  StatusOr<ForwardResult> Forward(const ForwardBatch& batch, KvCache& kv, Communicator& comm) final;

 protected:
  TransformerModel(ModelConfig config, ModelOptions options, Backend* backend);

  /// The layer loop: reads step state (tokens(), attention_batch(), ...), ends with FinishLogits.
  virtual Status RunLayers(KvCache& kv, Communicator& comm) = 0;

  // ---- Loading ---------------------------------------------------------------------------
  StatusOr<std::unique_ptr<LinearWeight>> Linear(const LinearSource& src);
  StatusOr<Buffer> Vector(const TensorInfo* t, std::vector<std::pair<int64_t, int64_t>> ranges = {});
  /// wte [V, d], wpe [P, d], ln_f, and the LM head tied to wte (`prefix` e.g. "transformer.").
  Status LoadEmbeddingsAndHead(WeightLoader& w, const std::string& prefix);
  /// LayerNorm `<p>.weight` [d] and, when the config has biases, `<p>.bias`.
  Status LoadNorm(WeightLoader& w, const std::string& p, Buffer* weight, Buffer* bias);
  /// The whole matrix `<p>.weight` (logical [out, in]; stored [in, out] when `in_major`) and,
  /// when the config has biases, `<p>.bias` [out].
  Status LoadLinear(WeightLoader& w, const std::string& p, int64_t out, int64_t in, bool in_major,
                    std::unique_ptr<LinearWeight>* weight, Buffer* bias);
  /// Megatron shard of `<p>attn.c_attn` / `<p>attn.c_proj`: this rank's heads of q, k and v
  /// (column-parallel) and the matching input rows of the output projection (row-parallel,
  /// bias kept on rank 0 only so the sum over ranks adds it once).
  Status LoadShardedAttention(WeightLoader& w, const std::string& p, bool in_major, AttentionWeights* out);
  /// Megatron shard of `<p>mlp.c_fc` (column-parallel) and `<p>mlp.c_proj` (row-parallel).
  Status LoadShardedFfn(WeightLoader& w, const std::string& p, bool in_major, FfnWeights* out);
  /// A [rows, cols] activation buffer sized for max_tokens rows.
  StatusOr<Buffer> Workspace(int64_t cols_per_token);
  /// An activation buffer of `floats` floats (counted in activation_bytes()).
  StatusOr<Buffer> Activations(int64_t floats);
  void set_kv_layout(KvLayout l) { kv_layout_ = l; }

  // ---- Step helpers ----------------------------------------------------------------------
  int num_tokens() const { return num_tokens_; }
  const AttentionBatch& attention_batch() const { return attention_batch_; }
  /// out[t] = wte[token t] + wpe[position t].
  void EmbedTokens(Mat out);
  /// attn = softmax(q k^T / sqrt(dh)) v for this shard's heads, after writing k and v of the new
  /// tokens to `slot`. `normed`: [T, d]; `qkv`: [T, 3·hl·dh] scratch; `attn`: [T, hl·dh].
  void SelfAttention(const AttentionWeights& w, Mat normed, const KvSlot& slot, Mat qkv, Mat attn);
  /// hidden = gelu(normed W1^T + b1); out (+)= hidden W2^T (+ b2 when `add_bias`).
  void FeedForward(const FfnWeights& w, Mat normed, Mat hidden, Mat out, bool accumulate, bool add_bias);
  /// Megatron reduction point: sums `partial` [T, d] over ranks (blocking), then residual += it.
  Status ReduceIntoResidual(Communicator& comm, Mat partial, Mat residual);
  /// Copies the rows that need logits from `hidden` [T, cols] into `dst` [R, cols]; returns dst
  /// restricted to those R rows.
  Mat GatherLogitRows(Mat hidden, Mat dst);
  /// logits = LN_f(rows) · wte^T for the R gathered rows ([R, d]).
  void FinishLogits(Mat rows);
  int logit_rows() const { return static_cast<int>(logit_rows_.size()); }
  /// Sends an intermediate tensor to the callback, if any.
  void Dump(std::string_view name, int layer, int sublayer, Mat m) const {
    if (callback_) callback_(name, layer, sublayer, m);
  }

  ModelConfig config_;
  ModelOptions options_;
  Backend* backend_;
  int64_t weight_bytes_ = 0;
  int64_t activation_bytes_ = 0;

 private:
  Status PrepareStep(const ForwardBatch& batch, const KvCache& kv);

  KvLayout kv_layout_;
  TensorCallback callback_;
  std::unique_ptr<LinearWeight> wte_;  // [V, d], stored dtype: the embedding and the tied LM head
  Buffer wpe_, lnf_w_, lnf_b_;
  Buffer logits_, final_norm_;

  // Step state, sized at load so a step allocates nothing.
  int num_tokens_ = 0;
  std::vector<int32_t> tokens_, positions_, logit_rows_;
  std::vector<AttentionSeq> seqs_;
  std::vector<int32_t> block_writer_;  // per KV block: the sequence writing it this step, or -1
  AttentionBatch attention_batch_;
  std::vector<float> host_logits_;  // used only when the backend's memory is not host memory
};

/// Per-architecture factories (kraken.cc, gpt2.cc, parallel_block.cc).
StatusOr<std::unique_ptr<Model>> LoadKraken(const ModelConfig& c, const Checkpoint& ckpt, Backend* b,
                                            const ModelOptions& o);
StatusOr<std::unique_ptr<Model>> LoadGpt2(const ModelConfig& c, const Checkpoint& ckpt, Backend* b,
                                          const ModelOptions& o);
StatusOr<std::unique_ptr<Model>> LoadParallelBlock(const ModelConfig& c, const Checkpoint& ckpt, Backend* b,
                                                   const ModelOptions& o);

}  // namespace kraken::engine::models
