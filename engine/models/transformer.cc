#include "engine/models/transformer.h"

#include <cmath>

namespace kraken::engine::models {
namespace {

std::string ShapeString(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) StrAppend(&out, i ? ", " : "", s[i]);
  return out + "]";
}

}  // namespace

// ---- WeightLoader -------------------------------------------------------------------------

StatusOr<const TensorInfo*> WeightLoader::GetOptional(const std::string& name, std::vector<int64_t> shape) {
  const TensorInfo* t = ckpt_.Find(name);
  if (t == nullptr) return nullptr;
  used_.insert(name);
  if (t->shape != shape) {
    return InvalidArgument("tensor '", name, "' has shape ", t->ShapeString(), "; the config implies ",
                           ShapeString(shape));
  }
  if (!IsComputeFloat(t->dtype)) {
    return InvalidArgument("tensor '", name, "' has dtype ", DTypeName(t->dtype), "; expected F32, F16 or BF16");
  }
  return t;
}

StatusOr<const TensorInfo*> WeightLoader::Get(const std::string& name, std::vector<int64_t> shape) {
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* t, GetOptional(name, shape));
  if (t == nullptr) return InvalidArgument("missing tensor '", name, "' (expected shape ", ShapeString(shape), ")");
  return t;
}

void WeightLoader::Ignore(const std::string& name) {
  if (ckpt_.Find(name) != nullptr) used_.insert(name);
}

void WeightLoader::IgnorePrefix(const std::string& prefix) {
  for (std::string& n : ckpt_.NamesWithPrefix(prefix)) used_.insert(std::move(n));
}

Status WeightLoader::CheckAllUsed() const {
  for (const std::string& n : ckpt_.Names()) {
    if (!used_.contains(n)) return InvalidArgument("unexpected tensor '", n, "' in checkpoint");
  }
  return absl::OkStatus();
}

// ---- TransformerModel ---------------------------------------------------------------------

TransformerModel::TransformerModel(ModelConfig config, ModelOptions options, Backend* backend)
    : config_(std::move(config)), options_(options), backend_(backend) {
  tokens_.reserve(options_.max_tokens);
  positions_.reserve(options_.max_tokens);
  logit_rows_.reserve(options_.max_logit_rows);
  seqs_.reserve(options_.max_seqs);
}

StatusOr<std::unique_ptr<LinearWeight>> TransformerModel::Linear(const LinearSource& src) {
  KRAKEN_ASSIGN_OR_RETURN(auto w, backend_->PrepareLinear(src));
  weight_bytes_ += static_cast<int64_t>(w->bytes());
  return w;
}

StatusOr<Buffer> TransformerModel::Vector(const TensorInfo* t, std::vector<std::pair<int64_t, int64_t>> ranges) {
  if (t == nullptr) return Buffer();
  if (ranges.empty()) ranges.emplace_back(0, t->numel());
  KRAKEN_ASSIGN_OR_RETURN(Buffer b, backend_->PrepareVector(*t, ranges));
  weight_bytes_ += b.size() * static_cast<int64_t>(sizeof(float));
  return b;
}

Status TransformerModel::LoadNorm(WeightLoader& w, const std::string& p, Buffer* weight, Buffer* bias) {
  const int64_t d = config_.n_embd;
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* t, w.Get(p + ".weight", {d}));
  KRAKEN_ASSIGN_OR_RETURN(*weight, Vector(t));
  if (config_.bias) {
    KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* b, w.Get(p + ".bias", {d}));
    KRAKEN_ASSIGN_OR_RETURN(*bias, Vector(b));
  }
  return absl::OkStatus();
}

Status TransformerModel::LoadLinear(WeightLoader& w, const std::string& p, int64_t out, int64_t in, bool in_major,
                                    std::unique_ptr<LinearWeight>* weight, Buffer* bias) {
  std::vector<int64_t> shape = in_major ? std::vector<int64_t>{in, out} : std::vector<int64_t>{out, in};
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* t, w.Get(p + ".weight", shape));
  KRAKEN_ASSIGN_OR_RETURN(*weight, Linear({.tensor = t, .in_major = in_major}));
  if (config_.bias) {
    KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* b, w.Get(p + ".bias", {out}));
    KRAKEN_ASSIGN_OR_RETURN(*bias, Vector(b));
  }
  return absl::OkStatus();
}

Status TransformerModel::LoadShardedAttention(WeightLoader& w, const std::string& p, bool in_major,
                                              AttentionWeights* out) {
  const ModelConfig& c = config_;
  const int W = options_.world_size, r = options_.rank;
  if (c.n_head % W != 0) {
    return InvalidArgument("n_head ", c.n_head, " cannot be split over a world of size ", W,
                           " (it must be a multiple)");
  }
  const int64_t d = c.n_embd;
  const int width = static_cast<int>(d / W);  // this rank's heads x head_dim
  const int off = r * width;
  std::vector<int64_t> qkv_shape = in_major ? std::vector<int64_t>{d, 3 * d} : std::vector<int64_t>{3 * d, d};
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* qkv, w.Get(p + "attn.c_attn.weight", qkv_shape));
  const std::vector<std::pair<int, int>> cols = {
      {off, width}, {static_cast<int>(d) + off, width}, {static_cast<int>(2 * d) + off, width}};
  KRAKEN_ASSIGN_OR_RETURN(out->qkv, Linear({.tensor = qkv, .in_major = in_major, .out_ranges = cols}));
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* proj, w.Get(p + "attn.c_proj.weight", {d, d}));
  KRAKEN_ASSIGN_OR_RETURN(out->proj,
                          Linear({.tensor = proj, .in_major = in_major, .in_begin = off, .in_count = width}));
  if (c.bias) {
    KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* qb, w.Get(p + "attn.c_attn.bias", {3 * d}));
    KRAKEN_ASSIGN_OR_RETURN(out->qkv_b, Vector(qb, {{off, width}, {d + off, width}, {2 * d + off, width}}));
    KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* pb, w.Get(p + "attn.c_proj.bias", {d}));
    if (r == 0) {
      KRAKEN_ASSIGN_OR_RETURN(out->proj_b, Vector(pb));
    }
  }
  return absl::OkStatus();
}

Status TransformerModel::LoadShardedFfn(WeightLoader& w, const std::string& p, bool in_major, FfnWeights* out) {
  const ModelConfig& c = config_;
  const int W = options_.world_size, r = options_.rank;
  if (c.ffn_hidden % W != 0) {
    return InvalidArgument("FFN width ", c.ffn_hidden, " cannot be split over a world of size ", W,
                           " (it must be a multiple)");
  }
  const int64_t d = c.n_embd, f = c.ffn_hidden;
  const int width = static_cast<int>(f / W), off = r * width;
  std::vector<int64_t> fc_shape = in_major ? std::vector<int64_t>{d, f} : std::vector<int64_t>{f, d};
  std::vector<int64_t> proj_shape = in_major ? std::vector<int64_t>{f, d} : std::vector<int64_t>{d, f};
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* fc, w.Get(p + "mlp.c_fc.weight", fc_shape));
  KRAKEN_ASSIGN_OR_RETURN(out->fc, Linear({.tensor = fc, .in_major = in_major, .out_ranges = {{off, width}}}));
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* proj, w.Get(p + "mlp.c_proj.weight", proj_shape));
  KRAKEN_ASSIGN_OR_RETURN(out->proj,
                          Linear({.tensor = proj, .in_major = in_major, .in_begin = off, .in_count = width}));
  if (c.bias) {
    KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* fb, w.Get(p + "mlp.c_fc.bias", {f}));
    KRAKEN_ASSIGN_OR_RETURN(out->fc_b, Vector(fb, {{off, width}}));
    KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* pb, w.Get(p + "mlp.c_proj.bias", {d}));
    if (r == 0) {
      KRAKEN_ASSIGN_OR_RETURN(out->proj_b, Vector(pb));
    }
  }
  return absl::OkStatus();
}

StatusOr<Buffer> TransformerModel::Workspace(int64_t cols_per_token) {
  return Activations(static_cast<int64_t>(options_.max_tokens) * cols_per_token);
}

StatusOr<Buffer> TransformerModel::Activations(int64_t floats) {
  KRAKEN_ASSIGN_OR_RETURN(Buffer b, backend_->Allocate(floats));
  activation_bytes_ += floats * static_cast<int64_t>(sizeof(float));
  return b;
}

Status TransformerModel::LoadEmbeddingsAndHead(WeightLoader& w, const std::string& prefix) {
  const ModelConfig& c = config_;
  const int64_t V = c.vocab_size, P = c.n_positions, d = c.n_embd;
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* wte, w.Get(prefix + "wte.weight", {V, d}));
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* wpe, w.Get(prefix + "wpe.weight", {P, d}));
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* lnf_w, w.Get(prefix + "ln_f.weight", {d}));
  const TensorInfo* lnf_b = nullptr;
  if (c.bias) {
    KRAKEN_ASSIGN_OR_RETURN(lnf_b, w.Get(prefix + "ln_f.bias", {d}));
  }
  // The LM head is tied to wte; a separate lm_head.weight is accepted only if it is the same.
  KRAKEN_ASSIGN_OR_RETURN(const TensorInfo* head, w.GetOptional("lm_head.weight", {V, d}));
  if (head != nullptr && (head->dtype != wte->dtype || head->nbytes != wte->nbytes ||
                          std::memcmp(head->data, wte->data, wte->nbytes) != 0)) {
    return Unimplemented("tensor 'lm_head.weight' differs from '", prefix,
                         "wte.weight'; only a tied LM head is supported");
  }
  // One copy of wte in its stored dtype serves both the embedding lookup and the LM head.
  KRAKEN_ASSIGN_OR_RETURN(wte_, Linear({.tensor = wte}));
  KRAKEN_ASSIGN_OR_RETURN(wpe_, Vector(wpe));
  KRAKEN_ASSIGN_OR_RETURN(lnf_w_, Vector(lnf_w));
  KRAKEN_ASSIGN_OR_RETURN(lnf_b_, Vector(lnf_b));
  if (options_.compute_logits) {
    KRAKEN_ASSIGN_OR_RETURN(logits_, Activations(static_cast<int64_t>(options_.max_logit_rows) * V));
    KRAKEN_ASSIGN_OR_RETURN(final_norm_, Activations(static_cast<int64_t>(options_.max_logit_rows) * d));
    if (!backend_->is_host()) host_logits_.resize(static_cast<size_t>(options_.max_logit_rows) * V);
  }
  return absl::OkStatus();
}

namespace {

// One sequence of a step against the model and the KV pool: tokens in the vocabulary, positions
// within the context, a block table that covers them with blocks of the pool. INVALID_ARGUMENT
// naming sequence `i` and what is wrong otherwise.
Status CheckSequence(int i, const SequenceInput& s, const ModelConfig& c, const KvCache& kv) {
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  const int bs = kv.block_size();
  if (n == 0) return InvalidArgument("sequence ", i, ": 'tokens' is empty; a step adds at least one token");
  if (s.start_pos < 0) return InvalidArgument("sequence ", i, ": 'start_pos' must be >= 0, got ", s.start_pos);
  if (s.start_pos + n > c.n_positions) {
    return InvalidArgument("sequence ", i, ": positions up to ", s.start_pos + n - 1,
                           " exceed the context length (n_positions = ", c.n_positions, ")");
  }
  const int64_t blocks_needed = (s.start_pos + n + bs - 1) / bs;
  if (static_cast<int64_t>(s.block_table.size()) < blocks_needed) {
    return InvalidArgument("sequence ", i, ": 'block_table' has ", s.block_table.size(), " blocks; ", blocks_needed,
                           " are needed for ", s.start_pos + n, " tokens of block size ", bs);
  }
  for (int64_t j = 0; j < blocks_needed; ++j) {
    if (s.block_table[j] < 0 || s.block_table[j] >= kv.num_blocks()) {
      return InvalidArgument("sequence ", i, ": block_table[", j, "] = ", s.block_table[j], " is outside [0, ",
                             kv.num_blocks(), ")");
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    if (s.tokens[j] < 0 || s.tokens[j] >= c.vocab_size) {
      return InvalidArgument("sequence ", i, ": token ", j, " = ", s.tokens[j], " is outside the vocabulary [0, ",
                             c.vocab_size, ")");
    }
  }
  return absl::OkStatus();
}

// A block this step writes must belong to that sequence alone: otherwise one sequence would read
// another's keys and its result would depend on its batch mates. (Blocks only read, such as a
// shared prompt prefix, may appear in several tables.) `block_writer`: scratch of one entry per
// block, all -1 between calls. INVALID_ARGUMENT naming the two sequences and the block otherwise.
Status CheckBlockOwnership(const ForwardBatch& batch, const KvCache& kv, std::vector<int32_t>& block_writer) {
  const int n_seqs = static_cast<int>(batch.seqs.size());
  const int bs = kv.block_size();
  if (block_writer.size() != static_cast<size_t>(kv.num_blocks())) block_writer.assign(kv.num_blocks(), -1);
  Status conflict = absl::OkStatus();
  for (int i = 0; i < n_seqs && conflict.ok(); ++i) {
    const SequenceInput& s = batch.seqs[i];
    const int64_t first = s.start_pos / bs, last = (s.start_pos + static_cast<int64_t>(s.tokens.size()) - 1) / bs;
    for (int64_t j = first; j <= last; ++j) {
      int32_t& w = block_writer[s.block_table[j]];
      if (w >= 0 && w != i) {
        conflict = InvalidArgument("sequences ", w, " and ", i, " both write KV block ", s.block_table[j]);
        break;
      }
      w = i;
    }
  }
  for (int i = 0; i < n_seqs && conflict.ok(); ++i) {
    const SequenceInput& s = batch.seqs[i];
    const int64_t used = (s.start_pos + static_cast<int64_t>(s.tokens.size()) + bs - 1) / bs;
    for (int64_t j = 0; j < used; ++j) {
      const int32_t w = block_writer[s.block_table[j]];
      if (w >= 0 && w != i) {
        conflict = InvalidArgument("sequence ", i, " reads KV block ", s.block_table[j], " that sequence ", w,
                                   " writes in the same step");
        break;
      }
    }
  }
  for (const SequenceInput& s : batch.seqs) {  // leave the table clean for the next step
    const int64_t used = (s.start_pos + static_cast<int64_t>(s.tokens.size()) + bs - 1) / bs;
    for (int64_t j = s.start_pos / bs; j < used; ++j) block_writer[s.block_table[j]] = -1;
  }
  return conflict;
}

}  // namespace

Status TransformerModel::PrepareStep(const ForwardBatch& batch, const KvCache& kv) {
  const ModelConfig& c = config_;
  if (batch.seqs.empty()) return InvalidArgument("batch has no sequences");
  if (batch.seqs.size() > static_cast<size_t>(options_.max_seqs)) {
    return InvalidArgument("batch has ", batch.seqs.size(), " sequences; the limit (max_seqs) is ", options_.max_seqs);
  }
  const int n_seqs = static_cast<int>(batch.seqs.size());
  const KvLayout& kl = kv.layout();
  if (kl.slots != kv_layout_.slots || kl.heads != kv_layout_.heads || kl.head_dim != kv_layout_.head_dim) {
    return InvalidArgument("KV cache layout does not match this model shard's kv_layout()");
  }
  int64_t total = 0, rows = 0;
  const int bs = kv.block_size();
  for (int i = 0; i < n_seqs; ++i) {
    const SequenceInput& s = batch.seqs[i];
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    KRAKEN_RETURN_IF_ERROR(CheckSequence(i, s, c, kv));
    total += n;
    rows += s.all_logits ? n : 1;
  }
  KRAKEN_RETURN_IF_ERROR(CheckBlockOwnership(batch, kv, block_writer_));
  if (total > options_.max_tokens) {
    return InvalidArgument("batch has ", total, " new tokens; the limit (max_tokens) is ", options_.max_tokens);
  }
  if (rows > options_.max_logit_rows) {
    return InvalidArgument("batch asks for ", rows, " logit rows; the limit (max_logit_rows) is ",
                           options_.max_logit_rows);
  }
  tokens_.clear();
  positions_.clear();
  logit_rows_.clear();
  seqs_.clear();
  for (const SequenceInput& s : batch.seqs) {
    const int32_t begin = static_cast<int32_t>(tokens_.size());
    const int32_t n = static_cast<int32_t>(s.tokens.size());
    for (int32_t j = 0; j < n; ++j) {
      tokens_.push_back(s.tokens[j]);
      positions_.push_back(s.start_pos + j);
      if (s.all_logits || j == n - 1) logit_rows_.push_back(begin + j);
    }
    seqs_.push_back({begin, n, s.start_pos, s.block_table.data()});
  }
  num_tokens_ = static_cast<int>(total);
  attention_batch_ = {seqs_, bs};
  return absl::OkStatus();
}

StatusOr<ForwardResult> TransformerModel::Forward(const ForwardBatch& batch, KvCache& kv, Communicator& comm) {
  if (comm.world_size() != options_.world_size || comm.rank() != options_.rank) {
    return InvalidArgument("communicator is rank ", comm.rank(), " of ", comm.world_size(),
                           " but the model was loaded as rank ", options_.rank, " of ", options_.world_size);
  }
  KRAKEN_RETURN_IF_ERROR(PrepareStep(batch, kv));
  KRAKEN_RETURN_IF_ERROR(RunLayers(kv, comm));
  KRAKEN_RETURN_IF_ERROR(backend_->Synchronize());
  ForwardResult r;
  if (!options_.compute_logits) return r;
  r.rows = logit_rows();
  r.vocab = config_.vocab_size;
  if (backend_->is_host()) {
    r.logits = logits_.data();
  } else {
    backend_->Download(logits_.data(), host_logits_.data(), static_cast<int64_t>(r.rows) * r.vocab);
    r.logits = host_logits_.data();
  }
  return r;
}

void TransformerModel::EmbedTokens(Mat out) {
  backend_->Embed(tokens_.data(), positions_.data(), *wte_, wpe_.data(), out);
}

void TransformerModel::SelfAttention(const AttentionWeights& w, Mat normed, const KvSlot& slot, Mat qkv, Mat attn) {
  const int width = slot.heads * slot.head_dim;
  backend_->Linear(normed, *w.qkv, w.qkv_b.data(), qkv, /*accumulate=*/false);
  const Mat q = qkv.ColRange(0, width), k = qkv.ColRange(width, width), v = qkv.ColRange(2 * width, width);
  backend_->WriteKv(k, v, slot, attention_batch_);
  backend_->Attention(q, slot, attention_batch_, 1.0f / std::sqrt(static_cast<float>(slot.head_dim)), attn);
}

void TransformerModel::FeedForward(const FfnWeights& w, Mat normed, Mat hidden, Mat out, bool accumulate,
                                   bool add_bias) {
  backend_->Linear(normed, *w.fc, w.fc_b.data(), hidden, /*accumulate=*/false);
  backend_->GeluTanh(hidden);
  backend_->Linear(hidden, *w.proj, add_bias ? w.proj_b.data() : nullptr, out, accumulate);
}

Status TransformerModel::ReduceIntoResidual(Communicator& comm, Mat partial, Mat residual) {
  KRAKEN_CHECK(partial.stride == partial.cols, "collective buffers must be contiguous");
  KRAKEN_ASSIGN_OR_RETURN(CollectiveHandle h,
                          comm.StartAllReduceSum(partial.data, static_cast<int64_t>(partial.rows) * partial.cols));
  KRAKEN_RETURN_IF_ERROR(comm.Wait(h));
  backend_->Add(residual, partial, residual);
  return absl::OkStatus();
}

Mat TransformerModel::GatherLogitRows(Mat hidden, Mat dst) {
  Mat rows = dst.RowRange(0, logit_rows());
  backend_->GatherRows(hidden, logit_rows_.data(), rows);
  return rows;
}

void TransformerModel::FinishLogits(Mat rows) {
  const int R = rows.rows;
  Mat normed(final_norm_.data(), R, config_.n_embd);
  backend_->LayerNorm(rows, lnf_w_.data(), lnf_b_.data(), config_.layer_norm_epsilon, normed);
  Dump("final_norm", -1, -1, normed);
  Mat logits(logits_.data(), R, config_.vocab_size);
  backend_->Linear(normed, *wte_, nullptr, logits, /*accumulate=*/false);
  Dump("logits", -1, -1, logits);
}

}  // namespace kraken::engine::models

namespace kraken::engine {

StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir, Backend* backend, const ModelOptions& options) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    return InvalidArgument("model options: rank ", options.rank, " is not in a world of size ", options.world_size);
  }
  if (options.max_tokens < 1 || options.max_tokens > kMaxStepTokens || options.max_seqs < 1 ||
      options.max_seqs > kMaxStepSeqs || options.max_logit_rows < 1 || options.max_logit_rows > kMaxStepTokens) {
    return InvalidArgument("model options: max_tokens (", options.max_tokens, ") and max_logit_rows (",
                           options.max_logit_rows, ") must be in [1, ", kMaxStepTokens, "], max_seqs (",
                           options.max_seqs, ") in [1, ", kMaxStepSeqs, "]");
  }
  KRAKEN_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  KRAKEN_ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(dir));
  StatusOr<std::unique_ptr<Model>> model;
  switch (config.arch) {
    case Architecture::kKraken:
      model = models::LoadKraken(config, *ckpt, backend, options);
      break;
    case Architecture::kGpt2:
      model = models::LoadGpt2(config, *ckpt, backend, options);
      break;
    case Architecture::kParallelBlock:
      model = models::LoadParallelBlock(config, *ckpt, backend, options);
      break;
  }
  if (!model.ok()) return Annotate(model.status(), "loading '" + dir + "'");
  return model;
}

StatusOr<DType> KvCacheDType(const std::string& name, const std::string& model_dir) {
  if (name == "auto") return WeightDType(model_dir);
  if (name == "f32") return DType::kF32;
  if (name == "bf16") return DType::kBF16;
  if (name == "f16") return DType::kF16;
  return InvalidArgument("--kv-cache-dtype must be auto, f32, bf16 or f16, got '", name, "'");
}

StatusOr<DType> WeightDType(const std::string& dir) {
  auto ckpt = Checkpoint::Open(dir);
  if (absl::IsNotFound(ckpt.status())) {
    // No weights (yet): what config.json declares, else Hugging Face's default, float32.
    KRAKEN_ASSIGN_OR_RETURN(const ModelConfig config, LoadModelConfig(dir));
    return config.declared_dtype.value_or(DType::kF32);
  }
  KRAKEN_RETURN_IF_ERROR(ckpt.status());
  const TensorInfo* wte = (*ckpt)->Find("transformer.wte.weight");
  if (wte == nullptr) wte = (*ckpt)->Find("wte.weight");
  if (wte == nullptr) return InvalidArgument("'", dir, "' has no token embedding 'transformer.wte.weight'");
  if (!IsComputeFloat(wte->dtype)) {
    return InvalidArgument("'", dir, "': the token embedding is ", DTypeName(wte->dtype), ", not F32, BF16 or F16");
  }
  return wte->dtype;
}

}  // namespace kraken::engine
