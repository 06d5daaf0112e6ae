// One generation request inside the serving core, and the handle a front-end holds on it.
//
// A front-end's request becomes RequestParams and is submitted to the Engine (core/engine.h) —
// through the front door (core/admission.h) for the servers' protocols, directly by the offline
// CLI — and the front-end gets a RequestHandle (the servers' front-ends read it through an output
// pump, core/output_pump.h). The engine
// thread generates; the front-end takes what was produced, in plain terms (text deltas, token
// ids, logprobs, and at the end a finish reason, usage and timings), whenever the handle's
// listener tells it something is new:
//
//   auto handle = engine.Submit(std::move(params), arrival, deadline);   // StatusOr
//   (*handle)->Listen([&] { wake(); });        // engine thread, no lock held
//   Output chunk;
//   (*handle)->Take(&chunk);                   // any thread: what is new since the last Take
//   (*handle)->Cancel();                       // any thread: ends it CANCELLED at the next step
//   (*handle)->Detach();                       // before the listener's owner goes away
//
// Threading: the engine thread alone touches the generation state (Request's engine-side
// fields). Output crosses through the handle's mutex; the engine never calls the listener while
// holding it (or any other lock), so a listener may call Take, and a front-end may hold its own
// lock around Take.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "core/stop_matcher.h"
#include "engine/sampler.h"
#include "tokenizer/detokenizer.h"

namespace kraken::core {

using Clock = std::chrono::steady_clock;

/// A validated request in the core's terms (front-ends validate and fill it).
struct RequestParams {
  std::string request_id;                     // the client's, for logs; may be empty
  std::vector<int32_t> prompt;                // token ids, 1 <= size < context length
  std::string prompt_text;                    // the text (for echo); decoded when ids were given
  uint32_t max_tokens = 0;                    // tokens to generate, already fitted to the context
  bool clamped = false;                       // max_tokens was reduced to fit the context
  uint32_t min_tokens = 0;                    // stop ids and strings are ignored until this many
  engine::SamplingParams sampling;            // seed filled in (drawn if the client gave none)
  std::vector<std::string> stop;              // stop strings, never part of the output
  std::vector<int32_t> stop_token_ids;        // the client's, plus EOS unless it is ignored
  std::vector<engine::TokenBias> logit_bias;  // added to the logits before sampling, by token id order
  bool logprobs = false;                      // report each token's logprob (and sampling.top_logprobs)
  bool prompt_logprobs = false;  // score each prompt token after the first (sampling.top_logprobs alternatives)
  bool echo = false;
  bool skip_special = true;  // leave special tokens out of the text
  int priority = 0;          // lower first, under the priority scheduling policy
  uint32_t n = 1;            // samples of the prompt (Engine::SubmitSamples); sample i uses seed + i
};

enum class FinishReason { kNone, kStop, kLength };

/// One generated token's log-probability and the alternatives asked for.
struct TokenLogprobs {
  int32_t token = 0;
  float logprob = 0.f;
  std::vector<engine::TokenLogprob> top;
};

/// What a request produced that its front-end has not taken yet; at the end, how it ended.
struct Output {
  std::string text;  // complete UTF-8, stop strings withheld
  std::vector<int32_t> ids;
  std::vector<TokenLogprobs> logprobs;  // one per id when RequestParams::logprobs
  // RequestParams::prompt_logprobs: prompt tokens 1, 2, ... scored under the positions before them,
  // in order, all of them before the first id (sample 0 of a request only).
  std::vector<TokenLogprobs> prompt_logprobs;
  // Set once, when the request ends.
  bool finished = false;
  Status status;  // OK, or why it failed
  FinishReason finish_reason = FinishReason::kNone;
  std::string stop_reason;  // the stop string, or "token:<id>"
  uint32_t completion_tokens = 0;
  uint32_t cached_tokens = 0;                 // prompt tokens whose KV came from the prefix cache (first admission)
  double queue_s = 0, ttft_s = 0, e2e_s = 0;  // from arrival: to first scheduled, first token, end

  bool empty() const { return text.empty() && ids.empty() && logprobs.empty() && prompt_logprobs.empty(); }
};

/// The front-end's side of a request: take output, cancel, and be told when there is more.
class RequestHandle {
 public:
  /// `fork_of`: the id of the request's first sample when this handle is one of its other samples.
  RequestHandle(uint64_t id, RequestParams params, Clock::time_point arrival, Clock::time_point deadline,
                uint64_t fork_of = 0)
      : id_(id), fork_of_(fork_of), params_(std::move(params)), arrival_(arrival), deadline_(deadline) {}

  uint64_t id() const { return id_; }
  uint64_t fork_of() const { return fork_of_; }
  const RequestParams& params() const { return params_; }
  Clock::time_point arrival() const { return arrival_; }
  /// Clock::time_point::max() when the request has none.
  Clock::time_point deadline() const { return deadline_; }

  /// Appends the output produced since the last call to `out` (so a front-end can keep one Output
  /// of what it has not sent yet) and copies the end fields once the request has ended. Returns
  /// true when anything was added or the end is new to `out`. Thread: any.
  bool Take(Output* out);
  /// Asks the engine to end the request with CANCELLED at its next iteration. Thread: any.
  void Cancel();
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }

  /// Sets the function the engine calls, on its thread (or, for the end of a request paused by a
  /// worker restart, its pause watch) and holding no lock, after output is added
  /// or the request ends. The listener may call Take. Thread: any.
  void Listen(std::function<void()> listener);
  /// Removes the listener; when it returns the listener is not running and will not be called
  /// again. Thread: any but the listener's own.
  void Detach();

  // Engine side.
  /// Adds output (`add` edits the pending Output under the lock), then calls the listener unless
  /// `notify` is false (the caller is about to Finish, which notifies once for both).
  void Publish(const std::function<void(Output&)>& add, bool notify = true);
  /// Ends the request (once; later calls are ignored) and calls the listener.
  void Finish(const Status& status, FinishReason reason, std::string stop_reason, uint32_t completion_tokens,
              double queue_s, double ttft_s, double e2e_s);
  bool finished() const;
  /// Wakes the engine when the request is cancelled (set by the engine on Submit).
  void set_on_cancel(std::function<void()> f) { on_cancel_ = std::move(f); }

 private:
  void Notify();

  const uint64_t id_;
  const uint64_t fork_of_;
  const RequestParams params_;
  const Clock::time_point arrival_, deadline_;
  std::atomic<bool> cancelled_{false};
  std::function<void()> on_cancel_;

  mutable std::mutex mu_;
  std::condition_variable idle_;    // listener_calls_ reached 0
  Output pending_;                  // guarded by mu_
  std::function<void()> listener_;  // guarded by mu_
  int listener_calls_ = 0;          // guarded by mu_: listener calls in flight
};

/// The engine thread's state of one request: its handle, and what generation needs.
struct Request {
  /// `tok` null: no text (ids and logprobs only; the request has no stop strings).
  Request(std::shared_ptr<RequestHandle> h, const tokenizer::Tokenizer* tok)
      : handle(std::move(h)), params(handle->params()), stops(params.stop) {
    if (tok != nullptr) detok.emplace(*tok, params.skip_special);
  }

  std::shared_ptr<RequestHandle> handle;
  const RequestParams& params;
  std::optional<tokenizer::IncrementalDetokenizer> detok;
  StopMatcher stops;
  std::optional<Clock::time_point> scheduled, first_token;
  Clock::time_point last_token{};  // the previous token's hand-over (inter-token latency)
  uint64_t kv_generation = 0;      // the workers' generation when its KV cache was built
  size_t prompt_scored = 1;        // prompt_logprobs: the next prompt position to report
  // Across worker failures (Engine::Resume): the failed steps it was in since it last sampled a
  // token (a suspect from kSuspectAfter on: it then runs alone), and when its current pause began.
  int step_failures = 0;
  bool solo = false;
  std::optional<Clock::time_point> paused_at;
};

}  // namespace kraken::core
