// Checks a GenerateRequest against the model and the server's limits and turns it into the
// engine's terms. Every rejection is INVALID_ARGUMENT naming the field, the limit and the value;
// nothing is tokenized or queued before the request is known to be good.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "kraken/v1/kraken.pb.h"
#include "engine/sampler.h"
#include "tokenizer/tokenizer.h"

namespace kraken::server {

/// What the server accepts. Defaults are documented in docs/api.md.
struct RequestLimits {
  int context_length = 0;           // model's n_positions: prompt + generated tokens
  int vocab_size = 0;
  int eos_token_id = -1;            // -1: none
  uint32_t default_max_tokens = 128;
  float default_temperature = 1.f;  // from generation_config.json when present
  float default_top_p = 1.f;
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  int max_stop_token_ids = 64;
  int max_top_logprobs = 20;
  int max_request_id_bytes = 128;
  int max_prompt_bytes = 1 << 20;
};

/// A validated request in engine terms.
struct RequestParams {
  std::vector<int32_t> prompt;          // token ids, 1 <= size < context_length
  std::string prompt_text;              // the text (for echo); decoded when ids were given
  uint32_t max_tokens = 0;              // after the context clamp
  bool clamped = false;                 // max_tokens was reduced to fit the context
  uint32_t min_tokens = 0;
  engine::SamplingParams sampling;      // seed filled in (drawn if the client gave none)
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;  // user's ids, plus EOS unless ignore_eos
  bool logprobs = false;
  bool echo = false;
  bool skip_special = true;
  int priority = 0;
};

/// Validates and tokenizes. Errors: INVALID_ARGUMENT naming field, limit and value.
StatusOr<RequestParams> ValidateGenerateRequest(const kraken::v1::GenerateRequest& req, const RequestLimits& limits,
                                                const tokenizer::Tokenizer& tok);

}  // namespace kraken::server
