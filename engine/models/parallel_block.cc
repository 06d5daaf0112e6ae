// Parallel attention + FFN (GPT-J style, Wang & Komatsuzaki 2021), with GPT-2's learned positions:
//
//   each layer: n = LN(x);  x = x + Attn(n) + FFN(n)
//
// Tensor parallel like Megatron, but the attention output and FC2 partial sums are added before
// one AllReduce per layer (on the critical path). Weights in PyTorch Linear [out, in] layout.
#include "engine/models/transformer.h"

namespace kraken::engine::models {
namespace {

class ParallelBlockModel final : public TransformerModel {
 public:
  ParallelBlockModel(ModelConfig c, ModelOptions o, Backend* b) : TransformerModel(std::move(c), o, b) {}

  Status Load(const Checkpoint& ckpt) {
    const ModelConfig& c = config_;
    WeightLoader w(ckpt);
    KRAKEN_RETURN_IF_ERROR(LoadEmbeddingsAndHead(w, "transformer."));
    layers_.resize(c.n_layer);
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string p = StrCat("transformer.h.", l, ".");
      Layer& L = layers_[l];
      KRAKEN_RETURN_IF_ERROR(LoadNorm(w, p + "ln", &L.attn.ln_w, &L.attn.ln_b));
      KRAKEN_RETURN_IF_ERROR(LoadShardedAttention(w, p, /*in_major=*/false, &L.attn));
      KRAKEN_RETURN_IF_ERROR(LoadShardedFfn(w, p, /*in_major=*/false, &L.ffn));
    }
    KRAKEN_RETURN_IF_ERROR(w.CheckAllUsed());
    const int W = options_.world_size;
    set_kv_layout({.slots = c.n_layer, .heads = c.n_head / W, .head_dim = c.head_dim()});
    const int64_t d = c.n_embd, width = d / W, f = c.ffn_hidden / W;
    KRAKEN_ASSIGN_OR_RETURN(x_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(normed_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(attn_out_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(ffn_out_, Workspace(d));
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
    const Mat x(x_.data(), T, d), normed(normed_.data(), T, d);
    const Mat attn_out(attn_out_.data(), T, d), ffn_out(ffn_out_.data(), T, d);
    const Mat qkv(qkv_.data(), T, 3 * d / W), attn(attn_.data(), T, d / W);
    const Mat hidden(hidden_.data(), T, c.ffn_hidden / W);
    EmbedTokens(x);
    Dump("x0", -1, -1, x);
    for (int l = 0; l < c.n_layer; ++l) {
      Layer& L = layers_[l];
      backend_->LayerNorm(x, L.attn.ln_w.data(), L.attn.ln_b.data(), c.layer_norm_epsilon, normed);
      Dump("attn_norm", l, -1, normed);
      SelfAttention(L.attn, normed, kv.slot(l), qkv, attn);
      backend_->Linear(attn, *L.attn.proj, L.attn.proj_b.data(), attn_out, /*accumulate=*/false);
      Dump("attn_out", l, -1, attn_out);
      FeedForward(L.ffn, normed, hidden, ffn_out, /*accumulate=*/false, /*add_bias=*/true);
      Dump("ffn_out", l, -1, ffn_out);
      if (W == 1) {
        backend_->Add(x, attn_out, x);  // (x + a) + f, the reference's order
        backend_->Add(x, ffn_out, x);
      } else {
        backend_->Add(attn_out, ffn_out, attn_out);
        KRAKEN_RETURN_IF_ERROR(ReduceIntoResidual(comm, attn_out, x));
      }
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
  Buffer x_, normed_, attn_out_, ffn_out_, qkv_, attn_, hidden_, rows_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> LoadParallelBlock(const ModelConfig& c, const Checkpoint& ckpt, Backend* b,
                                                   const ModelOptions& o) {
  auto m = std::make_unique<ParallelBlockModel>(c, o, b);
  KRAKEN_RETURN_IF_ERROR(m->Load(ckpt));
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace kraken::engine::models
