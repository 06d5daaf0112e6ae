#include "core/validation.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "engine/sampler.h"
#include "tokenizer/utf8.h"

namespace kraken::core {
namespace {

Status Bad(const std::string& field, const std::string& what) {
  return FieldError(field, what);
}

uint64_t FreshSeed() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

// The prompt as ids, with its text (decoded when ids were given).
Status ValidatePrompt(const GenerationRequest& req, const RequestLimits& lim, const tokenizer::Tokenizer& tok,
                      const FieldNames& names, RequestParams* p) {
  if (req.text.has_value() && req.token_ids.has_value())
    return Bad(names.text, StrCat("and '", names.token_ids, "' must not both be given"));
  if (req.text.has_value()) {
    const std::string& text = *req.text;
    if (text.empty()) return Bad(names.text, "must not be empty");
    if (static_cast<int64_t>(text.size()) > lim.max_prompt_bytes)
      return Bad(names.text, StrCat("must be at most ", lim.max_prompt_bytes, " bytes, got ", text.size()));
    size_t bad_at = 0;
    if (!tokenizer::IsValidUtf8(text, &bad_at))
      return Bad(names.text, StrCat("is not valid UTF-8 (first invalid byte at offset ", bad_at, ")"));
    KRAKEN_ASSIGN_OR_RETURN(p->prompt, tok.Encode(text, /*parse_special=*/true, req.add_special_tokens));
    if (p->prompt.empty()) return Bad(names.text, "gives no tokens");
    p->prompt_text = text;
  } else if (req.token_ids.has_value()) {
    const std::vector<int64_t>& ids = *req.token_ids;
    if (ids.empty()) return Bad(names.token_ids, "must not be empty");
    if (ids.size() >= static_cast<size_t>(lim.context_length))
      return Bad(names.token_ids, StrCat("has ", ids.size(), " tokens; the context length is ", lim.context_length,
                                         " and at least one token must be left to generate"));
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= lim.vocab_size)
        return Bad(StrCat(names.token_ids, "[", i, "]"), StrCat("must be in [0, ", lim.vocab_size, "), got ", ids[i]));
    p->prompt.assign(ids.begin(), ids.end());
    KRAKEN_ASSIGN_OR_RETURN(p->prompt_text, tok.Decode(p->prompt, /*skip_special=*/false));
  } else {
    return names.text == names.token_ids
               ? Bad(names.text, "must be set")
               : Bad("prompt", StrCat("must be set: give '", names.text, "' or '", names.token_ids, "'"));
  }
  if (static_cast<int>(p->prompt.size()) >= lim.context_length)
    return Bad(names.text, StrCat("is ", p->prompt.size(), " tokens; the context length is ", lim.context_length,
                                  " and at least one token must be left to generate"));
  return absl::OkStatus();
}

// max_tokens (clamped to the context) and min_tokens.
Status ValidateLengths(const GenerationRequest& req, const RequestLimits& lim, const FieldNames& names,
                       RequestParams* p) {
  const uint32_t room = static_cast<uint32_t>(lim.context_length - static_cast<int>(p->prompt.size()));
  int64_t max_tokens = req.max_tokens.value_or(lim.default_max_tokens);
  if (max_tokens < 0) return Bad("max_tokens", StrCat("must be >= 0, got ", max_tokens));
  if (max_tokens > room) {
    max_tokens = room;
    p->clamped = true;
  }
  p->max_tokens = static_cast<uint32_t>(max_tokens);
  if (req.min_tokens < 0) return Bad(names.min_tokens, StrCat("must be >= 0, got ", req.min_tokens));
  if (req.min_tokens > max_tokens)
    return Bad(names.min_tokens,
               StrCat("must be <= max_tokens (", max_tokens, " after fitting the context), got ", req.min_tokens));
  p->min_tokens = static_cast<uint32_t>(req.min_tokens);
  return absl::OkStatus();
}

// Sampling; the engine's validator names the field, range and value.
Status ValidateSampling(const GenerationRequest& req, const RequestLimits& lim, const FieldNames& names,
                        RequestParams* p) {
  engine::SamplingParams s;
  s.temperature = static_cast<float>(req.temperature.value_or(lim.default_temperature));
  const int64_t top_k = req.top_k.value_or(0);
  if (top_k < -1 || top_k > std::numeric_limits<int32_t>::max())
    return Bad("top_k",
               StrCat("must be in [-1, ", std::numeric_limits<int32_t>::max(), "] (0 or -1 = off), got ", top_k));
  s.top_k = static_cast<int32_t>(top_k);
  s.top_p = static_cast<float>(req.top_p.value_or(lim.default_top_p));
  s.min_p = static_cast<float>(req.min_p.value_or(0.0));
  s.typical_p = static_cast<float>(req.typical_p.value_or(1.0));
  s.repetition_penalty = static_cast<float>(req.repetition_penalty.value_or(1.0));
  s.presence_penalty = static_cast<float>(req.presence_penalty.value_or(0.0));
  s.frequency_penalty = static_cast<float>(req.frequency_penalty.value_or(0.0));
  if (req.top_logprobs < 0 || req.top_logprobs > lim.max_top_logprobs)
    return Bad(names.top_logprobs, StrCat("must be in [0, ", lim.max_top_logprobs, "], got ", req.top_logprobs));
  s.top_logprobs = static_cast<int32_t>(req.top_logprobs);
  s.seed = req.seed.has_value() ? *req.seed : FreshSeed();
  // The engine's refusal names its own field; the request's is the same name.
  if (Status v = engine::ValidateSamplingParams(s, lim.vocab_size); !v.ok())
    return ErrorField(v) ? FieldError(*ErrorField(v), ErrorDetail(v)) : v;
  p->sampling = s;
  return absl::OkStatus();
}

Status ValidateStops(const GenerationRequest& req, const RequestLimits& lim, RequestParams* p) {
  if (static_cast<int64_t>(req.stop.size()) > lim.max_stop_strings)
    return Bad("stop", StrCat("may hold at most ", lim.max_stop_strings, " strings, got ", req.stop.size()));
  for (size_t i = 0; i < req.stop.size(); ++i) {
    const std::string& st = req.stop[i];
    const std::string field = StrCat("stop[", i, "]");
    if (st.empty()) return Bad(field, "must not be empty");
    if (static_cast<int64_t>(st.size()) > lim.max_stop_string_bytes)
      return Bad(field, StrCat("must be at most ", lim.max_stop_string_bytes, " bytes, got ", st.size()));
    if (!tokenizer::IsValidUtf8(st)) return Bad(field, "is not valid UTF-8");
    p->stop.push_back(st);
  }
  if (static_cast<int64_t>(req.stop_token_ids.size()) > lim.max_stop_token_ids)
    return Bad("stop_token_ids",
               StrCat("may hold at most ", lim.max_stop_token_ids, " ids, got ", req.stop_token_ids.size()));
  for (size_t i = 0; i < req.stop_token_ids.size(); ++i) {
    const int64_t id = req.stop_token_ids[i];
    if (id < 0 || id >= lim.vocab_size)
      return Bad(StrCat("stop_token_ids[", i, "]"), StrCat("must be in [0, ", lim.vocab_size, "), got ", id));
    p->stop_token_ids.push_back(static_cast<int32_t>(id));
  }
  if (!req.ignore_eos && lim.eos_token_id >= 0) p->stop_token_ids.push_back(lim.eos_token_id);
  return absl::OkStatus();
}

// OpenAI's logit_bias: at most kMaxLogitBias tokens of the vocabulary, each bias in [-100, 100].
Status ValidateLogitBias(const GenerationRequest& req, const RequestLimits& lim, RequestParams* p) {
  if (req.logit_bias.size() > static_cast<size_t>(engine::kMaxLogitBias))
    return Bad("logit_bias",
               StrCat("may hold at most ", engine::kMaxLogitBias, " tokens, got ", req.logit_bias.size()));
  for (const auto& [id, bias] : req.logit_bias) {
    if (id < 0 || id >= lim.vocab_size)
      return Bad("logit_bias", StrCat("holds token ", id, ", outside the vocabulary [0, ", lim.vocab_size, ")"));
    if (!(std::fabs(bias) <= engine::kMaxLogitBiasValue))
      return Bad("logit_bias", StrCat("gives token ", id, " the bias ", bias, "; biases must be in [-",
                                      engine::kMaxLogitBiasValue, ", ", engine::kMaxLogitBiasValue, "]"));
    p->logit_bias.push_back({static_cast<int32_t>(id), static_cast<float>(bias)});
  }
  // One bias per token, the last one given ("5" and "05" name the same token), in token order.
  std::stable_sort(p->logit_bias.begin(), p->logit_bias.end(),
                   [](const engine::TokenBias& a, const engine::TokenBias& b) { return a.token < b.token; });
  std::vector<engine::TokenBias> merged;
  for (const engine::TokenBias& b : p->logit_bias) {
    if (!merged.empty() && merged.back().token == b.token)
      merged.back() = b;
    else
      merged.push_back(b);
  }
  p->logit_bias = std::move(merged);
  return absl::OkStatus();
}

}  // namespace

StatusOr<RequestParams> ValidateGeneration(const GenerationRequest& req, const RequestLimits& lim,
                                           const tokenizer::Tokenizer& tok, const FieldNames& names) {
  RequestParams p;
  p.request_id = req.request_id;
  if (static_cast<int64_t>(req.request_id.size()) > lim.max_request_id_bytes)
    return Bad("request_id",
               StrCat("must be at most ", lim.max_request_id_bytes, " bytes, got ", req.request_id.size()));
  if (!tokenizer::IsValidUtf8(req.request_id)) return Bad("request_id", "is not valid UTF-8");
  KRAKEN_RETURN_IF_ERROR(ValidatePrompt(req, lim, tok, names, &p));
  KRAKEN_RETURN_IF_ERROR(ValidateLengths(req, lim, names, &p));
  KRAKEN_RETURN_IF_ERROR(ValidateSampling(req, lim, names, &p));
  KRAKEN_RETURN_IF_ERROR(ValidateStops(req, lim, &p));
  KRAKEN_RETURN_IF_ERROR(ValidateLogitBias(req, lim, &p));
  if (req.priority < std::numeric_limits<int32_t>::min() || req.priority > std::numeric_limits<int32_t>::max())
    return Bad("priority", StrCat("must fit in 32 bits, got ", req.priority));
  p.logprobs = req.logprobs || req.top_logprobs > 0;
  p.echo = req.echo;
  p.prompt_logprobs = req.prompt_logprobs;
  p.skip_special = req.skip_special_tokens.value_or(true);
  p.priority = static_cast<int>(req.priority);
  const int64_t n = req.n.value_or(1);
  if (n < 1 || n > lim.max_n) return Bad("n", StrCat("must be in [1, ", lim.max_n, "], got ", n));
  p.n = static_cast<uint32_t>(n);
  return p;
}

}  // namespace kraken::core
