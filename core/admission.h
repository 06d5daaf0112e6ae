// The front door every protocol shares (kraken.v1 and KServe over gRPC, the OpenAI-compatible HTTP
// API). A front-end reads its wire format and answers in it; everything between is here, once:
//
//   core::Call call{.authorization = ..., .deadline = ...};          // what the protocol carried
//   auto handles = door.Accept(call, [&](std::string* id) -> StatusOr<GenerationRequest> {
//     ...parse the body, set *id as soon as it is known...
//   }, kMyFields);
//   if (!handles.ok()) return AnswerError(handles.status());          // already logged and counted
//   ...drive an OutputPump (core/output_pump.h) over *handles...
//
// Accept stamps the arrival, works out the deadline, refuses while the server drains, checks the
// API key, parses (the front-end's function), validates (core/validation.h) and submits; a refusal
// at any step is logged with the request's id and counted by its gRPC code
// (kraken_request_failure_total) exactly once, then returned for the front-end to answer.
//
// Health says whether the server is ready: the workers are up (the engine's on_serving) and it is
// not draining. Front-ends answer their readiness probes from it; Accept refuses only while
// draining (a request that arrives while the workers restart waits for them, core/engine.h).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "core/request.h"
#include "core/serving_metrics.h"
#include "core/validation.h"
#include "tokenizer/tokenizer.h"

namespace kraken::core {

/// Readiness: the workers are up and the server is not draining. Set from the engine thread
/// (recoveries) and the main thread (start, drain); read from any thread without waiting for a
/// change being published.
class Health {
 public:
  /// `f` is told the readiness every time it is set. It is called holding Health's lock, so its
  /// calls keep the order of the changes; it must not call back into Health.
  void OnChange(std::function<void(bool ready)> f);
  /// The workers are up (true) or being recovered (false): Engine's on_serving.
  void SetServing(bool serving);
  /// From now on ready() is false and Accept refuses with UNAVAILABLE. Never undone.
  void StartDraining();
  bool draining() const;
  bool ready() const;

 private:
  void Publish();  // holding mu_

  std::mutex mu_;  // orders the changes and their publication; readers use the atomics alone
  std::atomic<bool> serving_{false}, draining_{false};
  std::function<void(bool)> on_change_;  // guarded by mu_
};

struct AdmissionOptions {
  RequestLimits limits;
  std::string api_key;                           // empty: no authentication
  ServingMetrics* metrics = nullptr;             // optional: refusals counted by gRPC code
  std::chrono::milliseconds request_timeout{0};  // 0: none; else every request ends by arrival + this
};

/// How a protocol carries the API key, for the messages of a refusal.
struct CredentialSpelling {
  std::string_view name = "authorization";  // "Authorization" as an HTTP header
  std::string_view carrier = "metadata";    // "header"
};

/// A call as its front-end received it, before its body is read.
struct Call {
  /// The client's id when the protocol carries it outside the body (HTTP's X-Request-Id); the
  /// parser may set it from the body.
  std::string request_id;
  /// The credential's value as sent ("Bearer <key>"); nullopt when the call carried none.
  std::optional<std::string> authorization;
  CredentialSpelling spelling;
  /// The protocol's own deadline (gRPC's), or max() for none.
  std::chrono::system_clock::time_point deadline = std::chrono::system_clock::time_point::max();
};

using Handles = std::vector<std::shared_ptr<RequestHandle>>;
/// Submits a validated request that arrived at `arrival` and must end by `deadline`: the engine's
/// SubmitSamples in the server (RESOURCE_EXHAUSTED when the waiting queue is full, UNAVAILABLE when
/// it stops), a fake in tests.
using SubmitFn = std::function<StatusOr<Handles>(RequestParams, Clock::time_point arrival, Clock::time_point deadline)>;
/// Reads the call's body into a GenerationRequest, or says why it cannot (the error names the
/// field). It may set `*request_id` as soon as the id is known, so a later refusal names it.
using ParseFn = std::function<StatusOr<GenerationRequest>(std::string* request_id)>;
/// Reads a body that carries several prompts (OpenAI's prompt arrays) into one GenerationRequest
/// per prompt, in the body's order; otherwise as ParseFn.
using ParseBatchFn = std::function<StatusOr<std::vector<GenerationRequest>>(std::string* request_id)>;

class Admission {
 public:
  /// `tok` and `health` must outlive the Admission.
  Admission(const tokenizer::Tokenizer& tok, const Health& health, SubmitFn submit, AdmissionOptions options);

  /// Admits one generation call, in this order: draining (UNAVAILABLE "the server is shutting
  /// down"), the API key (UNAUTHENTICATED naming what is missing or wrong), `parse`, validation
  /// (INVALID_ARGUMENT naming the field in `names`' spelling, the limit and the value), submission.
  /// Returns the samples' handles in index order; a refusal is logged and counted here and
  /// returned unchanged, carrying its field (ErrorField) when it concerns one.
  StatusOr<Handles> Accept(const Call& call, const ParseFn& parse, const FieldNames& names = {}) const;
  /// Accept for a call of several prompts: all of them are validated before any is submitted (a
  /// bad prompt i refuses the call naming `names.text`[i], or `names.token_ids`[i]), the prompts'
  /// samples together must fit RequestLimits::max_samples (INVALID_ARGUMENT naming the prompt
  /// field, the count and the limit), and if a submission fails the prompts already submitted are
  /// cancelled before the refusal is returned. Returns the handles prompt by prompt, each prompt's
  /// samples in index order; the prompts batch and share the prefix cache like separate requests.
  /// With one prompt it is Accept exactly (field names without an index).
  StatusOr<Handles> AcceptBatch(const Call& call, const ParseBatchFn& parse, const FieldNames& names = {}) const;
  /// The API key check alone, for calls that generate nothing (tokenize, metadata): OK when no key
  /// is set or `authorization` is "Bearer <key>"; UNAUTHENTICATED otherwise. Not counted.
  Status Authorize(const std::optional<std::string>& authorization, const CredentialSpelling& spelling = {}) const;
  /// Logs and counts a refusal its front-end found before Accept could run (a body over the size
  /// limit, refused by the transport). Returns `s`.
  Status Refuse(std::string_view request_id, const Status& s) const;
  /// When a call that arrived at `arrival` must end: the protocol's deadline (`call_deadline`, read
  /// against both clocks now), shortened to arrival + request_timeout when that is set;
  /// Clock::time_point::max() for none.
  Clock::time_point Deadline(Clock::time_point arrival, std::chrono::system_clock::time_point call_deadline) const;

  const Health& health() const { return health_; }
  const RequestLimits& limits() const { return options_.limits; }
  const tokenizer::Tokenizer& tokenizer() const { return tok_; }

 private:
  const tokenizer::Tokenizer& tok_;
  const Health& health_;
  SubmitFn submit_;
  AdmissionOptions options_;
};

}  // namespace kraken::core
