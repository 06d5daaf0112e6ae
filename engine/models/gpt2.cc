// GPT-2 (Hugging Face GPT2LMHeadModel: key names and Conv1D [in, out] weights read as stored) with
// Megatron tensor parallelism (Shoeybi et al. 2019, §3): QKV and FC1 column-parallel, attention
// output and FC2 row-parallel, one AllReduce after each row-parallel GEMM — 2 per layer, both on
// the critical path. LayerNorms and embeddings are replicated.
//
//   x = wte[tokens] + wpe[positions]
//   each layer: x = x + Attn(LN1(x));  x = x + FFN(LN2(x))
//   logits = LN_f(x) wte^T
#include "engine/models/transformer.h"

namespace kraken::engine::models {
namespace {

class Gpt2Model final : public TransformerModel {
 public:
  Gpt2Model(ModelConfig c, ModelOptions o, Backend* b) : TransformerModel(std::move(c), o, b) {}

  Status Load(const Checkpoint& ckpt) {
    const ModelConfig& c = config_;
    // save_pretrained writes "transformer.h.0..."; OpenAI's original upload has "h.0...".
    const std::string prefix = ckpt.Find("transformer.wte.weight") != nullptr ? "transformer." : "";
    WeightLoader w(ckpt);
    KRAKEN_RETURN_IF_ERROR(LoadEmbeddingsAndHead(w, prefix));
    layers_.resize(c.n_layer);
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string p = StrCat(prefix, "h.", l, ".");
      Layer& L = layers_[l];
      KRAKEN_RETURN_IF_ERROR(LoadNorm(w, p + "ln_1", &L.attn.ln_w, &L.attn.ln_b));
      KRAKEN_RETURN_IF_ERROR(LoadNorm(w, p + "ln_2", &L.ffn.ln_w, &L.ffn.ln_b));
      KRAKEN_RETURN_IF_ERROR(LoadShardedAttention(w, p, /*in_major=*/true, &L.attn));
      KRAKEN_RETURN_IF_ERROR(LoadShardedFfn(w, p, /*in_major=*/true, &L.ffn));
      w.Ignore(p + "attn.bias");  // causal-mask buffers of older checkpoints
      w.Ignore(p + "attn.masked_bias");
    }
    KRAKEN_RETURN_IF_ERROR(w.CheckAllUsed());
    const int W = options_.world_size;
    set_kv_layout({.slots = c.n_layer, .heads = c.n_head / W, .head_dim = c.head_dim()});
    const int64_t d = c.n_embd, width = d / W, f = c.ffn_hidden / W;
    KRAKEN_ASSIGN_OR_RETURN(x_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(normed_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(partial_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(qkv_, Workspace(3 * width));
    KRAKEN_ASSIGN_OR_RETURN(attn_, Workspace(width));
    KRAKEN_ASSIGN_OR_RETURN(hidden_, Workspace(f));
    KRAKEN_ASSIGN_OR_RETURN(rows_, Activations(static_cast<int64_t>(options_.max_logit_rows) * d));
    KRAKEN_RETURN_IF_ERROR(backend_->ReserveScratch({.max_tokens = options_.max_tokens,
                                                     .max_seqs = options_.max_seqs,
                                                     .max_heads = c.n_head / W,
                                                     .max_head_dim = c.head_dim(),
                                                     .max_gemm_k = std::max(c.ffn_hidden / W, static_cast<int>(d))}));
    return absl::OkStatus();
  }

 protected:
  Status RunLayers(KvCache& kv, Communicator& comm) override {
    const ModelConfig& c = config_;
    const int T = num_tokens(), d = c.n_embd, W = options_.world_size;
    const Mat x(x_.data(), T, d), normed(normed_.data(), T, d), partial(partial_.data(), T, d);
    const Mat qkv(qkv_.data(), T, 3 * d / W), attn(attn_.data(), T, d / W);
    const Mat hidden(hidden_.data(), T, c.ffn_hidden / W);
    EmbedTokens(x);
    Dump("x0", -1, -1, x);
    for (int l = 0; l < c.n_layer; ++l) {
      Layer& L = layers_[l];
      backend_->LayerNorm(x, L.attn.ln_w.data(), L.attn.ln_b.data(), c.layer_norm_epsilon, normed);
      Dump("attn_norm", l, -1, normed);
      SelfAttention(L.attn, normed, kv.slot(l), qkv, attn);
      backend_->Linear(attn, *L.attn.proj, L.attn.proj_b.data(), partial, /*accumulate=*/false);
      KRAKEN_RETURN_IF_ERROR(ReduceIntoResidual(comm, partial, x));
      Dump("attn_out", l, -1, partial);
      backend_->LayerNorm(x, L.ffn.ln_w.data(), L.ffn.ln_b.data(), c.layer_norm_epsilon, normed);
      Dump("ffn_norm", l, -1, normed);
      FeedForward(L.ffn, normed, hidden, partial, /*accumulate=*/false, /*add_bias=*/true);
      KRAKEN_RETURN_IF_ERROR(ReduceIntoResidual(comm, partial, x));
      Dump("ffn_out", l, -1, partial);
      Dump("y", l, -1, x);
    }
    if (!options_.compute_logits) return absl::OkStatus();
    FinishLogits(GatherLogitRows(x, Mat(rows_.data(), options_.max_logit_rows, d)));
    return absl::OkStatus();
  }

 private:
  struct Layer {
    AttentionWeights attn;
    FfnWeights ffn;
  };
  std::vector<Layer> layers_;
  Buffer x_, normed_, partial_, qkv_, attn_, hidden_, rows_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> LoadGpt2(const ModelConfig& c, const Checkpoint& ckpt, Backend* b,
                                          const ModelOptions& o) {
  auto m = std::make_unique<Gpt2Model>(c, o, b);
  KRAKEN_RETURN_IF_ERROR(m->Load(ckpt));
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace kraken::engine::models
