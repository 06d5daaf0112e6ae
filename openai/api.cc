#include "openai/api.h"

#include <random>

#include <spdlog/spdlog.h>

#include "base/closest.h"
#include "openai/protocol.h"
#include "tokenizer/utf8.h"

namespace kraken::openai {
namespace {

using nlohmann::json;

http::Response JsonResponse(int status, const json& body) {
  return http::Response{.status = status, .content_type = "application/json", .body = Dump(body)};
}

std::string RandomHex() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng()));
  return buf;
}

// What every chunk or body of one completion repeats.
struct CompletionContext {
  std::string id;  // "cmpl-..."
  std::string model;
  int64_t created = 0;
  bool stream = false;
  bool include_usage = false;
  bool continuous_usage = false;
  const tokenizer::Tokenizer* tok = nullptr;
};

// OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens whose KV came from the
// prefix cache.
json Usage(const core::RequestHandle& h, int64_t completion_tokens, uint32_t cached_tokens) {
  const auto prompt = static_cast<int64_t>(h.params().prompt.size());
  return json{{"prompt_tokens", prompt},
              {"completion_tokens", completion_tokens},
              {"total_tokens", prompt + completion_tokens},
              {"prompt_tokens_details", {{"cached_tokens", cached_tokens}}}};
}

// "stop_reason" as vLLM gives it: the stop string, the stop token id, or null.
json StopReason(const core::Output& o) {
  if (o.finish_reason != core::FinishReason::kStop || o.stop_reason.empty()) return nullptr;
  if (o.stop_reason.rfind("token:", 0) == 0) return std::stoll(o.stop_reason.substr(6));
  return o.stop_reason;
}

json FinishReason(const core::Output& o) {
  switch (o.finish_reason) {
    case core::FinishReason::kStop:
      return "stop";
    case core::FinishReason::kLength:
      return "length";
    case core::FinishReason::kNone:
      break;
  }
  return nullptr;
}

// One completion, JSON or SSE, pulled by its connection.
class CompletionStream final : public http::Stream {
 public:
  CompletionStream(std::shared_ptr<core::RequestHandle> h, CompletionContext c) : h_(std::move(h)), c_(std::move(c)) {}
  ~CompletionStream() override { h_->Detach(); }

  void Start(std::function<void()> wake) override { h_->Listen(std::move(wake)); }
  void Abort() override { h_->Cancel(); }
  bool Next(Piece* piece) override { return c_.stream ? NextEvent(piece) : NextBody(piece); }

 private:
  // The whole answer once the request has ended.
  bool NextBody(Piece* piece) {
    h_->Take(&taken_);
    if (!taken_.finished) return false;
    piece->end = true;
    if (!taken_.status.ok()) {
      piece->head = ErrorResponse(taken_.status);
      return true;
    }
    const std::string text = (h_->params().echo ? h_->params().prompt_text : "") + taken_.text;
    json body{{"id", c_.id},
              {"object", "text_completion"},
              {"created", c_.created},
              {"model", c_.model},
              {"choices", json::array({Choice(text, taken_.ids, taken_.logprobs, FinishReason(taken_))})},
              {"usage", Usage(*h_, taken_.completion_tokens, taken_.cached_tokens)}};
    body["choices"][0]["stop_reason"] = StopReason(taken_);
    piece->head = JsonResponse(200, body);
    piece->head->headers.emplace_back("X-Request-Id", c_.id.substr(5));
    return true;
  }

  // Server-sent events: a chunk per batch of new tokens, the finish reason on the last one, the
  // usage after it when asked, then [DONE]. An error after the start is an {"error": ...} event.
  bool NextEvent(Piece* piece) {
    if (!head_sent_) {
      head_sent_ = true;
      piece->head = http::Response{
          .status = 200,
          .content_type = "text/event-stream",
          .headers = {{"Cache-Control", "no-cache"}, {"X-Accel-Buffering", "no"}, {"X-Request-Id", c_.id.substr(5)}}};
      if (h_->params().echo) piece->data = Event(Chunk(h_->params().prompt_text, {}, {}, nullptr, nullptr));
    }
    h_->Take(&taken_);
    const bool ended = taken_.finished;
    if (ended && !taken_.status.ok()) {
      if (!taken_.text.empty()) piece->data += Event(Chunk(taken_.text, taken_.ids, taken_.logprobs, nullptr, nullptr));
      piece->data += Event(ErrorObject(taken_.status, HttpStatus(taken_.status)));
    } else if (!taken_.text.empty() || !taken_.ids.empty() || ended) {
      piece->data += Event(Chunk(taken_.text, taken_.ids, taken_.logprobs, ended ? FinishReason(taken_) : json(nullptr),
                                 ended ? StopReason(taken_) : json(nullptr)));
      if (ended && c_.include_usage) {
        json usage_chunk = Base();
        usage_chunk["choices"] = json::array();
        usage_chunk["usage"] = Usage(*h_, taken_.completion_tokens, taken_.cached_tokens);
        piece->data += Event(usage_chunk);
      }
    }
    sent_tokens_ += static_cast<int64_t>(taken_.ids.size());
    taken_.text.clear();
    taken_.ids.clear();
    taken_.logprobs.clear();
    if (ended) {
      piece->data += "data: [DONE]\n\n";
      piece->end = true;
    }
    return !piece->data.empty() || piece->head.has_value() || piece->end;
  }

  static std::string Event(const json& j) { return "data: " + Dump(j) + "\n\n"; }

  json Base() const {
    json j{{"id", c_.id}, {"object", "text_completion"}, {"created", c_.created}, {"model", c_.model}};
    if (c_.continuous_usage)  // vLLM's continuous_usage_stats: the tokens sent so far, this chunk's included
      j["usage"] = Usage(*h_, sent_tokens_ + static_cast<int64_t>(taken_.ids.size()), taken_.cached_tokens);
    else if (c_.include_usage)
      j["usage"] = nullptr;
    return j;
  }

  json Chunk(const std::string& text, const std::vector<int32_t>& ids, const std::vector<core::TokenLogprobs>& lps,
             json finish, json stop) {
    json j = Base();
    j["choices"] = json::array({Choice(text, ids, lps, std::move(finish))});
    j["choices"][0]["stop_reason"] = std::move(stop);
    return j;
  }

  json Choice(const std::string& text, const std::vector<int32_t>& ids, const std::vector<core::TokenLogprobs>& lps,
              json finish) {
    return json{{"index", 0}, {"text", text}, {"logprobs", Logprobs(lps)}, {"finish_reason", std::move(finish)}};
  }

  // The completions API's logprobs object: each token's text, logprob, the alternatives asked
  // for, and where its text starts (bytes into the completion).
  json Logprobs(const std::vector<core::TokenLogprobs>& lps) {
    if (!h_->params().logprobs) return nullptr;
    json tokens = json::array(), values = json::array(), offsets = json::array();
    json tops = h_->params().sampling.top_logprobs > 0 ? json::array() : json(nullptr);
    for (const core::TokenLogprobs& lp : lps) {
      const std::string piece = TokenText(lp.token);
      tokens.push_back(piece);
      values.push_back(lp.logprob);
      offsets.push_back(text_offset_);
      text_offset_ += piece.size();
      if (tops.is_array()) {
        json alternatives = json::object();
        for (const engine::TokenLogprob& t : lp.top) alternatives[TokenText(t.token)] = t.logprob;
        tops.push_back(std::move(alternatives));
      }
    }
    return json{{"tokens", tokens}, {"token_logprobs", values}, {"top_logprobs", tops}, {"text_offset", offsets}};
  }

  std::string TokenText(int32_t id) const {
    std::string s;
    (void)c_.tok->AppendTokenBytes(id, /*skip_special=*/false, &s);
    return s;
  }

  std::shared_ptr<core::RequestHandle> h_;
  CompletionContext c_;
  core::Output taken_;
  bool head_sent_ = false;
  int64_t text_offset_ = 0;
  int64_t sent_tokens_ = 0;  // tokens in the chunks sent so far
};

// Parses a small JSON object body whose fields must all be in `known`.
StatusOr<json> ParseObject(std::string_view text, const std::vector<std::string>& known, const char* what) {
  json body = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return InvalidArgument("the request body is not valid JSON");
  if (!body.is_object()) return InvalidArgument("the request body must be a JSON object");
  for (const auto& [key, value] : body.items()) {
    if (std::find(known.begin(), known.end(), key) == known.end())
      return InvalidArgument("field '", key, "' is not a field of ", what, " (did you mean '", Closest(key, known),
                             "'?)");
  }
  return body;
}

}  // namespace

http::Response ErrorResponse(const Status& s) {
  const int status = HttpStatus(s);
  return JsonResponse(status, ErrorObject(s, status));
}

Api::Api(core::Engine& engine, const tokenizer::Tokenizer& tok, ApiOptions options)
    : engine_(engine),
      tok_(tok),
      options_(std::move(options)),
      created_(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
                   .count()) {}

http::Response Api::TooLarge(uint64_t size, uint64_t limit) const {
  const Status s =
      ResourceExhausted("the request body is ", size, " bytes; the limit (--max-message-bytes) is ", limit);
  (void)Refuse("", s);  // logged and counted as resource_exhausted, answered 413 rather than 429
  return JsonResponse(413, ErrorObject(s, 413));
}

http::Response Api::NotRouted(int status, const http::Request& req) {
  const Status s = status == 405 ? absl::InvalidArgumentError(StrCat(req.method, " is not allowed on ", req.path))
                                 : absl::NotFoundError(StrCat("no route ", req.method, " ", req.path));
  return JsonResponse(status, ErrorObject(s, status));
}

Status Api::Authorize(const http::Request& req) const {
  if (options_.api_key.empty()) return absl::OkStatus();
  const std::string_view value = req.Header("authorization");
  if (value.empty()) return absl::UnauthenticatedError("missing 'Authorization: Bearer <key>' header");
  if (value != "Bearer " + options_.api_key) return absl::UnauthenticatedError("invalid API key in 'Authorization'");
  return absl::OkStatus();
}

http::Response Api::Refuse(const std::string& request_id, const Status& s) const {
  spdlog::info("request {} rejected: {}", request_id.empty() ? "-" : request_id, s.ToString());
  if (options_.metrics != nullptr) options_.metrics->RecordFailure(s);
  return ErrorResponse(s);
}

http::Reply Api::Completions(const http::Request& req) {
  const auto arrival = core::Clock::now();
  const std::string request_id(req.Header("x-request-id"));
  if (Status a = Authorize(req); !a.ok()) return Refuse(request_id, a);
  if (draining_) return Refuse(request_id, absl::UnavailableError("the server is shutting down"));
  auto parsed = ParseCompletionRequest(req.body, options_.limits.context_length);
  if (!parsed.ok()) return Refuse(request_id, parsed.status());
  if (parsed->model && *parsed->model != options_.served_model_name) {
    return Refuse(request_id, absl::NotFoundError(StrCat("field 'model' names '", *parsed->model,
                                                         "', which this server does not serve (it serves '",
                                                         options_.served_model_name, "')")));
  }
  parsed->generation.request_id = request_id;
  auto params = core::ValidateGeneration(parsed->generation, options_.limits, tok_, kCompletionFields);
  if (!params.ok()) return Refuse(request_id, params.status());
  const auto deadline =
      options_.request_timeout.count() > 0 ? arrival + options_.request_timeout : core::Clock::time_point::max();
  auto handle = engine_.Submit(std::move(*params), arrival, deadline);
  if (!handle.ok()) return Refuse(request_id, handle.status());
  CompletionContext c{
      .id = "cmpl-" + (request_id.empty() ? RandomHex() : request_id),
      .model = options_.served_model_name,
      .created =
          std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count(),
      .stream = parsed->stream,
      .include_usage = parsed->include_usage,
      .continuous_usage = parsed->continuous_usage,
      .tok = &tok_};
  return std::make_unique<CompletionStream>(std::move(*handle), std::move(c));
}

http::Reply Api::Tokenize(const http::Request& req) const {
  if (Status a = Authorize(req); !a.ok()) return ErrorResponse(a);
  auto body = ParseObject(req.body, {"model", "prompt", "add_special_tokens", "return_token_strs"}, "/tokenize");
  if (!body.ok()) return ErrorResponse(body.status());
  auto prompt = body->find("prompt");
  if (prompt == body->end() || !prompt->is_string())
    return ErrorResponse(InvalidArgument("field 'prompt' must be a string"));
  const std::string text = prompt->get<std::string>();
  if (static_cast<int64_t>(text.size()) > options_.limits.max_prompt_bytes)
    return ErrorResponse(InvalidArgument("field 'prompt' must be at most ", options_.limits.max_prompt_bytes,
                                         " bytes, got ", text.size()));
  auto ids = tok_.Encode(text);
  if (!ids.ok()) return ErrorResponse(ids.status());
  json token_strs = nullptr;
  if (body->value("return_token_strs", false)) {
    token_strs = json::array();
    for (int32_t id : *ids) {
      std::string s;
      (void)tok_.AppendTokenBytes(id, false, &s);
      token_strs.push_back(s);
    }
  }
  return JsonResponse(200, json{{"count", ids->size()},
                                {"max_model_len", options_.limits.context_length},
                                {"tokens", *ids},
                                {"token_strs", token_strs}});
}

http::Reply Api::Detokenize(const http::Request& req) const {
  if (Status a = Authorize(req); !a.ok()) return ErrorResponse(a);
  auto body = ParseObject(req.body, {"model", "tokens"}, "/detokenize");
  if (!body.ok()) return ErrorResponse(body.status());
  auto tokens = body->find("tokens");
  if (tokens == body->end() || !tokens->is_array())
    return ErrorResponse(InvalidArgument("field 'tokens' must be an array of token ids"));
  std::vector<int32_t> ids;
  for (size_t i = 0; i < tokens->size(); ++i) {
    const json& id = (*tokens)[i];
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= tok_.vocab_size())
      return ErrorResponse(
          InvalidArgument("field 'tokens[", i, "]' must be in [0, ", tok_.vocab_size(), "), got ", Dump(id)));
    ids.push_back(id.get<int32_t>());
  }
  auto text = tok_.Decode(ids, /*skip_special=*/false);
  if (!text.ok()) return ErrorResponse(text.status());
  return JsonResponse(200, json{{"prompt", *text}});
}

http::Reply Api::Models() const {
  json model{{"id", options_.served_model_name},
             {"object", "model"},
             {"created", created_},
             {"owned_by", "kraken-serve"},
             {"root", options_.served_model_name},
             {"parent", nullptr},
             {"max_model_len", options_.limits.context_length}};
  return JsonResponse(200, json{{"object", "list"}, {"data", json::array({model})}});
}

http::Reply Api::Health() const {
  const bool up = !draining_ && (!options_.serving || options_.serving());
  return http::Response{.status = up ? 200 : 503, .content_type = "text/plain; charset=utf-8", .body = ""};
}

void Api::Register(http::Server& server) {
  server.Route("POST", "/v1/completions", [this](const http::Request& r) { return Completions(r); });
  server.Route("POST", "/v1/chat/completions", [this](const http::Request& r) -> http::Reply {
    if (Status a = Authorize(r); !a.ok()) return ErrorResponse(a);
    return ErrorResponse(InvalidArgument("the model '", options_.served_model_name,
                                         "' is a base model with no chat template, and this server applies none of "
                                         "its own: use /v1/completions with the prompt as text"));
  });
  server.Route("GET", "/v1/models", [this](const http::Request& r) -> http::Reply {
    if (Status a = Authorize(r); !a.ok()) return ErrorResponse(a);
    return Models();
  });
  server.Route("POST", "/tokenize", [this](const http::Request& r) { return Tokenize(r); });
  server.Route("POST", "/detokenize", [this](const http::Request& r) { return Detokenize(r); });
  server.Route("GET", "/health", [this](const http::Request&) { return Health(); });
  server.Route("GET", "/version", [this](const http::Request&) -> http::Reply {
    return JsonResponse(200, json{{"version", options_.version}});
  });
  if (options_.metrics_text) {
    server.Route("GET", "/metrics", [this](const http::Request&) -> http::Reply {
      return http::Response{
          .status = 200, .content_type = "text/plain; version=0.0.4; charset=utf-8", .body = options_.metrics_text()};
    });
  }
}

}  // namespace kraken::openai
