// When a sequence stops: one small pure function over what is known after its newest token
// (the role of vLLM's check_stop), so every front-end and the CLI end generation the same way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/request.h"

namespace kraken::core {

struct StopCheck {
  FinishReason reason = FinishReason::kNone;
  std::string stop_reason;  // the stop string, or "token:<id>"; empty for kLength and kNone
};

/// True when `token` is one of the request's stop ids and more than min_tokens tokens exist
/// (`num_generated` counts `token`). Earlier, stop ids are not even sampled (the workers ban them).
bool StopsOnToken(const RequestParams& p, int32_t token, size_t num_generated);

/// Why the sequence ends after its newest token `token`, in order of precedence: a stop token
/// (StopsOnToken), a stop string the text just completed (`matched_stop`, nullptr when none),
/// the length limit (max_tokens generated, or prompt + output filling `context_length`), or not
/// at all (kNone).
StopCheck CheckStop(const RequestParams& p, int32_t token, size_t num_generated, size_t context_length,
                    const std::string* matched_stop);

}  // namespace kraken::core
