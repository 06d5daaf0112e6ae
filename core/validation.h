// The one validation of a generation request, for every front-end (kraken.v1 gRPC, OpenAI HTTP).
// A front-end copies what its client sent into a GenerationRequest (unset fields stay unset, values
// keep the width the wire gave them so an out-of-range value is reported as sent) and calls
// ValidateGeneration, which checks it against the model and the server's limits and turns it into
// the core's terms (RequestParams). Every rejection is INVALID_ARGUMENT naming the field (in the
// front-end's own spelling, FieldNames), the limit and the value; nothing is tokenized or queued
// before the request is known to be good.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "core/request.h"
#include "tokenizer/tokenizer.h"

namespace kraken::core {

/// What the server accepts. Defaults are documented in docs/api.md.
struct RequestLimits {
  int context_length = 0;  // model's n_positions: prompt + generated tokens
  int vocab_size = 0;
  int eos_token_id = -1;  // -1: none
  uint32_t default_max_tokens = 128;
  float default_temperature = 1.f;  // from generation_config.json when present
  float default_top_p = 1.f;
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  int max_stop_token_ids = 64;
  int max_top_logprobs = 20;
  int max_request_id_bytes = 128;
  int max_prompt_bytes = 1 << 20;
  int max_n = 16;  // samples per request (at most the waiting queue's capacity)
  // Samples of all prompts of one request together (prompts x n; at most the waiting queue's
  // capacity, which a larger request could never enter at once).
  int max_samples = 256;
};

/// A generation request as a client sent it, in no protocol's terms. Unset optionals take the
/// server's defaults.
struct GenerationRequest {
  std::string request_id;
  // The prompt: exactly one of the two.
  std::optional<std::string> text;
  bool add_special_tokens = true;  // text: the tokenizer's template (a BOS); false for a rendered chat
  std::optional<std::vector<int64_t>> token_ids;
  std::optional<int64_t> max_tokens;  // tokens to generate; unset: RequestLimits::default_max_tokens
  int64_t min_tokens = 0;
  std::optional<double> temperature, top_p, min_p, typical_p;
  std::optional<double> repetition_penalty, presence_penalty, frequency_penalty;
  std::optional<int64_t> top_k;
  std::optional<uint64_t> seed;  // unset: a fresh random seed (reported back)
  std::vector<std::string> stop;
  std::vector<int64_t> stop_token_ids;
  std::vector<std::pair<int64_t, double>> logit_bias;  // (token id, bias) as OpenAI's logit_bias
  bool ignore_eos = false;
  bool logprobs = false;     // the chosen token's logprob
  int64_t top_logprobs = 0;  // and this many alternatives (implies logprobs)
  bool echo = false;
  bool prompt_logprobs = false;             // score the prompt's tokens (top_logprobs alternatives each)
  std::optional<bool> skip_special_tokens;  // unset: true
  int64_t priority = 0;
  std::optional<int64_t> n;  // samples of the prompt; unset: 1
};

/// How the front-end's protocol spells the fields whose names differ between protocols; error
/// messages use these.
struct FieldNames {
  std::string text = "text";
  std::string token_ids = "token_ids";
  std::string top_logprobs = "top_logprobs";
  std::string min_tokens = "min_tokens";
};

/// Validates and tokenizes. max_tokens beyond the context is clamped (RequestParams::clamped) and
/// the request then ends with kLength when the context is full. Errors: INVALID_ARGUMENT naming
/// field, limit and value.
StatusOr<RequestParams> ValidateGeneration(const GenerationRequest& req, const RequestLimits& limits,
                                           const tokenizer::Tokenizer& tok, const FieldNames& names = {});

}  // namespace kraken::core
