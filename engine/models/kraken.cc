// The Kraken forward pass, exactly as docs/kraken.md "The layer":
//
//   x0      = wte[tokens] + wpe[positions]
//   layer 0: h_i = x0 + Attn_i(LN1_i(x0));  y_i = h_i + FFN_i(LN2_i(h_i))
//   layer l: S   = sum_j y_j                     <- the one AllReduce of the layer boundary
//            a_i = Attn_i(LN1_i(y_i))             <- needs only the local stream: overlaps S
//            y_i = y_i + a_i + FFN_i(LN2_i(S + a_i))
//   head:    z = sum_i Wc_i y_i (+ bc);  logits = LN_f(z) wte^T
//
// This shard holds sub-layers [s0, s0 + Sl) with Sl = N / W; their residual streams sit side by
// side in one [T, Sl·d] buffer, so the conjunction is a single GEMM over the local column block.
#include "engine/models/transformer.h"

namespace kraken::engine::models {
namespace {

class KrakenModel final : public TransformerModel {
 public:
  KrakenModel(ModelConfig c, ModelOptions o, Backend* b) : TransformerModel(std::move(c), o, b) {}

  Status Load(const Checkpoint& ckpt) {
    const ModelConfig& c = config_;
    const int N = c.kraken_degree, W = options_.world_size;
    if (N % W != 0) {
      return InvalidArgument("kraken_degree ", N, " cannot be split over a world of size ", W,
                             " (it must be a multiple)");
    }
    local_ = N / W;
    first_ = options_.rank * local_;
    const int64_t d = c.n_embd, f = c.ffn_hidden;
    WeightLoader w(ckpt);
    KRAKEN_RETURN_IF_ERROR(LoadEmbeddingsAndHead(w, "transformer."));
    blocks_.resize(static_cast<size_t>(c.n_layer) * local_);
    for (int i = 0; i < N; ++i) {
      for (int l = 0; l < c.n_layer; ++l) {
        const std::string p = StrCat("transformer.h.", i, ".", l, ".");
        const bool mine = i >= first_ && i < first_ + local_;
        if (!mine) {  // another rank's sub-layer: that shard checks it
          w.IgnorePrefix(p);
          continue;
        }
        Block& b = block(l, i - first_);
        KRAKEN_RETURN_IF_ERROR(LoadNorm(w, p + "ln_1", &b.attn.ln_w, &b.attn.ln_b));
        KRAKEN_RETURN_IF_ERROR(LoadNorm(w, p + "ln_2", &b.ffn.ln_w, &b.ffn.ln_b));
        KRAKEN_RETURN_IF_ERROR(LoadLinear(w, p + "attn.c_attn", 3 * d, d, false, &b.attn.qkv, &b.attn.qkv_b));
        KRAKEN_RETURN_IF_ERROR(LoadLinear(w, p + "attn.c_proj", d, d, false, &b.attn.proj, &b.attn.proj_b));
        KRAKEN_RETURN_IF_ERROR(LoadLinear(w, p + "mlp.c_fc", f, d, false, &b.ffn.fc, &b.ffn.fc_b));
        KRAKEN_RETURN_IF_ERROR(LoadLinear(w, p + "mlp.c_proj", d, f, false, &b.ffn.proj, &b.ffn.proj_b));
      }
    }
    // Conjunction [d, N·d]: this shard multiplies its own column block.
    KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* cw, w.Get("transformer.conjunction.weight", {d, N * d}));
    KRAKEN_ASSIGN_OR_RETURN(
        conj_,
        Linear({.tensor = cw, .in_begin = static_cast<int>(first_ * d), .in_count = static_cast<int>(local_ * d)}));
    if (c.bias) {
      KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* cb, w.Get("transformer.conjunction.bias", {d}));
      KRAKEN_ASSIGN_OR_RETURN(conj_b_, Vector(cb));
    }
    KRAKEN_RETURN_IF_ERROR(w.CheckAllUsed());
    set_kv_layout({.slots = c.n_layer * local_, .heads = c.n_head, .head_dim = c.head_dim()});

    KRAKEN_ASSIGN_OR_RETURN(streams_, Workspace(local_ * d));
    KRAKEN_ASSIGN_OR_RETURN(attn_out_, Workspace(local_ * d));
    KRAKEN_ASSIGN_OR_RETURN(x0_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(sum_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(normed_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(shifted_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(qkv_, Workspace(3 * d));
    KRAKEN_ASSIGN_OR_RETURN(attn_, Workspace(d));
    KRAKEN_ASSIGN_OR_RETURN(hidden_, Workspace(f));
    KRAKEN_ASSIGN_OR_RETURN(rows_, Activations(static_cast<int64_t>(options_.max_logit_rows) * local_ * d));
    KRAKEN_RETURN_IF_ERROR(
        backend_->ReserveScratch({.max_tokens = options_.max_tokens,
                                  .max_seqs = options_.max_seqs,
                                  .max_heads = c.n_head,
                                  .max_head_dim = c.head_dim(),
                                  .max_gemm_k = std::max({c.ffn_hidden, local_ * c.n_embd, c.n_embd})}));
    KRAKEN_ASSIGN_OR_RETURN(conj_out_, Activations(static_cast<int64_t>(options_.max_logit_rows) * d));
    return absl::OkStatus();
  }

 protected:
  Status RunLayers(KvCache& kv, Communicator& comm) override {
    const ModelConfig& c = config_;
    const int T = num_tokens(), d = c.n_embd, f = c.ffn_hidden;
    const Mat streams(streams_.data(), T, local_ * d);
    const Mat attn_out(attn_out_.data(), T, local_ * d);
    const Mat x0(x0_.data(), T, d), sum(sum_.data(), T, d), normed(normed_.data(), T, d);
    const Mat shifted(shifted_.data(), T, d), qkv(qkv_.data(), T, 3 * d), attn(attn_.data(), T, d);
    const Mat hidden(hidden_.data(), T, f);
    auto y = [&](int s) { return streams.ColRange(s * d, d); };
    auto a = [&](int s) { return attn_out.ColRange(s * d, d); };

    EmbedTokens(x0);
    Dump("x0", -1, -1, x0);

    // Layer 0: a plain GPT block per sub-layer on the shared input, no communication.
    for (int s = 0; s < local_; ++s) {
      Block& b = block(0, s);
      const int i = first_ + s;
      backend_->LayerNorm(x0, b.attn.ln_w.data(), b.attn.ln_b.data(), c.layer_norm_epsilon, normed);
      Dump("attn_norm", 0, i, normed);
      SelfAttention(b.attn, normed, kv.slot(s), qkv, attn);
      backend_->Linear(attn, *b.attn.proj, b.attn.proj_b.data(), a(s), /*accumulate=*/false);
      Dump("attn_out", 0, i, a(s));
      backend_->Add(x0, a(s), y(s));  // h_i = x0 + a_i
      backend_->LayerNorm(y(s), b.ffn.ln_w.data(), b.ffn.ln_b.data(), c.layer_norm_epsilon, normed);
      Dump("ffn_norm", 0, i, normed);
      FeedForward(b.ffn, normed, hidden, y(s), /*accumulate=*/true, /*add_bias=*/true);
      Dump("y", 0, i, y(s));
    }

    for (int l = 1; l < c.n_layer; ++l) {
      // S = sum over sub-layers of y^(l-1): local part in a separate buffer, then the AllReduce,
      // which runs while this layer's attention computes.
      backend_->Copy(y(0), sum);
      for (int s = 1; s < local_; ++s) backend_->Add(sum, y(s), sum);
      KRAKEN_ASSIGN_OR_RETURN(CollectiveHandle pending, comm.StartAllReduceSum(sum.data, static_cast<int64_t>(T) * d));

      for (int s = 0; s < local_; ++s) {
        Block& b = block(l, s);
        const int i = first_ + s;
        backend_->LayerNorm(y(s), b.attn.ln_w.data(), b.attn.ln_b.data(), c.layer_norm_epsilon, normed);
        Dump("attn_norm", l, i, normed);
        SelfAttention(b.attn, normed, kv.slot(l * local_ + s), qkv, attn);
        backend_->Linear(attn, *b.attn.proj, b.attn.proj_b.data(), a(s), /*accumulate=*/false);
        Dump("attn_out", l, i, a(s));
      }

      KRAKEN_RETURN_IF_ERROR(comm.Wait(pending));
      Dump("sum", l, -1, sum);
      for (int s = 0; s < local_; ++s) {
        Block& b = block(l, s);
        const int i = first_ + s;
        backend_->Add(sum, a(s), shifted);  // S + a_i feeds only LN2
        backend_->LayerNorm(shifted, b.ffn.ln_w.data(), b.ffn.ln_b.data(), c.layer_norm_epsilon, normed);
        Dump("ffn_norm", l, i, normed);
        backend_->Add(y(s), a(s), y(s));  // y_i + a_i, then + FFN below
        FeedForward(b.ffn, normed, hidden, y(s), /*accumulate=*/true, /*add_bias=*/true);
        Dump("y", l, i, y(s));
      }
    }

    if (!options_.compute_logits && options_.world_size == 1) return absl::OkStatus();
    // Conjunction over the rows that need logits: partial z from the local column block, summed
    // over ranks (on the critical path: LN_f needs it); rank 0 adds the bias, so it counts once.
    const Mat rows = GatherLogitRows(streams, Mat(rows_.data(), options_.max_logit_rows, local_ * d));
    const Mat z(conj_out_.data(), rows.rows, d);
    backend_->Linear(rows, *conj_, options_.rank == 0 ? conj_b_.data() : nullptr, z, /*accumulate=*/false);
    KRAKEN_ASSIGN_OR_RETURN(CollectiveHandle h, comm.StartAllReduceSum(z.data, static_cast<int64_t>(z.rows) * d));
    KRAKEN_RETURN_IF_ERROR(comm.Wait(h));
    Dump("conjunction", -1, -1, z);
    if (options_.compute_logits) FinishLogits(z);
    return absl::OkStatus();
  }

 private:
  struct Block {
    AttentionWeights attn;
    FfnWeights ffn;
  };
  Block& block(int layer, int local_sublayer) { return blocks_[layer * local_ + local_sublayer]; }

  int local_ = 1, first_ = 0;
  std::vector<Block> blocks_;
  std::unique_ptr<LinearWeight> conj_;
  Buffer conj_b_;
  Buffer streams_, attn_out_, x0_, sum_, normed_, shifted_, qkv_, attn_, hidden_, rows_, conj_out_;
};

}  // namespace

StatusOr<std::unique_ptr<Model>> LoadKraken(const ModelConfig& c, const Checkpoint& ckpt, Backend* b,
                                            const ModelOptions& o) {
  auto m = std::make_unique<KrakenModel>(c, o, b);
  KRAKEN_RETURN_IF_ERROR(m->Load(ckpt));
  return std::unique_ptr<Model>(std::move(m));
}

}  // namespace kraken::engine::models
