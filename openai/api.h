// The OpenAI-compatible HTTP API over the serving core, as vLLM serves it:
//   POST /v1/completions        text or token-id prompt; JSON, or SSE chunks ending "data: [DONE]"
//   POST /v1/chat/completions   messages rendered with the model's chat template; JSON or SSE chunks
//   GET  /v1/models             the one served model; GET /v1/models/{id}: that model
//   POST /tokenize, /detokenize vLLM's tokenizer endpoints
//   GET  /health                200 while serving, 503 while the workers recover or the server drains
//   GET  /version, GET /metrics (Prometheus text, the same registry as --metrics-port)
// Errors are OpenAI error objects (openai/protocol.h) with the status of their gRPC code, and the
// messages of the one validation every front-end shares (core/validation.h). Admission is the front
// door's (core/admission.h). A completion is pulled by its connection (http::Stream) from an output
// pump (core/output_pump.h): a slow reader never blocks the engine, and a client that disconnects
// cancels its request, whose KV blocks are freed at the next step.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "core/admission.h"
#include "http/server.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kraken::openai {

struct ApiOptions {
  std::string served_model_name;  // the only accepted `model`; others get 404
  // The model's chat template (tokenizer/chat_template.h); without one, chat requests get 400.
  std::shared_ptr<const tokenizer::ModelChatTemplate> chat_template;
  std::function<std::string()> metrics_text;  // GET /metrics; unset: 404
  std::string version;
};

class Api {
 public:
  /// `door` must outlive the Api and every request it started. Admission (the API key, the drain,
  /// the request timeout, refusals logged and counted) is the door's; /health, /version and
  /// /metrics need no key.
  Api(const core::Admission& door, ApiOptions options);

  /// Adds the routes to `server` (before it starts).
  void Register(http::Server& server);
  /// The answer to a body over the limit (http::ServerOptions::too_large): 413 naming the size and
  /// the limit (bytes), counted as a resource_exhausted failure.
  http::Response TooLarge(uint64_t size, uint64_t limit) const;
  /// 404 and 405 answers as OpenAI error objects (http::ServerOptions::not_routed).
  static http::Response NotRouted(int status, const http::Request& req);

 private:
  http::Reply Completions(const http::Request& req);
  http::Reply Chat(const http::Request& req);
  // NOT_FOUND naming `model` unless it is absent or the served model's name.
  Status CheckModel(const std::optional<std::string>& model) const;
  // The prompt text of a chat: its messages through the chat template. INVALID_ARGUMENT when the
  // model has none, or with the template's own message (raise_exception).
  StatusOr<std::string> RenderChat(const struct ChatRequest& chat) const;
  http::Reply Tokenize(const http::Request& req) const;
  http::Reply Detokenize(const http::Request& req) const;
  http::Reply Models() const;
  // The served model as OpenAI's model object.
  nlohmann::json ModelObject() const;
  http::Reply Health() const;
  // OK, or UNAUTHENTICATED naming what is missing.
  Status Authorize(const http::Request& req) const;

  const core::Admission& door_;
  const tokenizer::Tokenizer& tok_;
  const core::RequestLimits& limits_;
  ApiOptions options_;
  const int64_t created_;  // Unix seconds at start: the model's "created"
};

/// An error response: the OpenAI error object for `s` with its HTTP status (openai/protocol.h).
http::Response ErrorResponse(const Status& s);

}  // namespace kraken::openai
