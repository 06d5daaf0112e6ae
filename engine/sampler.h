// Token sampling from one sequence's logits, reproducible per sequence.
//
//   Sampler sampler(vocab);
//   SamplingParams p{.temperature = 0.8f, .top_p = 0.95f, .seed = 42};
//   KRAKEN_RETURN_IF_ERROR(ValidateSamplingParams(p, vocab));
//   KRAKEN_ASSIGN_OR_RETURN(SampledToken t, sampler.Sample(logits_row, p, {prompt, generated}));
//
// Order of processing (Hugging Face's, and vLLM V0's): penalties -> temperature -> top-k ->
// top-p -> min-p -> typical-p -> draw. temperature 0 is greedy (ties go to the lowest id). top-k keeps every
// token tied with the k-th. The random number of the k-th generated token is a pure function of
// (seed, k) — splitmix64 (Steele, Lea, Flood, OOPSLA 2014) — so a sequence's tokens never depend
// on its batch mates; a caller with no seed of its own must draw one (the server draws a fresh
// seed per request and reports it). Log-probabilities are those of the model's raw
// distribution, log_softmax(logits), before penalties, temperature and truncation.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "base/status.h"

namespace kraken::engine {

/// Most alternatives a caller may ask for per token.
inline constexpr int kMaxTopLogprobs = 20;
/// Most alternatives reported per token: the top_logprobs most likely, plus the sampled (or
/// scored) token itself when it is not among them, as OpenAI's completions API and vLLM report
/// them ("up to logprobs + 1 elements", OpenAI API reference, completions `logprobs`).
inline constexpr int kMaxReportedLogprobs = kMaxTopLogprobs + 1;

/// How one sequence's next token is drawn: the one sampling type of the project. The server fills
/// and validates it, the dispatch segment carries it unchanged (runtime/protocol.h PlanSeq) and
/// the sampler reads it, so it is standard layout with fixed-width fields and no implicit padding
/// (checked below): a new field is added here, in ValidateSamplingParams and in Sample, and
/// nowhere else in the engine or the runtime. Defaults are the "off" values.
struct SamplingParams {
  float temperature = 1.0f;         // >= 0; 0 = greedy
  int32_t top_k = 0;                // 0 or -1 = off; > V behaves as V
  float top_p = 1.0f;               // (0, 1]; 1 = off
  float min_p = 0.0f;               // [0, 1]; 0 = off; drops p < min_p * p_max
  float repetition_penalty = 1.0f;  // > 0; 1 = off; over prompt + output (CTRL, Keskar et al. 2019)
  float presence_penalty = 0.0f;    // [-2, 2]; subtracted once per token seen in the output (OpenAI)
  float frequency_penalty = 0.0f;   // [-2, 2]; subtracted per occurrence in the output (OpenAI)
  int32_t top_logprobs = 0;         // alternatives to report, [0, kMaxTopLogprobs]
  float typical_p = 1.0f;           // (0, 1]; 1 = off; locally typical sampling (Meister et al., TACL 2023)
  uint32_t reserved = 0;            // keeps `seed` 8-byte aligned without implicit padding
  uint64_t seed = 0;                // the stream of random numbers; see the header comment
};
static_assert(std::is_standard_layout_v<SamplingParams> && std::is_trivially_copyable_v<SamplingParams>,
              "SamplingParams crosses process boundaries in shared memory as it is");
static_assert(sizeof(SamplingParams) == 48 && offsetof(SamplingParams, seed) == 40,
              "SamplingParams has no implicit padding: keep 4-byte fields before the 8-byte seed, in pairs");

/// True when the penalties need the sequence's token history (prompt and output).
inline bool NeedsHistory(const SamplingParams& p) {
  return p.repetition_penalty != 1.f || p.presence_penalty != 0.f || p.frequency_penalty != 0.f;
}

/// INVALID_ARGUMENT naming the field, its allowed range and the value: NaN/inf anywhere,
/// temperature < 0, top_p or typical_p outside (0, 1], min_p outside [0, 1], repetition_penalty <= 0,
/// presence/frequency outside [-2, 2], top_k < -1, top_logprobs outside [0, 20].
Status ValidateSamplingParams(const SamplingParams& p, int vocab);

/// Most logit_bias entries one request may carry (OpenAI's limit).
inline constexpr int kMaxLogitBias = 300;
/// The largest |bias| (OpenAI's range: a bias of -100 bans a token in practice, +100 forces it).
inline constexpr float kMaxLogitBiasValue = 100.f;

/// A value added to one token's logit before penalties and truncation (OpenAI's logit_bias).
/// Standard layout: the dispatch segment carries it as it is (runtime/protocol.h).
struct TokenBias {
  int32_t token = 0;
  float bias = 0.f;
};
static_assert(std::is_standard_layout_v<TokenBias> && sizeof(TokenBias) == 8, "TokenBias crosses processes");

/// The tokens a sequence has seen, for penalties.
struct TokenHistory {
  std::span<const int32_t> prompt;
  std::span<const int32_t> generated;
  /// Tokens that may not be drawn this step (EOS and stop ids while min_tokens is not reached):
  /// their weight becomes -inf after penalties. Ignored when it would leave nothing to draw.
  std::span<const int32_t> banned;
  /// Added to the logits first, before penalties (vLLM's order: logits processors, then
  /// penalties). Ids outside [0, vocab) and non-finite biases are ignored (the server refuses them).
  std::span<const TokenBias> logit_bias;
};

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.f;
};

struct SampledToken {
  int32_t token = 0;
  float logprob = 0.f;  // of `token` under log_softmax(logits)
  // The `top_logprobs` most likely tokens, most likely first (ties by id), then `token` itself
  // when it is not among them; empty when top_logprobs is 0. num_top <= top_logprobs + 1.
  std::array<TokenLogprob, kMaxReportedLogprobs> top{};
  int num_top = 0;
};

/// Uniform double in [0, 1) for the `index`-th draw of stream `seed` (53 random bits).
double UniformForIndex(uint64_t seed, uint64_t index);

class Sampler {
 public:
  /// Allocates scratch for a vocabulary of `vocab` tokens; Sample then allocates nothing.
  explicit Sampler(int vocab);

  /// Picks the next token from `logits` [vocab]. The random draw is number `draw_index` of the
  /// sequence's stream (default: history.generated.size(), the count of tokens generated so far).
  /// NaN logits count as -inf; if no logit is finite (or +inf is the only mass) the result is
  /// still well defined (+inf tokens win, lowest id first) or INVALID_ARGUMENT when every logit
  /// is -inf/NaN. Parameters are re-validated, so bad ones give an error, never a crash.
  StatusOr<SampledToken> Sample(const float* logits, const SamplingParams& p, const TokenHistory& history,
                                int64_t draw_index = -1);
  /// Scores a given `token` under `logits` [vocab] (a prompt token's logprob): its log-probability
  /// under log_softmax(logits) and the `top_logprobs` most likely tokens (plus `token` itself when
  /// it is not among them, as Sample adds the drawn one), computed exactly as Sample
  /// computes them for a drawn token, so a token scores the same bits whether it was drawn or given.
  /// INVALID_ARGUMENT for a token outside [0, vocab), top_logprobs outside [0, 20], or logits with
  /// no finite value.
  StatusOr<SampledToken> Score(const float* logits, int32_t token, int top_logprobs);

 private:
  // The raw distribution log_softmax(logits): its normaliser (+inf when +inf logits take all the
  // mass; `out->token` is then the first of them) and the top `top_logprobs` tokens into `*out`.
  // False when no logit is finite. Leaves the NaN-cleaned logits in work_.
  bool RawDistribution(const float* logits, int top_logprobs, SampledToken* out, float* log_z);
  static float RawLogprob(const float* logits, int32_t id, float log_z);
  // Appends out->token with out->logprob to the reported alternatives when some were asked for
  // and it is not among them.
  static void ReportChosen(SampledToken* out);
  // Typical-p over the n candidates order_[0, n) with weights w: reorders them, returns how many stay.
  int KeepTypical(const float* w, int n, float typical_p);
  // The stages of Sample, in order, each on the working logits work_ ([V]) and the candidate ids
  // order_: the logit biases; repetition, presence and frequency penalties over the history
  // (`logits`: the raw ones, to keep finite logits finite); banned ids to -inf unless nothing else is left; the
  // candidates (all V, or the top_k most likely and ties with the k-th, in (value, id) order), how many; the softmax at
  // `temperature` over the first n candidates in place, its unnormalised total; the nucleus of mass top_p, min-p's cut,
  // how many candidates stay; the draw for `index` of the sample's stream of `seed` (SplitMix64, see UniformForIndex).
  void ApplyBias(std::span<const TokenBias> bias);
  void ApplyPenalties(const float* logits, const SamplingParams& p, const TokenHistory& history);
  void Ban(std::span<const int32_t> banned);
  int TopKCandidates(int top_k);
  double Exponentiate(int n, float temperature);
  int KeepTopP(int n, bool sorted_already, double total, float top_p);
  int KeepMinP(int n, float min_p);
  int DrawFrom(int n, uint64_t seed, uint64_t index) const;

  int vocab_;
  std::vector<float> work_;                          // processed logits, then probabilities
  std::vector<int32_t> order_;                       // candidate ids
  std::vector<int32_t> counts_;                      // occurrences in the output, for penalties
  std::vector<uint8_t> seen_;                        // in prompt or output, for the repetition penalty
  std::vector<std::pair<double, int32_t>> typical_;  // (|surprisal - entropy|, id), for typical-p
};

}  // namespace kraken::engine
