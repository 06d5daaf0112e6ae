#include "core/finish.h"

#include <algorithm>

namespace kraken::core {

bool StopsOnToken(const RequestParams& p, int32_t token, size_t num_generated) {
  return num_generated > p.min_tokens &&
         std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) != p.stop_token_ids.end();
}

StopCheck CheckStop(const RequestParams& p, int32_t token, size_t num_generated, size_t context_length,
                    const std::string* matched_stop) {
  if (StopsOnToken(p, token, num_generated)) return {FinishReason::kStop, StrCat("token:", token)};
  if (matched_stop != nullptr) return {FinishReason::kStop, *matched_stop};
  if (num_generated >= p.max_tokens || p.prompt.size() + num_generated >= context_length) {
    return {FinishReason::kLength, ""};
  }
  return {};
}

}  // namespace kraken::core
