#include "openai/protocol.h"

#include <charconv>
#include <cmath>
#include <limits>

#include "base/closest.h"
#include "base/json_util.h"

namespace kraken::openai {
namespace {

using nlohmann::json;

const core::FieldNames kNames{.text = "prompt", .token_ids = "prompt", .top_logprobs = "logprobs"};

// Every field of the completions API this server knows, supported or not.
const std::vector<std::string> kKnownFields = {"model",
                                               "prompt",
                                               "max_tokens",
                                               "temperature",
                                               "top_p",
                                               "top_k",
                                               "min_p",
                                               "typical_p",
                                               "presence_penalty",
                                               "frequency_penalty",
                                               "repetition_penalty",
                                               "seed",
                                               "stop",
                                               "stop_token_ids",
                                               "logprobs",
                                               "echo",
                                               "n",
                                               "best_of",
                                               "stream",
                                               "stream_options",
                                               "user",
                                               "suffix",
                                               "logit_bias",
                                               "min_tokens",
                                               "ignore_eos",
                                               "skip_special_tokens",
                                               "priority"};

// A JSON value for an error message: its type and a short preview of the value (never a dump
// of the whole value, which may be megabytes long).
std::string Shown(const json& v) {
  return StrCat(v.type_name(), " ", PreviewJson(v, 40));
}

Status WrongType(const std::string& field, const char* want, const json& v) {
  return FieldError(field, "must be ", want, ", got ", Shown(v));
}

// An integer JSON value as int64; one beyond it (only unsigned values can be) as the largest
// int64, which every limit check then reports as too large.
int64_t ToInt64(const json& v) {
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    return std::numeric_limits<int64_t>::max();
  return v.get<int64_t>();
}

// Readers of one field; an absent or null field leaves `out` as it was.
Status ReadInt(const json& body, const std::string& field, std::optional<int64_t>* out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (it->is_number_float() && std::fabs(it->get<double>()) >= 0x1p63 &&
      it->get<double>() == std::floor(it->get<double>()))
    return FieldError(field, "must be an integer in [-2^63, 2^63), got ", PreviewJson(*it, 40), " (too large)");
  if (!it->is_number_integer()) return WrongType(field, "an integer", *it);
  *out = ToInt64(*it);
  return absl::OkStatus();
}

Status ReadNumber(const json& body, const std::string& field, std::optional<double>* out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return WrongType(field, "a number", *it);
  *out = it->get<double>();
  return absl::OkStatus();
}

Status ReadBool(const json& body, const std::string& field, bool* out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return WrongType(field, "true or false", *it);
  *out = it->get<bool>();
  return absl::OkStatus();
}

// One prompt: a string, or an array of token ids (`field` names it in errors).
Status ReadOnePrompt(const json& p, const std::string& field, core::GenerationRequest* g) {
  if (p.is_string()) {
    g->text = p.get<std::string>();
    return absl::OkStatus();
  }
  if (!p.is_array()) return WrongType(field, "a string or an array of token ids", p);
  std::vector<int64_t> ids;
  ids.reserve(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    const json& id = p[i];
    if (!id.is_number_integer()) return WrongType(StrCat(field, "[", i, "]"), "an integer token id", id);
    ids.push_back(ToInt64(id));
  }
  g->token_ids = std::move(ids);
  return absl::OkStatus();
}

// "prompt": a string, an array of token ids, or an array of prompts (strings or token-id arrays,
// OpenAI's batch form): the first into `g`, the others into `more`.
Status ReadPrompt(const json& body, core::GenerationRequest* g, std::vector<core::GenerationRequest>* more) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) return absl::OkStatus();  // ValidateGeneration names it
  const json& p = *it;
  if (!p.is_array() || p.empty() || !(p.front().is_string() || p.front().is_array()))
    return ReadOnePrompt(p, "prompt", g);
  if (p.size() == 1) return ReadOnePrompt(p.front(), "prompt", g);
  if (p.size() > static_cast<size_t>(kMaxPromptsPerRequest))
    return FieldError("prompt", "holds ", p.size(), " prompts; at most ", kMaxPromptsPerRequest, " per request");
  for (size_t i = 0; i < p.size(); ++i) {
    const std::string field = StrCat("prompt[", i, "]");
    if (!p[i].is_string() && !p[i].is_array()) return WrongType(field, "a string or an array of token ids", p[i]);
    core::GenerationRequest one;
    KRAKEN_RETURN_IF_ERROR(ReadOnePrompt(p[i], field, &one));
    if (i == 0) {
      g->text = std::move(one.text);
      g->token_ids = std::move(one.token_ids);
    } else {
      more->push_back(std::move(one));
    }
  }
  return absl::OkStatus();
}

Status ReadStops(const json& body, core::GenerationRequest* g) {
  if (auto it = body.find("stop"); it != body.end() && !it->is_null()) {
    if (it->is_string()) {
      g->stop.push_back(it->get<std::string>());
    } else if (it->is_array()) {
      for (size_t i = 0; i < it->size(); ++i) {
        if (!(*it)[i].is_string()) return WrongType(StrCat("stop[", i, "]"), "a string", (*it)[i]);
        g->stop.push_back((*it)[i].get<std::string>());
      }
    } else {
      return WrongType("stop", "a string or an array of strings", *it);
    }
  }
  if (auto it = body.find("stop_token_ids"); it != body.end() && !it->is_null()) {
    if (!it->is_array()) return WrongType("stop_token_ids", "an array of token ids", *it);
    for (size_t i = 0; i < it->size(); ++i) {
      const json& id = (*it)[i];
      if (!id.is_number_integer()) return WrongType(StrCat("stop_token_ids[", i, "]"), "an integer token id", id);
      g->stop_token_ids.push_back(ToInt64(id));
    }
  }
  return absl::OkStatus();
}

// Fields this server knows but whose non-default values it does not offer.
Status CheckUnsupported(const json& body, const core::GenerationRequest& g) {
  std::optional<int64_t> best_of;
  KRAKEN_RETURN_IF_ERROR(ReadInt(body, "best_of", &best_of));
  if (best_of && *best_of != g.n.value_or(1))
    return FieldError("best_of", "must equal n (", g.n.value_or(1),
                      "): this server returns every sample it generates, got ", *best_of);
  if (auto it = body.find("suffix"); it != body.end() && !it->is_null() && !(it->is_string() && it->empty()))
    return FieldError("suffix", "is not supported (the bundled models have no infilling), got ", Shown(*it));
  return absl::OkStatus();
}

// "logit_bias": {"<token id>": bias, ...} as OpenAI spells it (the keys are strings).
Status ReadLogitBias(const json& body, core::GenerationRequest* g) {
  auto it = body.find("logit_bias");
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_object()) return WrongType("logit_bias", "an object of token ids to biases", *it);
  for (const auto& [key, value] : it->items()) {
    int64_t id = 0;
    const char* end = key.data() + key.size();
    const auto parsed = std::from_chars(key.data(), end, id);
    if (key.empty() || parsed.ec != std::errc() || parsed.ptr != end)
      return FieldError("logit_bias", "has the key ", PreviewJson(json(key), 40), ", which is not a token id");
    if (!value.is_number()) return WrongType(StrCat("logit_bias[\"", key, "\"]"), "a number", value);
    g->logit_bias.emplace_back(id, value.get<double>());
  }
  return absl::OkStatus();
}

Status ReadSampling(const json& body, core::GenerationRequest* g) {
  KRAKEN_RETURN_IF_ERROR(ReadNumber(body, "temperature", &g->temperature));
  KRAKEN_RETURN_IF_ERROR(ReadNumber(body, "top_p", &g->top_p));
  KRAKEN_RETURN_IF_ERROR(ReadInt(body, "top_k", &g->top_k));
  KRAKEN_RETURN_IF_ERROR(ReadNumber(body, "min_p", &g->min_p));
  KRAKEN_RETURN_IF_ERROR(ReadNumber(body, "typical_p", &g->typical_p));
  KRAKEN_RETURN_IF_ERROR(ReadNumber(body, "presence_penalty", &g->presence_penalty));
  KRAKEN_RETURN_IF_ERROR(ReadNumber(body, "frequency_penalty", &g->frequency_penalty));
  KRAKEN_RETURN_IF_ERROR(ReadNumber(body, "repetition_penalty", &g->repetition_penalty));
  std::optional<int64_t> seed;
  if (auto it = body.find("seed"); it != body.end() && it->is_number_unsigned()) {
    g->seed = it->get<uint64_t>();
  } else {
    KRAKEN_RETURN_IF_ERROR(ReadInt(body, "seed", &seed));
    if (seed && *seed < 0) return FieldError("seed", "must be >= 0, got ", *seed);
    if (seed) g->seed = static_cast<uint64_t>(*seed);
  }
  return absl::OkStatus();
}

// The completions API's "logprobs": how many alternatives (a boolean reads as 1 or 0, as
// pydantic-based servers such as vLLM read it).
Status ReadCompletionLogprobs(const json& body, core::GenerationRequest* g) {
  std::optional<int64_t> logprobs;
  if (auto it = body.find("logprobs"); it != body.end() && it->is_boolean()) {
    logprobs = it->get<bool>() ? 1 : 0;
  } else {
    KRAKEN_RETURN_IF_ERROR(ReadInt(body, "logprobs", &logprobs));
  }
  if (logprobs) {  // the chosen token's logprob and this many alternatives
    g->logprobs = true;
    g->top_logprobs = *logprobs;
  }
  return absl::OkStatus();
}

// The fields the completions and chat APIs share (every one but the prompt, echo, logprobs,
// best_of and suffix on one side, messages and the chat's logprobs on the other).
Status ReadShared(const json& body, int context_length, CompletionRequest* r) {
  core::GenerationRequest& g = r->generation;
  if (auto it = body.find("model"); it != body.end() && !it->is_null()) {
    if (!it->is_string()) return WrongType("model", "a string", *it);
    r->model = it->get<std::string>();
  }
  if (auto it = body.find("user"); it != body.end() && !it->is_null() && !it->is_string())
    return WrongType("user", "a string", *it);
  if (auto it = body.find("max_tokens"); it != body.end() && it->is_null()) {
    g.max_tokens = context_length;  // as many as fit: ValidateGeneration fits it to the prompt
  } else {
    KRAKEN_RETURN_IF_ERROR(ReadInt(body, "max_tokens", &g.max_tokens));
  }
  std::optional<int64_t> min_tokens, priority;
  KRAKEN_RETURN_IF_ERROR(ReadInt(body, "min_tokens", &min_tokens));
  KRAKEN_RETURN_IF_ERROR(ReadInt(body, "priority", &priority));
  g.min_tokens = min_tokens.value_or(0);
  g.priority = priority.value_or(0);
  KRAKEN_RETURN_IF_ERROR(ReadSampling(body, &g));
  KRAKEN_RETURN_IF_ERROR(ReadInt(body, "n", &g.n));
  KRAKEN_RETURN_IF_ERROR(ReadStops(body, &g));
  KRAKEN_RETURN_IF_ERROR(ReadLogitBias(body, &g));
  KRAKEN_RETURN_IF_ERROR(ReadBool(body, "ignore_eos", &g.ignore_eos));
  bool skip_special = true;
  KRAKEN_RETURN_IF_ERROR(ReadBool(body, "skip_special_tokens", &skip_special));
  g.skip_special_tokens = skip_special;
  KRAKEN_RETURN_IF_ERROR(ReadBool(body, "stream", &r->stream));
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) return WrongType("stream_options", "an object", *it);
    for (const auto& [key, value] : it->items()) {
      if (key != "include_usage" && key != "continuous_usage_stats")
        return FieldError("stream_options." + key, "is not a stream option (include_usage)");
    }
    KRAKEN_RETURN_IF_ERROR(ReadBool(*it, "include_usage", &r->include_usage));
    KRAKEN_RETURN_IF_ERROR(ReadBool(*it, "continuous_usage_stats", &r->continuous_usage));
    if (!r->stream) return FieldError("stream_options", "is allowed only with 'stream': true");
  }
  return absl::OkStatus();
}

// A body that is a JSON object of known fields (`api` names the API in the refusal).
StatusOr<json> ParseBody(std::string_view text, const std::vector<std::string>& known, const char* api) {
  KRAKEN_ASSIGN_OR_RETURN(json body, ParseJsonStrict(text, "the request body", kMaxRequestJsonDepth));
  if (!body.is_object()) return InvalidArgument("the request body must be a JSON object, got ", Shown(body));
  for (const auto& [key, value] : body.items()) {
    if (std::find(known.begin(), known.end(), key) == known.end())
      return FieldError(key, "is not a field of the ", api, " API (did you mean '", Closest(key, known), "'?)");
  }
  return body;
}

}  // namespace

const core::FieldNames kCompletionFields = kNames;
const core::FieldNames kChatFieldNames{.text = "messages", .token_ids = "messages", .top_logprobs = "top_logprobs"};

std::string Dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

StatusOr<CompletionRequest> ParseCompletionRequest(std::string_view text, int context_length) {
  KRAKEN_ASSIGN_OR_RETURN(json body, ParseBody(text, kKnownFields, "completions"));
  CompletionRequest r;
  core::GenerationRequest& g = r.generation;
  KRAKEN_RETURN_IF_ERROR(ReadShared(body, context_length, &r));
  std::vector<core::GenerationRequest> more_prompts;
  KRAKEN_RETURN_IF_ERROR(ReadPrompt(body, &g, &more_prompts));
  KRAKEN_RETURN_IF_ERROR(ReadCompletionLogprobs(body, &g));
  KRAKEN_RETURN_IF_ERROR(ReadBool(body, "echo", &g.echo));
  KRAKEN_RETURN_IF_ERROR(CheckUnsupported(body, g));
  g.prompt_logprobs = g.echo && g.logprobs;  // the echoed prompt comes with its logprobs
  r.generations.push_back(g);
  for (core::GenerationRequest& other : more_prompts) {  // every field but the prompt as the first's
    core::GenerationRequest copy = g;
    copy.text = std::move(other.text);
    copy.token_ids = std::move(other.token_ids);
    r.generations.push_back(std::move(copy));
  }
  return r;
}

namespace {

// Every field of the chat completions API this server knows, supported or not.
const std::vector<std::string> kChatFields = {"model",
                                              "messages",
                                              "max_tokens",
                                              "max_completion_tokens",
                                              "temperature",
                                              "top_p",
                                              "top_k",
                                              "min_p",
                                              "typical_p",
                                              "presence_penalty",
                                              "frequency_penalty",
                                              "repetition_penalty",
                                              "seed",
                                              "stop",
                                              "stop_token_ids",
                                              "logprobs",
                                              "top_logprobs",
                                              "n",
                                              "stream",
                                              "stream_options",
                                              "user",
                                              "logit_bias",
                                              "min_tokens",
                                              "ignore_eos",
                                              "skip_special_tokens",
                                              "priority",
                                              "add_generation_prompt",
                                              "tools",
                                              "tool_choice",
                                              "response_format",
                                              "parallel_tool_calls"};

// "messages": a non-empty array of objects, each with a string "role" and a "content" that is a
// string, an array of content parts ({"type": "text", "text": ...} and others the template
// reads), or null.
Status CheckMessages(const nlohmann::ordered_json& messages) {
  if (!messages.is_array() || messages.empty())
    return FieldError("messages", "must be a non-empty array of messages, got ",
                      messages.is_array() ? "an empty array" : messages.type_name());
  if (messages.size() > static_cast<size_t>(kMaxChatMessages))
    return FieldError("messages", "holds ", messages.size(), " messages; at most ", kMaxChatMessages, " per request");
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    const std::string field = StrCat("messages[", i, "]");
    if (!m.is_object()) return FieldError(field, "must be an object with 'role' and 'content', got ", m.type_name());
    if (!m.contains("role") || !m["role"].is_string())
      return FieldError(field + ".role", "must be a string (system, user, assistant, ...)");
    if (m.contains("content") && !m["content"].is_string() && !m["content"].is_array() && !m["content"].is_null())
      return FieldError(field + ".content", "must be a string, an array of content parts or null, got ",
                        m["content"].type_name());
  }
  return absl::OkStatus();
}

// Fields of the chat API whose non-default values this server does not offer.
Status CheckChatUnsupported(const json& body) {
  if (auto it = body.find("tools"); it != body.end() && !it->is_null() && !(it->is_array() && it->empty()))
    return FieldError("tools", "is not supported (this server does not parse tool calls), got ", Shown(*it));
  if (auto it = body.find("tool_choice"); it != body.end() && !it->is_null() && *it != "none" && *it != "auto")
    return FieldError("tool_choice", "is not supported, got ", Shown(*it));
  if (auto it = body.find("response_format"); it != body.end() && !it->is_null()) {
    if (!it->is_object() || it->value("type", "") != "text")
      return FieldError("response_format", "may only be {\"type\": \"text\"} (no guided decoding here), got ",
                        Shown(*it));
  }
  return absl::OkStatus();
}

}  // namespace

StatusOr<ChatRequest> ParseChatRequest(std::string_view text, int context_length) {
  KRAKEN_ASSIGN_OR_RETURN(json body, ParseBody(text, kChatFields, "chat completions"));
  ChatRequest r;
  core::GenerationRequest& g = r.completion.generation;
  KRAKEN_RETURN_IF_ERROR(ReadShared(body, context_length, &r.completion));
  std::optional<int64_t> max_completion_tokens;
  KRAKEN_RETURN_IF_ERROR(ReadInt(body, "max_completion_tokens", &max_completion_tokens));
  if (max_completion_tokens) g.max_tokens = max_completion_tokens;
  bool logprobs = false;
  KRAKEN_RETURN_IF_ERROR(ReadBool(body, "logprobs", &logprobs));
  std::optional<int64_t> top_logprobs;
  KRAKEN_RETURN_IF_ERROR(ReadInt(body, "top_logprobs", &top_logprobs));
  if (top_logprobs && *top_logprobs > 0 && !logprobs)
    return FieldError("top_logprobs", "needs 'logprobs': true, got ", *top_logprobs);
  g.logprobs = logprobs;
  g.top_logprobs = top_logprobs.value_or(0);
  KRAKEN_RETURN_IF_ERROR(ReadBool(body, "add_generation_prompt", &r.add_generation_prompt));
  KRAKEN_RETURN_IF_ERROR(CheckChatUnsupported(body));
  // The messages keep their keys' order (a template may print a message as JSON).
  if (!body.contains("messages")) return FieldError("messages", "must be set");
  r.messages = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false)["messages"];
  KRAKEN_RETURN_IF_ERROR(CheckMessages(r.messages));
  g.add_special_tokens = false;  // the template writes its own BOS, as transformers and vLLM render chats
  return r;
}

int HttpStatus(const Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kDeadlineExceeded:
      return 408;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kCancelled:
      return 499;
    case absl::StatusCode::kUnimplemented:
      return 501;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kAborted:
      return 503;
    default:
      return 500;
  }
}

nlohmann::json ErrorObject(const Status& s, int http_status) {
  const std::string message(s.message());
  const std::optional<std::string> field = ErrorField(s);
  const json param = field ? json(*field) : json(nullptr);
  const char* type = http_status == 401   ? "authentication_error"
                     : http_status == 403 ? "permission_error"
                     : http_status == 404 ? "not_found_error"
                     : http_status == 429 ? "rate_limit_error"
                     : http_status < 500  ? "invalid_request_error"
                                          : "server_error";
  return json{{"error", {{"message", message}, {"type", type}, {"param", param}, {"code", http_status}}}};
}

}  // namespace kraken::openai
