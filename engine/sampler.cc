#include "engine/sampler.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <numeric>

namespace kraken::engine {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

Status CheckFinite(const char* field, float v) {
  if (!std::isfinite(v)) return ScopedFieldError("sampling ", field, "must be finite, got ", v);
  return absl::OkStatus();
}

// Higher value first; equal values by lower id (a total order, so results are reproducible).
struct ByValueThenId {
  const float* v;
  bool operator()(int32_t a, int32_t b) const { return v[a] > v[b] || (v[a] == v[b] && a < b); }
};

}  // namespace

double UniformForIndex(uint64_t seed, uint64_t index) {
  const uint64_t bits = SplitMix64(SplitMix64(seed) ^ index);
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

Status ValidateSamplingParams(const SamplingParams& p, int vocab) {
  KRAKEN_RETURN_IF_ERROR(CheckFinite("temperature", p.temperature));
  KRAKEN_RETURN_IF_ERROR(CheckFinite("top_p", p.top_p));
  KRAKEN_RETURN_IF_ERROR(CheckFinite("min_p", p.min_p));
  KRAKEN_RETURN_IF_ERROR(CheckFinite("typical_p", p.typical_p));
  KRAKEN_RETURN_IF_ERROR(CheckFinite("repetition_penalty", p.repetition_penalty));
  KRAKEN_RETURN_IF_ERROR(CheckFinite("presence_penalty", p.presence_penalty));
  KRAKEN_RETURN_IF_ERROR(CheckFinite("frequency_penalty", p.frequency_penalty));
  if (p.temperature < 0.f) return ScopedFieldError("sampling ", "temperature", "must be >= 0, got ", p.temperature);
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) {
    return ScopedFieldError("sampling ", "top_p", "must be in (0, 1], got ", p.top_p);
  }
  if (p.min_p < 0.f || p.min_p > 1.f) return ScopedFieldError("sampling ", "min_p", "must be in [0, 1], got ", p.min_p);
  if (!(p.typical_p > 0.f && p.typical_p <= 1.f)) {
    return ScopedFieldError("sampling ", "typical_p", "must be in (0, 1], got ", p.typical_p);
  }
  if (p.repetition_penalty <= 0.f) {
    return ScopedFieldError("sampling ", "repetition_penalty", "must be > 0, got ", p.repetition_penalty);
  }
  if (p.presence_penalty < -2.f || p.presence_penalty > 2.f) {
    return ScopedFieldError("sampling ", "presence_penalty", "must be in [-2, 2], got ", p.presence_penalty);
  }
  if (p.frequency_penalty < -2.f || p.frequency_penalty > 2.f) {
    return ScopedFieldError("sampling ", "frequency_penalty", "must be in [-2, 2], got ", p.frequency_penalty);
  }
  if (p.top_k < -1) return ScopedFieldError("sampling ", "top_k", "must be >= -1 (0 or -1 = off), got ", p.top_k);
  if (p.top_logprobs < 0 || p.top_logprobs > kMaxTopLogprobs) {
    return ScopedFieldError("sampling ", "top_logprobs", "must be in [0, ", kMaxTopLogprobs, "], got ", p.top_logprobs);
  }
  if (vocab <= 0) return InvalidArgument("vocabulary size must be > 0, got ", vocab);
  return absl::OkStatus();
}

int Sampler::KeepTypical(const float* w, int n, float typical_p) {
  // Locally typical sampling (Meister, Pimentel, Wiher, Cotterell, TACL 2023; as Hugging Face's
  // TypicalLogitsWarper): order the candidates by how far their surprisal -log q lies from the
  // entropy H of q (their renormalised distribution), closest first, ties by id, and keep them
  // until their probability reaches typical_p, the crossing one included.
  double z = 0.0;
  for (int i = 0; i < n; ++i) z += w[order_[i]];
  double entropy = 0.0;
  for (int i = 0; i < n; ++i) {
    const double q = w[order_[i]] / z;
    if (q > 0.0) entropy -= q * std::log(q);
  }
  typical_.clear();
  for (int i = 0; i < n; ++i) {
    const double q = w[order_[i]] / z;
    const double distance = q > 0.0 ? std::abs(-std::log(q) - entropy) : INFINITY;
    typical_.push_back({distance, order_[i]});
  }
  std::sort(typical_.begin(), typical_.end());
  double cum = 0.0;
  int keep = 0;
  while (keep < n) {
    order_[keep] = typical_[keep].second;
    cum += w[order_[keep]] / z;
    ++keep;
    if (cum >= typical_p) break;
  }
  return keep;
}

Sampler::Sampler(int vocab)
    : vocab_(std::max(vocab, 0)), work_(vocab_), order_(vocab_), counts_(vocab_, 0), seen_(vocab_, 0) {}

bool Sampler::RawDistribution(const float* logits, int top_logprobs, SampledToken* out, float* log_z) {
  const int V = vocab_;
  float* w = work_.data();
  // NaN -> -inf; +inf tokens take all the mass.
  float max_raw = kNegInf;
  int first_pos_inf = -1;
  for (int i = 0; i < V; ++i) {
    const float x = std::isnan(logits[i]) ? kNegInf : logits[i];
    w[i] = x;
    if (x == std::numeric_limits<float>::infinity() && first_pos_inf < 0) first_pos_inf = i;
    max_raw = std::max(max_raw, x);
  }
  *out = SampledToken{};
  if (max_raw == kNegInf) return false;
  if (first_pos_inf >= 0) {  // degenerate: no defined softmax; the first +inf token has it all
    out->token = first_pos_inf;
    *log_z = std::numeric_limits<float>::infinity();
    return true;
  }
  double sum_raw = 0.0;
  for (int i = 0; i < V; ++i) sum_raw += std::exp(static_cast<double>(w[i]) - max_raw);
  *log_z = static_cast<float>(max_raw + std::log(sum_raw));
  if (top_logprobs > 0) {
    const int n = std::min(top_logprobs, V);
    std::iota(order_.begin(), order_.end(), 0);
    std::partial_sort(order_.begin(), order_.begin() + n, order_.end(), ByValueThenId{w});
    for (int i = 0; i < n; ++i) out->top[i] = {order_[i], RawLogprob(logits, order_[i], *log_z)};
    out->num_top = n;
  }
  return true;
}

float Sampler::RawLogprob(const float* logits, int32_t id, float log_z) {
  const float x = std::isnan(logits[id]) ? kNegInf : logits[id];
  return x - log_z;
}

void Sampler::ReportChosen(SampledToken* out) {
  if (out->num_top == 0) return;
  for (int i = 0; i < out->num_top; ++i) {
    if (out->top[i].token == out->token) return;
  }
  out->top[out->num_top++] = {out->token, out->logprob};
}

StatusOr<SampledToken> Sampler::Score(const float* logits, int32_t token, int top_logprobs) {
  if (token < 0 || token >= vocab_)
    return InvalidArgument("token ", token, " is not in the vocabulary [0, ", vocab_, ")");
  if (top_logprobs < 0 || top_logprobs > kMaxTopLogprobs)
    return InvalidArgument("top_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", top_logprobs);
  SampledToken out;
  float log_z = 0.f;
  if (!RawDistribution(logits, top_logprobs, &out, &log_z))
    return InvalidArgument("logits hold no finite value (all -inf or NaN)");
  if (std::isinf(log_z)) {  // degenerate (+inf logits)
    out.logprob = token == out.token ? 0.f : kNegInf;
  } else {
    out.logprob = RawLogprob(logits, token, log_z);
  }
  out.token = token;
  ReportChosen(&out);
  return out;
}

void Sampler::ApplyBias(std::span<const TokenBias> bias) {
  float* w = work_.data();
  for (const TokenBias& b : bias) {
    // A -inf (or NaN-cleaned) logit stays ruled out; a finite one stays finite.
    if (b.token < 0 || b.token >= vocab_ || !std::isfinite(b.bias) || !std::isfinite(w[b.token])) continue;
    w[b.token] = std::clamp(w[b.token] + b.bias, -std::numeric_limits<float>::max(), std::numeric_limits<float>::max());
  }
}

void Sampler::ApplyPenalties(const float* logits, const SamplingParams& p, const TokenHistory& history) {
  const int V = vocab_;
  float* w = work_.data();
  const bool rep = p.repetition_penalty != 1.0f;
  const bool freq = p.presence_penalty != 0.f || p.frequency_penalty != 0.f;
  if (!rep && !freq) return;
  for (int32_t t : history.generated) {
    if (t >= 0 && t < V) ++counts_[t];
  }
  if (rep) {
    for (auto span : {history.prompt, history.generated}) {
      for (int32_t t : span) {
        if (t < 0 || t >= V || seen_[t]) continue;
        seen_[t] = 1;
        w[t] = w[t] > 0.f ? w[t] / p.repetition_penalty : w[t] * p.repetition_penalty;
      }
    }
  }
  for (int32_t t : history.generated) {
    if (t < 0 || t >= V || counts_[t] == 0) continue;
    if (freq) w[t] -= p.presence_penalty + p.frequency_penalty * static_cast<float>(counts_[t]);
    counts_[t] = 0;  // reset as we go; each distinct token is handled once
  }
  // A tiny repetition penalty can push a finite logit past the float range; keep it finite
  // so the softmax below stays defined.
  for (auto span : {history.prompt, history.generated}) {
    for (int32_t t : span) {
      if (t >= 0 && t < V && std::isinf(w[t]) && std::isfinite(logits[t])) {
        w[t] = std::copysign(std::numeric_limits<float>::max(), w[t]);
      }
    }
  }
  for (auto span : {history.prompt, history.generated}) {
    for (int32_t t : span) {
      if (t >= 0 && t < V) seen_[t] = 0;
    }
  }
}

void Sampler::Ban(std::span<const int32_t> banned) {
  const int V = vocab_;
  float* w = work_.data();
  if (banned.empty()) return;
  for (int32_t t : banned)
    if (t >= 0 && t < V) seen_[t] = 1;
  bool other = false;
  for (int i = 0; i < V && !other; ++i) other = !seen_[i] && w[i] != kNegInf;
  for (int32_t t : banned) {
    if (t < 0 || t >= V) continue;
    if (other) w[t] = kNegInf;
    seen_[t] = 0;
  }
}

int Sampler::TopKCandidates(int top_k) {
  const int V = vocab_;
  const float* w = work_.data();
  std::iota(order_.begin(), order_.end(), 0);
  if (top_k <= 0 || top_k >= V) return V;
  // The k most likely, plus every token tied with the k-th (as Hugging Face and vLLM keep all
  // logits >= the k-th largest), in (value, id) order.
  int n = top_k;
  std::partial_sort(order_.begin(), order_.begin() + n, order_.end(), ByValueThenId{w});
  const float kth = w[order_[n - 1]];
  auto tail = std::partition(order_.begin() + n, order_.end(), [&](int32_t id) { return w[id] == kth; });
  std::sort(order_.begin() + n, tail);
  return static_cast<int>(tail - order_.begin());
}

double Sampler::Exponentiate(int n, float temperature) {
  float* w = work_.data();
  float m = kNegInf;
  for (int i = 0; i < n; ++i) m = std::max(m, w[order_[i]]);
  const double inv_t = 1.0 / temperature;
  double total = 0.0;
  for (int i = 0; i < n; ++i) {
    const int id = order_[i];
    const double e = std::exp((static_cast<double>(w[id]) - m) * inv_t);
    w[id] = static_cast<float>(e);
    total += e;
  }
  return total;
}

int Sampler::KeepTopP(int n, bool sorted_already, double total, float top_p) {
  // Walk the candidates in (probability, id) order until their mass reaches top_p. Unless they
  // are sorted already (top-k), order them in growing slices (64, 256, ...): partial_sort of the
  // rest keeps the order exact, and a peaked distribution never sorts the whole vocabulary.
  const float* w = work_.data();
  double cum = 0.0;
  int keep = 0;
  int sorted = sorted_already ? n : 0;
  bool reached = false;
  while (!reached && keep < n) {
    if (keep == sorted) {
      const int next = std::min(n, std::max(64, sorted * 4));
      std::partial_sort(order_.begin() + sorted, order_.begin() + next, order_.begin() + n, ByValueThenId{w});
      sorted = next;
    }
    cum += w[order_[keep]] / total;
    ++keep;
    reached = cum >= top_p;
  }
  return keep;
}

int Sampler::KeepMinP(int n, float min_p) {
  const float* w = work_.data();
  float pmax = 0.f;
  for (int i = 0; i < n; ++i) pmax = std::max(pmax, w[order_[i]]);
  const float cut = min_p * pmax;
  int kept = 0;
  for (int i = 0; i < n; ++i) {
    if (w[order_[i]] >= cut) order_[kept++] = order_[i];
  }
  return kept;
}

int Sampler::DrawFrom(int n, uint64_t seed, uint64_t index) const {
  const float* w = work_.data();
  double mass = 0.0;
  int heaviest = order_[0];
  for (int i = 0; i < n; ++i) {
    mass += w[order_[i]];
    if (w[order_[i]] > w[heaviest]) heaviest = order_[i];
  }
  const double target = UniformForIndex(seed, index) * mass;
  double cum = 0.0;
  for (int i = 0; i < n; ++i) {
    cum += w[order_[i]];
    if (target < cum) return order_[i];
  }
  return heaviest;  // only if rounding leaves target at the very top of the mass
}

StatusOr<SampledToken> Sampler::Sample(const float* logits, const SamplingParams& p, const TokenHistory& history,
                                       int64_t draw_index) {
  KRAKEN_RETURN_IF_ERROR(ValidateSamplingParams(p, vocab_));
  const int V = vocab_;
  const float* w = work_.data();

  // Raw distribution (for logprobs); it leaves the working copy of the logits in work_.
  SampledToken out;
  float log_z = 0.f;
  if (!RawDistribution(logits, p.top_logprobs, &out, &log_z))
    return InvalidArgument("logits hold no finite value (all -inf or NaN)");
  if (std::isinf(log_z)) {  // degenerate: choose the first +inf token
    out.logprob = 0.f;
    return out;
  }
  ApplyBias(history.logit_bias);
  ApplyPenalties(logits, p, history);
  Ban(history.banned);

  int chosen = 0;
  if (p.temperature == 0.f) {
    for (int i = 1; i < V; ++i) {
      if (w[i] > w[chosen]) chosen = i;
    }
  } else {
    // Candidates, most likely first where truncation needs an order; then the truncations in
    // vLLM's order (top-k, top-p, min-p, typical-p), and one draw at the sample's own index.
    const bool top_k = p.top_k > 0 && p.top_k < V;
    int n = TopKCandidates(p.top_k);
    if (top_k && p.top_p < 1.f) std::sort(order_.begin(), order_.begin() + n, ByValueThenId{w});
    const double total = Exponentiate(n, p.temperature);
    if (p.top_p < 1.f) n = KeepTopP(n, /*sorted_already=*/top_k, total, p.top_p);
    if (p.min_p > 0.f) n = KeepMinP(n, p.min_p);
    if (p.typical_p < 1.f) n = KeepTypical(w, n, p.typical_p);
    const uint64_t index = draw_index >= 0 ? static_cast<uint64_t>(draw_index) : history.generated.size();
    chosen = DrawFrom(n, p.seed, index);
  }
  out.token = chosen;
  out.logprob = RawLogprob(logits, chosen, log_z);
  ReportChosen(&out);
  return out;
}

}  // namespace kraken::engine
