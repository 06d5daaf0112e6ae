#include "runtime/protocol.h"

namespace kraken::runtime {
namespace {
constexpr int32_t kSlotsPerBias = sizeof(engine::TokenBias) / sizeof(int32_t);
}  // namespace

Status PlanWriter::Check(std::span<const SeqStep> seqs) const {
  int64_t tokens = 0, history = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqStep& s = seqs[i];
    tokens += static_cast<int64_t>(s.tokens.size());
    history += static_cast<int64_t>(s.history_prompt.size() + s.history_generated.size() + s.banned.size() +
                                    kSlotsPerBias * s.logit_bias.size());
    if (s.tokens.empty()) return InvalidArgument("sequence ", i, ": no tokens");
    if (s.block_table.size() > static_cast<size_t>(limits_.max_blocks_per_seq)) {
      return InvalidArgument("sequence ", i, ": block table of ", s.block_table.size(), " blocks exceeds the limit ",
                             limits_.max_blocks_per_seq);
    }
  }
  if (seqs.empty() || seqs.size() > static_cast<size_t>(limits_.max_seqs) || tokens > limits_.max_tokens ||
      history > limits_.max_history) {
    return InvalidArgument("step of ", seqs.size(), " sequences, ", tokens, " tokens, ", history,
                           " history tokens exceeds the limits (", limits_.max_seqs, ", ", limits_.max_tokens, ", ",
                           limits_.max_history, ") or is empty");
  }
  return absl::OkStatus();
}

void PlanWriter::Write(uint64_t step, std::span<const SeqStep> seqs) {
  PlanSeq* ps = At<PlanSeq>(base_, layout_.plan_seqs);
  int32_t* tok = At<int32_t>(base_, layout_.tokens);
  int32_t* blk = At<int32_t>(base_, layout_.blocks);
  int32_t* hist = At<int32_t>(base_, layout_.history);
  int32_t t_at = 0, b_at = 0, h_at = 0;
  // Appends `v` to the array at `dst`, advancing `at`; returns where it went.
  auto put = [](int32_t* dst, int32_t* at, std::span<const int32_t> v) {
    const int32_t here = *at;
    std::memcpy(dst + here, v.data(), v.size_bytes());
    *at += static_cast<int32_t>(v.size());
    return here;
  };
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqStep& s = seqs[i];
    PlanSeq& p = ps[i];
    p = PlanSeq{};
    p.seq_id = s.seq_id;
    p.num_tokens = static_cast<int32_t>(s.tokens.size());
    p.token_offset = put(tok, &t_at, s.tokens);
    p.start_pos = s.start_pos;
    p.num_blocks = static_cast<int32_t>(s.block_table.size());
    p.block_offset = put(blk, &b_at, s.block_table);
    p.history_prompt = static_cast<int32_t>(s.history_prompt.size());
    p.history_generated = static_cast<int32_t>(s.history_generated.size());
    p.history_banned = static_cast<int32_t>(s.banned.size());
    p.history_offset = put(hist, &h_at, s.history_prompt);
    put(hist, &h_at, s.history_generated);
    put(hist, &h_at, s.banned);
    p.history_bias = static_cast<int32_t>(s.logit_bias.size());
    std::memcpy(hist + h_at, s.logit_bias.data(), s.logit_bias.size_bytes());  // TokenBias objects, as they are
    h_at += static_cast<int32_t>(kSlotsPerBias * s.logit_bias.size());
    p.draw_index = s.draw_index;
    p.sample = s.sample ? 1 : 0;
    p.prompt_logprobs = s.prompt_logprobs ? 1 : 0;
    p.next_token = s.prompt_logprobs ? s.next_token : -1;
    p.sampling = s.sampling;
  }
  *At<PlanHeader>(base_, layout_.plan_header) = PlanHeader{.step = step,
                                                           .kind = StepKind::kForward,
                                                           .num_seqs = static_cast<int32_t>(seqs.size()),
                                                           .num_tokens = t_at,
                                                           .num_block_ids = b_at,
                                                           .num_history = h_at};
}

PlanHeader PlanReader::header() const {
  return *At<PlanHeader>(base_, layout_.plan_header);
}

Status PlanReader::Check(const PlanHeader& p) const {
  if (p.num_seqs < 0 || p.num_seqs > limits_.max_seqs || p.num_tokens < 0 || p.num_tokens > limits_.max_tokens ||
      p.num_block_ids < 0 || p.num_block_ids > limits_.max_seqs * limits_.max_blocks_per_seq || p.num_history < 0 ||
      p.num_history > limits_.max_history) {
    return InvalidArgument("step plan header exceeds the segment's limits");
  }
  const PlanSeq* seqs = At<PlanSeq>(base_, layout_.plan_seqs);
  for (int i = 0; i < p.num_seqs; ++i) {
    const PlanSeq& s = seqs[i];
    const bool ok = s.token_offset >= 0 && s.num_tokens >= 1 && s.token_offset + s.num_tokens <= p.num_tokens &&
                    s.block_offset >= 0 && s.num_blocks >= 0 && s.block_offset + s.num_blocks <= p.num_block_ids &&
                    s.history_offset >= 0 && s.history_prompt >= 0 && s.history_generated >= 0 &&
                    s.history_banned >= 0 && s.history_bias >= 0 &&
                    int64_t{s.history_offset} + s.history_prompt + s.history_generated + s.history_banned +
                            int64_t{kSlotsPerBias} * s.history_bias <=
                        p.num_history;
    if (!ok) return InvalidArgument("step plan sequence ", i, " points outside the plan's arrays");
  }
  return absl::OkStatus();
}

PlannedSeq PlanReader::seq(const PlanHeader&, int i) const {
  const PlanSeq& s = At<PlanSeq>(base_, layout_.plan_seqs)[i];
  const int32_t* tokens = At<int32_t>(base_, layout_.tokens);
  const int32_t* blocks = At<int32_t>(base_, layout_.blocks);
  const int32_t* h = At<int32_t>(base_, layout_.history) + s.history_offset;
  auto view = [](const int32_t* p, int32_t n) { return std::span<const int32_t>(p, static_cast<size_t>(n)); };
  return PlannedSeq{
      .plan = &s,
      .tokens = view(tokens + s.token_offset, s.num_tokens),
      .block_table = view(blocks + s.block_offset, s.num_blocks),
      .history = {view(h, s.history_prompt), view(h + s.history_prompt, s.history_generated),
                  view(h + s.history_prompt + s.history_generated, s.history_banned),
                  std::span<const engine::TokenBias>(reinterpret_cast<const engine::TokenBias*>(
                                                         h + s.history_prompt + s.history_generated + s.history_banned),
                                                     static_cast<size_t>(s.history_bias))}};
}

}  // namespace kraken::runtime
