#include "openai/api.h"

#include <random>

#include <spdlog/spdlog.h>

#include "base/closest.h"
#include "base/json_util.h"
#include "core/output_pump.h"
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
  std::string id;          // "cmpl-..." ("chatcmpl-..." for a chat)
  std::string request_id;  // X-Request-Id: the id without its prefix
  bool chat = false;       // the chat completions API's objects (messages and deltas) instead of text choices
  std::string model;
  int64_t created = 0;
  bool stream = false;
  bool include_usage = false;
  bool continuous_usage = false;
  const tokenizer::Tokenizer* tok = nullptr;
};

// OpenAI's usage object: `prompt` tokens (each prompt counted once, however many samples it has),
// the completion tokens of every sample; prompt_tokens_details.cached_tokens: prompt tokens whose
// KV came from the prefix cache (each prompt's first sample's: the others share its prompt blocks).
json Usage(int64_t prompt, int64_t completion_tokens, int64_t cached_tokens) {
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

// One completion of P prompts x n samples (choices, prompt by prompt: choice i is sample i % n of
// prompt i / n), JSON or SSE, pulled by its connection from an output pump over its samples.
class CompletionStream final : public http::Stream {
 public:
  CompletionStream(core::Handles hs, CompletionContext c) : c_(std::move(c)), n_(hs[0]->params().n) {
    for (auto& h : hs) {
      // With echo, a completion's text (and its logprobs' offsets) start after its prompt.
      const int64_t offset = h->params().echo ? static_cast<int64_t>(h->params().prompt_text.size()) : 0;
      pump_.Add(std::move(h), c_.stream ? core::Deltas::kTokens : core::Deltas::kEndOnly, {}, ChoiceState{offset});
    }
  }
  ~CompletionStream() override {
    for (const auto& h : pump_.handles()) h->Detach();
  }

  void Start(std::function<void()> wake) override {
    for (const auto& h : pump_.handles()) h->Listen(wake);
  }
  void Abort() override { pump_.CancelAll(); }
  bool Next(Piece* piece) override { return c_.stream ? NextEvent(piece) : NextBody(piece); }

 private:
  struct ChoiceState {
    int64_t text_offset = 0;  // bytes of its text the logprobs have covered
  };
  using Pump = core::OutputPump<ChoiceState>;
  using Sample = Pump::Slot;

  // What every choice shares (sampling, echo, logprobs), and choice i's own request (its prompt).
  const core::RequestParams& params() const { return pump_[0].handle->params(); }
  const core::RequestParams& params(size_t i) const { return pump_[i].handle->params(); }
  // The choice holding sample 0 of choice i's prompt: the one that scores the prompt and reads
  // the prefix cache for the others.
  size_t First(size_t i) const { return i - i % n_; }
  // The prompt logprobs choice i starts with, when echoed with logprobs.
  const std::vector<core::TokenLogprobs>* PromptLogprobs(size_t i) const {
    return params().prompt_logprobs ? &pump_[First(i)].taken.prompt_logprobs : nullptr;
  }
  // `completion_tokens` with every prompt counted once.
  json UsageWith(int64_t completion_tokens) const {
    int64_t prompt = 0, cached = 0;
    for (size_t i = 0; i < pump_.size(); i += n_) {
      prompt += static_cast<int64_t>(params(i).prompt.size());
      cached += pump_[i].taken.cached_tokens;
    }
    return Usage(prompt, completion_tokens, cached);
  }
  json TotalUsage(int64_t extra_tokens) const {
    int64_t tokens = extra_tokens;
    for (size_t i = 0; i < pump_.size(); ++i) tokens += pump_[i].sent_tokens;
    return UsageWith(tokens);
  }

  // The whole answer once every sample has ended.
  bool NextBody(Piece* piece) {
    pump_.TakeAll();
    if (const Sample* failed = pump_.Failed()) {
      piece->head = ErrorResponse(failed->taken.status);
      piece->end = true;
      pump_.CancelAll();
      return true;
    }
    if (!pump_.AllFinished()) return false;
    piece->end = true;
    json choices = json::array();
    int64_t completion_tokens = 0;
    for (size_t i = 0; i < pump_.size(); ++i) {
      Sample& s = pump_[i];
      const std::string text = (params().echo ? params(i).prompt_text : "") + s.taken.text;
      choices.push_back(
          Choice(i, text, s.taken.logprobs, FinishReason(s.taken), StopReason(s.taken), PromptLogprobs(i)));
      completion_tokens += s.taken.completion_tokens;
    }
    json body{{"id", c_.id},
              {"object", c_.chat ? "chat.completion" : "text_completion"},
              {"created", c_.created},
              {"model", c_.model},
              {"choices", std::move(choices)},
              {"usage", UsageWith(completion_tokens)}};
    piece->head = JsonResponse(200, body);
    piece->head->headers.emplace_back("X-Request-Id", c_.request_id);
    return true;
  }

  // Server-sent events: a chunk per sample with new tokens, each sample's finish reason on its
  // last one, the usage after them all when asked, then [DONE]. An error after the start is an
  // {"error": ...} event (the other samples are cancelled).
  bool NextEvent(Piece* piece) {
    if (!head_sent_) {
      head_sent_ = true;
      piece->head = http::Response{
          .status = 200,
          .content_type = "text/event-stream",
          .headers = {{"Cache-Control", "no-cache"}, {"X-Accel-Buffering", "no"}, {"X-Request-Id", c_.request_id}}};
    }
    pump_.TakeAll();
    const Sample* failed = pump_.Failed();
    if (c_.chat && !echo_sent_) {  // each choice opens with the assistant's role, as OpenAI streams a chat
      echo_sent_ = true;
      for (size_t i = 0; i < pump_.size(); ++i) {
        json chunk = Base(0);
        chunk["choices"] = json::array({json{{"index", i},
                                             {"delta", {{"role", "assistant"}, {"content", ""}}},
                                             {"logprobs", nullptr},
                                             {"finish_reason", nullptr}}});
        piece->data += Event(chunk);
      }
    }
    if (params().echo && !echo_sent_) {
      // The echoed prompt comes first in every choice; with logprobs, once the prefills have
      // scored every prompt (each before its samples' first tokens).
      for (size_t i = 0; i < pump_.size() && params().prompt_logprobs && failed == nullptr; i += n_) {
        const bool scored = pump_[i].taken.prompt_logprobs.size() + 1 >= params(i).prompt.size();
        if (!scored && !pump_[i].taken.finished) return piece->head.has_value();  // sample 0 alone scores it
      }
      echo_sent_ = true;
      for (size_t i = 0; i < pump_.size(); ++i)
        piece->data += Event(Chunk(i, params(i).prompt_text, {}, nullptr, nullptr, PromptLogprobs(i),
                                   /*chunk_tokens=*/0));
    }
    const Status failure = failed != nullptr ? failed->taken.status : absl::OkStatus();
    for (size_t i = 0; i < pump_.size(); ++i) {
      Sample& s = pump_[i];
      if (!failure.ok()) {
        if (!s.taken.text.empty()) piece->data += Event(Chunk(i, s.taken.text, s.taken.logprobs, nullptr, nullptr));
        pump_.Sent(s);  // the usage of the chunks after it counts its tokens
        continue;
      }
      if (!s.has_news()) continue;
      const bool ended = s.taken.finished;
      piece->data += Event(Chunk(i, s.taken.text, s.taken.logprobs, ended ? FinishReason(s.taken) : json(nullptr),
                                 ended ? StopReason(s.taken) : json(nullptr)));
      pump_.Sent(s);
    }
    if (!failure.ok()) {
      pump_.CancelAll();
      piece->data += Event(ErrorObject(failure, HttpStatus(failure)));
    } else if (pump_.AllSent() && c_.include_usage) {
      json usage_chunk = Base(0);
      usage_chunk["choices"] = json::array();
      usage_chunk["usage"] = TotalUsage(0);
      piece->data += Event(usage_chunk);
    }
    if (!failure.ok() || pump_.AllSent()) {
      piece->data += "data: [DONE]\n\n";
      piece->end = true;
    }
    return !piece->data.empty() || piece->head.has_value() || piece->end;
  }

  static std::string Event(const json& j) { return "data: " + Dump(j) + "\n\n"; }

  // What every chunk repeats; `chunk_tokens`: the tokens of the chunk being built (continuous usage).
  json Base(int64_t chunk_tokens) const {
    json j{{"id", c_.id},
           {"object", c_.chat ? "chat.completion.chunk" : "text_completion"},
           {"created", c_.created},
           {"model", c_.model}};
    if (c_.continuous_usage)  // vLLM's continuous_usage_stats: the tokens sent so far, this chunk's included
      j["usage"] = TotalUsage(chunk_tokens);
    else if (c_.include_usage)
      j["usage"] = nullptr;
    return j;
  }

  // `prompt`: the prompt's logprobs, for a choice that starts with the echoed prompt;
  // `chunk_tokens`: the generated tokens the chunk holds (-1: the choice's taken ids).
  json Chunk(size_t index, const std::string& text, const std::vector<core::TokenLogprobs>& lps, json finish, json stop,
             const std::vector<core::TokenLogprobs>* prompt = nullptr, int64_t chunk_tokens = -1) {
    json j = Base(chunk_tokens >= 0 ? chunk_tokens : static_cast<int64_t>(pump_[index].taken.ids.size()));
    j["choices"] = json::array({Choice(index, text, lps, std::move(finish), std::move(stop), prompt)});
    return j;
  }

  json Choice(size_t index, const std::string& text, const std::vector<core::TokenLogprobs>& lps, json finish,
              json stop, const std::vector<core::TokenLogprobs>* prompt = nullptr) {
    if (c_.chat) {  // a message, or in a stream a delta of one
      json choice{{"index", index}};
      if (c_.stream)
        choice["delta"] = text.empty() ? json::object() : json{{"content", text}};
      else
        choice["message"] = json{{"role", "assistant"}, {"content", text}};
      choice["logprobs"] = ChatLogprobs(lps);
      choice["finish_reason"] = std::move(finish);
      choice["stop_reason"] = std::move(stop);
      return choice;
    }
    return json{{"index", index},
                {"text", text},
                {"logprobs", Logprobs(index, lps, prompt)},
                {"finish_reason", std::move(finish)},
                {"stop_reason", std::move(stop)}};
  }

  // The completions API's logprobs object: each token's text, logprob, the alternatives asked
  // for, and where its text starts (bytes into the choice's text). With `prompt` (echo), the
  // prompt's tokens come first, the first with a null logprob and alternatives (nothing precedes
  // it), as vLLM and OpenAI give them.
  json Logprobs(size_t index, const std::vector<core::TokenLogprobs>& lps,
                const std::vector<core::TokenLogprobs>* prompt) {
    if (!params().logprobs) return nullptr;
    ChoiceState& s = pump_[index].extra;
    json tokens = json::array(), values = json::array(), offsets = json::array();
    json tops = params().sampling.top_logprobs > 0 ? json::array() : json(nullptr);
    if (prompt != nullptr) {
      int64_t offset = 0;
      const std::vector<int32_t>& ids = pump_[index].handle->params().prompt;
      for (size_t j = 0; j < ids.size(); ++j) {
        const std::string piece = TokenText(ids[j]);
        tokens.push_back(piece);
        offsets.push_back(offset);
        offset += static_cast<int64_t>(piece.size());
        const core::TokenLogprobs* lp = j >= 1 && j - 1 < prompt->size() ? &(*prompt)[j - 1] : nullptr;
        values.push_back(lp != nullptr ? json(lp->logprob) : json(nullptr));
        if (tops.is_array()) {
          json alternatives = lp != nullptr ? json::object() : json(nullptr);
          if (lp != nullptr)
            for (const engine::TokenLogprob& t : lp->top) alternatives[TokenText(t.token)] = t.logprob;
          tops.push_back(std::move(alternatives));
        }
      }
    }
    for (const core::TokenLogprobs& lp : lps) {
      const std::string piece = TokenText(lp.token);
      tokens.push_back(piece);
      values.push_back(lp.logprob);
      offsets.push_back(s.text_offset);
      s.text_offset += piece.size();
      if (tops.is_array()) {
        json alternatives = json::object();
        for (const engine::TokenLogprob& t : lp.top) alternatives[TokenText(t.token)] = t.logprob;
        tops.push_back(std::move(alternatives));
      }
    }
    return json{{"tokens", tokens}, {"token_logprobs", values}, {"top_logprobs", tops}, {"text_offset", offsets}};
  }

  // The chat API's logprobs object: {"content": [{"token", "logprob", "bytes", "top_logprobs":
  // [the top_logprobs most likely, each {"token", "logprob", "bytes"}]}]}, or null without logprobs.
  json ChatLogprobs(const std::vector<core::TokenLogprobs>& lps) const {
    if (!params().logprobs) return nullptr;
    auto entry = [&](int32_t token, float logprob) {
      const std::string piece = TokenText(token);
      json bytes = json::array();
      for (unsigned char b : piece) bytes.push_back(static_cast<int>(b));
      return json{{"token", piece}, {"logprob", logprob}, {"bytes", std::move(bytes)}};
    };
    json content = json::array();
    const size_t k = static_cast<size_t>(params().sampling.top_logprobs);
    for (const core::TokenLogprobs& lp : lps) {
      json e = entry(lp.token, lp.logprob);
      json tops = json::array();
      // The engine adds the chosen token when it is not among the k most likely; the chat API
      // reports the k most likely alone.
      for (size_t i = 0; i < std::min(k, lp.top.size()); ++i) tops.push_back(entry(lp.top[i].token, lp.top[i].logprob));
      e["top_logprobs"] = std::move(tops);
      content.push_back(std::move(e));
    }
    return json{{"content", std::move(content)}};
  }

  std::string TokenText(int32_t id) const {
    std::string s;
    (void)c_.tok->AppendTokenBytes(id, /*skip_special=*/false, &s);
    return s;
  }

  CompletionContext c_;
  const size_t n_;  // samples per prompt
  Pump pump_;
  bool head_sent_ = false, echo_sent_ = false;
};

// Parses a small JSON object body whose fields must all be in `known`.
StatusOr<json> ParseObject(std::string_view text, const std::vector<std::string>& known, const char* what) {
  KRAKEN_ASSIGN_OR_RETURN(json body, ParseJsonStrict(text, "the request body", kMaxRequestJsonDepth));
  if (!body.is_object()) return InvalidArgument("the request body must be a JSON object, got ", body.type_name());
  for (const auto& [key, value] : body.items()) {
    if (std::find(known.begin(), known.end(), key) == known.end())
      return FieldError(key, "is not a field of ", what, " (did you mean '", Closest(key, known), "'?)");
  }
  return body;
}

// The call as the front door sees it: its X-Request-Id and its Authorization header (nullopt when
// absent or empty).
core::Call CallOf(const http::Request& req) {
  const std::string_view authorization = req.Header("authorization");
  return core::Call{.request_id = std::string(req.Header("x-request-id")),
                    .authorization = authorization.empty() ? std::nullopt : std::optional<std::string>(authorization),
                    .spelling = {.name = "Authorization", .carrier = "header"}};
}

// What every chunk or body of the answer to `call` repeats: its ids ("cmpl-" or "chatcmpl-" and the
// request id, given or drawn), the model, the time, and how it streams.
CompletionContext Context(const core::Call& call, const CompletionRequest& r, bool chat, const std::string& model,
                          const tokenizer::Tokenizer* tok) {
  const std::string request_id = call.request_id.empty() ? RandomHex() : call.request_id;
  return CompletionContext{
      .id = (chat ? "chatcmpl-" : "cmpl-") + request_id,
      .request_id = request_id,
      .chat = chat,
      .model = model,
      .created =
          std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count(),
      .stream = r.stream,
      .include_usage = r.include_usage,
      .continuous_usage = r.continuous_usage,
      .tok = tok};
}

}  // namespace

http::Response ErrorResponse(const Status& s) {
  const int status = HttpStatus(s);
  return JsonResponse(status, ErrorObject(s, status));
}

Api::Api(const core::Admission& door, ApiOptions options)
    : door_(door),
      tok_(door.tokenizer()),
      limits_(door.limits()),
      options_(std::move(options)),
      created_(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
                   .count()) {}

http::Response Api::TooLarge(uint64_t size, uint64_t limit) const {
  const Status s =
      ResourceExhausted("the request body is ", size, " bytes; the limit (--max-message-bytes) is ", limit);
  (void)door_.Refuse("", s);  // logged and counted as resource_exhausted, answered 413 rather than 429
  return JsonResponse(413, ErrorObject(s, 413));
}

http::Response Api::NotRouted(int status, const http::Request& req) {
  const Status s = status == 405 ? absl::InvalidArgumentError(StrCat(req.method, " is not allowed on ", req.path))
                                 : absl::NotFoundError(StrCat("no route ", req.method, " ", req.path));
  return JsonResponse(status, ErrorObject(s, status));
}

Status Api::Authorize(const http::Request& req) const {
  const core::Call call = CallOf(req);
  return door_.Authorize(call.authorization, call.spelling);
}

http::Reply Api::Completions(const http::Request& req) {
  const core::Call call = CallOf(req);
  std::optional<CompletionRequest> parsed;
  auto handles = door_.AcceptBatch(
      call,
      [&](std::string*) -> StatusOr<std::vector<core::GenerationRequest>> {
        KRAKEN_ASSIGN_OR_RETURN(parsed, ParseCompletionRequest(req.body, limits_.context_length));
        KRAKEN_RETURN_IF_ERROR(CheckModel(parsed->model));
        return std::move(parsed->generations);
      },
      kCompletionFields);
  if (!handles.ok()) return ErrorResponse(handles.status());
  return std::make_unique<CompletionStream>(std::move(*handles),
                                            Context(call, *parsed, /*chat=*/false, options_.served_model_name, &tok_));
}

Status Api::CheckModel(const std::optional<std::string>& model) const {
  if (!model || *model == options_.served_model_name) return absl::OkStatus();
  return WithField(
      absl::NotFoundError(StrCat("field 'model' names '", *model, "', which this server does not serve (it serves '",
                                 options_.served_model_name, "')")),
      "model");
}

StatusOr<std::string> Api::RenderChat(const ChatRequest& chat) const {
  if (!options_.chat_template)
    return FieldError("messages", "cannot be rendered: the model '", options_.served_model_name,
                      "' has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); serve it "
                      "with --chat-template FILE, or send the prompt as text to /v1/completions");
  // What transformers' apply_chat_template gives a template: the special tokens, then these.
  nlohmann::ordered_json context = options_.chat_template->special_tokens;
  context["messages"] = chat.messages;
  context["add_generation_prompt"] = chat.add_generation_prompt;
  context["tools"] = nullptr;
  context["documents"] = nullptr;
  return options_.chat_template->chat_template.Render(context);
}

http::Reply Api::Chat(const http::Request& req) {
  const core::Call call = CallOf(req);
  std::optional<ChatRequest> parsed;
  auto handles = door_.Accept(
      call,
      [&](std::string*) -> StatusOr<core::GenerationRequest> {
        KRAKEN_ASSIGN_OR_RETURN(parsed, ParseChatRequest(req.body, limits_.context_length));
        KRAKEN_RETURN_IF_ERROR(CheckModel(parsed->completion.model));
        KRAKEN_ASSIGN_OR_RETURN(std::string prompt, RenderChat(*parsed));
        core::GenerationRequest g = parsed->completion.generation;
        g.text = std::move(prompt);
        return g;
      },
      kChatFieldNames);
  if (!handles.ok()) return ErrorResponse(handles.status());
  return std::make_unique<CompletionStream>(
      std::move(*handles), Context(call, parsed->completion, /*chat=*/true, options_.served_model_name, &tok_));
}

http::Reply Api::Tokenize(const http::Request& req) const {
  if (Status a = Authorize(req); !a.ok()) return ErrorResponse(a);
  auto body = ParseObject(req.body, {"model", "prompt", "add_special_tokens", "return_token_strs"}, "/tokenize");
  if (!body.ok()) return ErrorResponse(body.status());
  auto prompt = body->find("prompt");
  if (prompt == body->end() || !prompt->is_string()) return ErrorResponse(FieldError("prompt", "must be a string"));
  const std::string text = prompt->get<std::string>();
  if (static_cast<int64_t>(text.size()) > limits_.max_prompt_bytes)
    return ErrorResponse(
        FieldError("prompt", "must be at most ", limits_.max_prompt_bytes, " bytes, got ", text.size()));
  // vLLM's add_special_tokens (default true): the tokenizer's post-processor template (a BOS).
  const auto add_special = body->find("add_special_tokens");
  if (add_special != body->end() && !add_special->is_null() && !add_special->is_boolean())
    return ErrorResponse(
        FieldError("add_special_tokens", "must be true or false, got ", PreviewJson(*add_special, 40)));
  const bool add = add_special == body->end() || !add_special->is_boolean() || add_special->get<bool>();
  auto ids = tok_.Encode(text, /*parse_special=*/true, add);
  if (!ids.ok()) return ErrorResponse(ids.status());
  json token_strs = nullptr;
  const auto want_strs = body->find("return_token_strs");
  if (want_strs != body->end() && !want_strs->is_null() && !want_strs->is_boolean())
    return ErrorResponse(FieldError("return_token_strs", "must be true or false, got ", PreviewJson(*want_strs, 40)));
  if (want_strs != body->end() && want_strs->is_boolean() && want_strs->get<bool>()) {
    token_strs = json::array();
    for (int32_t id : *ids) {
      std::string s;
      (void)tok_.AppendTokenBytes(id, false, &s);
      token_strs.push_back(s);
    }
  }
  return JsonResponse(200, json{{"count", ids->size()},
                                {"max_model_len", limits_.context_length},
                                {"tokens", *ids},
                                {"token_strs", token_strs}});
}

http::Reply Api::Detokenize(const http::Request& req) const {
  if (Status a = Authorize(req); !a.ok()) return ErrorResponse(a);
  auto body = ParseObject(req.body, {"model", "tokens"}, "/detokenize");
  if (!body.ok()) return ErrorResponse(body.status());
  auto tokens = body->find("tokens");
  if (tokens == body->end() || !tokens->is_array())
    return ErrorResponse(FieldError("tokens", "must be an array of token ids"));
  std::vector<int32_t> ids;
  for (size_t i = 0; i < tokens->size(); ++i) {
    const json& id = (*tokens)[i];
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= tok_.vocab_size())
      return ErrorResponse(
          FieldError(StrCat("tokens[", i, "]"), "must be in [0, ", tok_.vocab_size(), "), got ", PreviewJson(id, 40)));
    ids.push_back(id.get<int32_t>());
  }
  auto text = tok_.Decode(ids, /*skip_special=*/false);
  if (!text.ok()) return ErrorResponse(text.status());
  return JsonResponse(200, json{{"prompt", *text}});
}

json Api::ModelObject() const {
  return json{{"id", options_.served_model_name},
              {"object", "model"},
              {"created", created_},
              {"owned_by", "kraken-serve"},
              {"root", options_.served_model_name},
              {"parent", nullptr},
              {"max_model_len", limits_.context_length}};
}

http::Reply Api::Models() const {
  return JsonResponse(200, json{{"object", "list"}, {"data", json::array({ModelObject()})}});
}

http::Reply Api::Health() const {
  const bool up = door_.health().ready();
  return http::Response{.status = up ? 200 : 503, .content_type = "text/plain; charset=utf-8", .body = ""};
}

void Api::Register(http::Server& server) {
  server.Route("POST", "/v1/completions", [this](const http::Request& r) { return Completions(r); });
  server.Route("POST", "/v1/chat/completions", [this](const http::Request& r) { return Chat(r); });
  server.Route("GET", "/v1/models", [this](const http::Request& r) -> http::Reply {
    if (Status a = Authorize(r); !a.ok()) return ErrorResponse(a);
    return Models();
  });
  // The one model by its id (exact routes: another id has no route and gets 404).
  server.Route("GET", "/v1/models/" + options_.served_model_name, [this](const http::Request& r) -> http::Reply {
    if (Status a = Authorize(r); !a.ok()) return ErrorResponse(a);
    return JsonResponse(200, ModelObject());
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
