// One client request as the server tracks it, shared by the gRPC reactor that answers it and the
// engine thread that generates it. The engine thread alone touches the generation state; output
// goes through `Output`, guarded by `mu`, which coalesces deltas while the client is behind (one
// write is outstanding per stream; the engine never waits for the client).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "kraken/v1/kraken.pb.h"
#include "server/stop_matcher.h"
#include "server/validation.h"
#include "tokenizer/detokenizer.h"

namespace kraken::server {

using Clock = std::chrono::steady_clock;

/// Output not yet handed to the client.
struct Output {
  std::string text;
  std::vector<int32_t> ids;
  std::vector<kraken::v1::TokenLogprob> logprobs;
  bool first_sent = false;  // the first message (seed, echo) has been built
  // Set once, when the request ends.
  bool finished = false;
  Status status;            // OK, or why it failed (then the call ends with this status)
  kraken::v1::FinishReason finish_reason = kraken::v1::FINISH_REASON_UNSPECIFIED;
  std::string stop_reason;
  uint32_t completion_tokens = 0;
  double queue_s = 0, ttft_s = 0, e2e_s = 0;
};

class Request {
 public:
  Request(uint64_t id_in, std::string request_id_in, RequestParams params_in, const tokenizer::Tokenizer& tok,
          Clock::time_point arrival_in, Clock::time_point deadline_in)
      : id(id_in),
        request_id(std::move(request_id_in)),
        params(std::move(params_in)),
        arrival(arrival_in),
        deadline(deadline_in),
        detok(tok, this->params.skip_special),
        stops(this->params.stop) {}

  const uint64_t id;               // server-internal sequence id
  const std::string request_id;    // the client's
  const RequestParams params;
  const Clock::time_point arrival, deadline;  // deadline: Clock::time_point::max() if none
  std::atomic<bool> cancelled{false};

  // Engine thread only.
  std::vector<int32_t> generated;
  tokenizer::IncrementalDetokenizer detok;
  StopMatcher stops;
  std::optional<Clock::time_point> scheduled, first_token;
  uint64_t kv_generation = 0;
  Clock::time_point last_token{};  // when the previous token was handed over (inter-token latency)  // the workers' generation when this sequence's KV cache was built

  // Shared with the reactor.
  std::recursive_mutex mu;
  Output out;
  std::function<void()> notify;  // called with `mu` held after output changes; reset when the call ends
};

}  // namespace kraken::server
