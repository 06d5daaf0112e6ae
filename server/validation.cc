#include "server/validation.h"

#include <cmath>
#include <random>

#include "engine/sampler.h"
#include "tokenizer/utf8.h"

namespace kraken::server {
namespace {

Status Bad(const std::string& field, const std::string& what) {
  return InvalidArgument("field '", field, "' ", what);
}

uint64_t FreshSeed() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

}  // namespace

StatusOr<core::RequestParams> ValidateGenerateRequest(const kraken::v1::GenerateRequest& req, const RequestLimits& lim,
                                                      const tokenizer::Tokenizer& tok) {
  core::RequestParams p;
  p.request_id = req.request_id();
  if (static_cast<int>(req.request_id().size()) > lim.max_request_id_bytes)
    return Bad("request_id",
               StrCat("must be at most ", lim.max_request_id_bytes, " bytes, got ", req.request_id().size()));
  if (!tokenizer::IsValidUtf8(req.request_id())) return Bad("request_id", "is not valid UTF-8");

  switch (req.prompt_case()) {
    case kraken::v1::GenerateRequest::kText: {
      const std::string& text = req.text();
      if (text.empty()) return Bad("text", "must not be empty");
      if (static_cast<int>(text.size()) > lim.max_prompt_bytes)
        return Bad("text", StrCat("must be at most ", lim.max_prompt_bytes, " bytes, got ", text.size()));
      size_t bad_at = 0;
      if (!tokenizer::IsValidUtf8(text, &bad_at))
        return Bad("text", StrCat("is not valid UTF-8 (first invalid byte at offset ", bad_at, ")"));
      KRAKEN_ASSIGN_OR_RETURN(p.prompt, tok.Encode(text));
      if (p.prompt.empty()) return Bad("text", "gives no tokens");
      p.prompt_text = text;
      break;
    }
    case kraken::v1::GenerateRequest::kTokenIds: {
      const auto& ids = req.token_ids().ids();
      if (ids.empty()) return Bad("token_ids", "must not be empty");
      if (ids.size() >= lim.context_length)
        return Bad("token_ids", StrCat("has ", ids.size(), " tokens; the context length is ", lim.context_length,
                                       " and at least one token must be left to generate"));
      for (int i = 0; i < ids.size(); ++i)
        if (ids[i] < 0 || ids[i] >= lim.vocab_size)
          return Bad(StrCat("token_ids[", i, "]"), StrCat("must be in [0, ", lim.vocab_size, "), got ", ids[i]));
      p.prompt.assign(ids.begin(), ids.end());
      KRAKEN_ASSIGN_OR_RETURN(p.prompt_text, tok.Decode(p.prompt, /*skip_special=*/false));
      break;
    }
    default:
      return Bad("prompt", "must be set: give 'text' or 'token_ids'");
  }
  if (static_cast<int>(p.prompt.size()) >= lim.context_length)
    return Bad("text", StrCat("is ", p.prompt.size(), " tokens; the context length is ", lim.context_length,
                              " and at least one token must be left to generate"));

  // Lengths. Policy: max_tokens beyond the context is clamped, and the request then finishes
  // with reason LENGTH when the context is full.
  const uint32_t room = static_cast<uint32_t>(lim.context_length - static_cast<int>(p.prompt.size()));
  uint32_t max_tokens = req.has_max_tokens() ? req.max_tokens() : lim.default_max_tokens;
  if (max_tokens > room) {
    max_tokens = room;
    p.clamped = true;
  }
  p.max_tokens = max_tokens;
  if (req.min_tokens() > max_tokens)
    return Bad("min_tokens",
               StrCat("must be <= max_tokens (", max_tokens, " after fitting the context), got ", req.min_tokens()));
  p.min_tokens = req.min_tokens();

  // Sampling; the engine's validator names the field, range and value.
  engine::SamplingParams s;
  s.temperature = req.has_temperature() ? req.temperature() : lim.default_temperature;
  s.top_k = req.has_top_k() ? req.top_k() : 0;
  s.top_p = req.has_top_p() ? req.top_p() : lim.default_top_p;
  s.min_p = req.has_min_p() ? req.min_p() : 0.f;
  s.typical_p = req.has_typical_p() ? req.typical_p() : 1.f;
  s.repetition_penalty = req.has_repetition_penalty() ? req.repetition_penalty() : 1.f;
  s.presence_penalty = req.has_presence_penalty() ? req.presence_penalty() : 0.f;
  s.frequency_penalty = req.has_frequency_penalty() ? req.frequency_penalty() : 0.f;
  if (req.top_logprobs() > static_cast<uint32_t>(lim.max_top_logprobs))
    return Bad("top_logprobs", StrCat("must be at most ", lim.max_top_logprobs, ", got ", req.top_logprobs()));
  s.top_logprobs = static_cast<int32_t>(req.top_logprobs());
  s.seed = req.has_seed() ? req.seed() : FreshSeed();
  if (Status v = engine::ValidateSamplingParams(s, lim.vocab_size); !v.ok())
    return absl::InvalidArgumentError(
        StrCat("field ", std::string(v.message()).substr(std::string("sampling field ").size())));
  p.sampling = s;

  // Stops.
  if (req.stop_size() > lim.max_stop_strings)
    return Bad("stop", StrCat("may hold at most ", lim.max_stop_strings, " strings, got ", req.stop_size()));
  for (int i = 0; i < req.stop_size(); ++i) {
    const std::string& st = req.stop(i);
    const std::string field = StrCat("stop[", i, "]");
    if (st.empty()) return Bad(field, "must not be empty");
    if (static_cast<int>(st.size()) > lim.max_stop_string_bytes)
      return Bad(field, StrCat("must be at most ", lim.max_stop_string_bytes, " bytes, got ", st.size()));
    if (!tokenizer::IsValidUtf8(st)) return Bad(field, "is not valid UTF-8");
    p.stop.push_back(st);
  }
  if (req.stop_token_ids_size() > lim.max_stop_token_ids)
    return Bad("stop_token_ids",
               StrCat("may hold at most ", lim.max_stop_token_ids, " ids, got ", req.stop_token_ids_size()));
  for (int i = 0; i < req.stop_token_ids_size(); ++i) {
    const int32_t id = req.stop_token_ids(i);
    if (id < 0 || id >= lim.vocab_size)
      return Bad(StrCat("stop_token_ids[", i, "]"), StrCat("must be in [0, ", lim.vocab_size, "), got ", id));
    p.stop_token_ids.push_back(id);
  }
  if (!req.ignore_eos() && lim.eos_token_id >= 0) p.stop_token_ids.push_back(lim.eos_token_id);

  p.logprobs = req.logprobs() || req.top_logprobs() > 0;
  p.echo = req.echo();
  p.skip_special = req.has_skip_special_tokens() ? req.skip_special_tokens() : true;
  p.priority = req.priority();
  return p;
}

}  // namespace kraken::server
