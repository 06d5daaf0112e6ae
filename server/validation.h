// Checks a GenerateRequest against the model and the server's limits and turns it into the
// serving core's terms (core::RequestParams). Every rejection is INVALID_ARGUMENT naming the field, the limit and the
// value; nothing is tokenized or queued before the request is known to be good.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "core/request.h"
#include "kraken/v1/kraken.pb.h"
#include "tokenizer/tokenizer.h"

namespace kraken::server {

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
};

/// Validates and tokenizes. Errors: INVALID_ARGUMENT naming field, limit and value.
StatusOr<core::RequestParams> ValidateGenerateRequest(const kraken::v1::GenerateRequest& req,
                                                      const RequestLimits& limits, const tokenizer::Tokenizer& tok);

}  // namespace kraken::server
