// The OpenAI-compatible HTTP API over the serving core, as vLLM serves it:
//   POST /v1/completions        text or token-id prompt; JSON, or SSE chunks ending "data: [DONE]"
//   POST /v1/chat/completions   400: the bundled models are base models with no chat template
//   GET  /v1/models             the one served model
//   POST /tokenize, /detokenize vLLM's tokenizer endpoints
//   GET  /health                200 while serving, 503 while the workers recover or the server drains
//   GET  /version, GET /metrics (Prometheus text, the same registry as --metrics-port)
// Errors are OpenAI error objects (openai/protocol.h) with the status of their gRPC code, and the
// messages of the one validation every front-end shares (core/validation.h). A streamed
// completion is pulled by its connection (http::Stream): a slow reader never blocks the engine,
// and a client that disconnects cancels its request, whose KV blocks are freed at the next step.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "core/engine.h"
#include "core/serving_metrics.h"
#include "core/validation.h"
#include "http/server.h"
#include "tokenizer/tokenizer.h"

namespace kraken::openai {

struct ApiOptions {
  std::string served_model_name;  // the only accepted `model`; others get 404
  core::RequestLimits limits;
  std::string api_key;                           // empty: no authentication; /health, /version, /metrics stay open
  core::ServingMetrics* metrics = nullptr;       // optional: refusals counted by status
  std::chrono::milliseconds request_timeout{0};  // 0: none; a request past it ends with 408
  std::function<bool()> serving;                 // health: the workers are up
  std::function<std::string()> metrics_text;     // GET /metrics; unset: 404
  std::string version;
};

class Api {
 public:
  /// `engine` and `tok` must outlive the Api and every request it started.
  Api(core::Engine& engine, const tokenizer::Tokenizer& tok, ApiOptions options);

  /// Adds the routes to `server` (before it starts).
  void Register(http::Server& server);
  /// After this, new generation requests get 503 and /health answers 503.
  void StartDraining() { draining_ = true; }

  /// The answer to a body over the limit (http::ServerOptions::too_large): 413 naming the size and
  /// the limit (bytes), counted as a resource_exhausted failure.
  http::Response TooLarge(uint64_t size, uint64_t limit) const;
  /// 404 and 405 answers as OpenAI error objects (http::ServerOptions::not_routed).
  static http::Response NotRouted(int status, const http::Request& req);

 private:
  http::Reply Completions(const http::Request& req);
  http::Reply Tokenize(const http::Request& req) const;
  http::Reply Detokenize(const http::Request& req) const;
  http::Reply Models() const;
  http::Reply Health() const;
  // OK, or UNAUTHENTICATED naming what is missing.
  Status Authorize(const http::Request& req) const;
  // A refusal before the engine: logged, counted, answered.
  http::Response Refuse(const std::string& request_id, const Status& s) const;

  core::Engine& engine_;
  const tokenizer::Tokenizer& tok_;
  ApiOptions options_;
  const int64_t created_;  // Unix seconds at start: the model's "created"
  std::atomic<bool> draining_{false};
};

/// An error response: the OpenAI error object for `s` with its HTTP status (openai/protocol.h).
http::Response ErrorResponse(const Status& s);

}  // namespace kraken::openai
