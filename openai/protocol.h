// The OpenAI-compatible wire format (platform.openai.com/docs/api-reference/completions, with the
// extensions vLLM adds: top_k, min_p, repetition_penalty, min_tokens, stop_token_ids, ignore_eos,
// skip_special_tokens, priority): request bodies into the core's terms, errors into OpenAI error
// objects with their HTTP status. Pure functions; the routes are in openai/api.h.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/status.h"
#include "core/validation.h"

namespace kraken::openai {

/// Most prompts one /v1/completions request may hold (each becomes a request of its own).
inline constexpr int kMaxPromptsPerRequest = 1024;

/// A /v1/completions body, parsed (not yet validated against the model: core::ValidateGeneration
/// does that with FieldNames kCompletionFields).
struct CompletionRequest {
  core::GenerationRequest generation;  // the first prompt's
  // One per prompt, in the body's order: `generation`, then each further prompt of a prompt array
  // with every other field as `generation`'s.
  std::vector<core::GenerationRequest> generations;
  std::optional<std::string> model;
  bool stream = false;
  bool include_usage = false;     // stream_options.include_usage: a last chunk with the usage
  bool continuous_usage = false;  // stream_options.continuous_usage_stats (vLLM): usage on every chunk
};

/// Most messages one chat request may hold (a template's work grows with them).
inline constexpr int kMaxChatMessages = 4096;

/// A /v1/chat/completions body, parsed: the messages to render with the model's chat template,
/// and the completion's fields (the rendered text becomes `completion.generation.text`).
struct ChatRequest {
  CompletionRequest completion;
  nlohmann::ordered_json messages;  // as sent, key order kept
  bool add_generation_prompt = true;
};

/// Parses a /v1/chat/completions body: the fields of ParseCompletionRequest but the prompt, echo,
/// best_of and suffix; `messages` (INVALID_ARGUMENT naming messages[i].role or .content);
/// `logprobs` (a boolean) with `top_logprobs` (alternatives; only with logprobs true);
/// `max_completion_tokens` (OpenAI's newer name of max_tokens, which it overrides);
/// `add_generation_prompt` (vLLM's, default true). `tools` and `response_format` other than text
/// are refused by name.
StatusOr<ChatRequest> ParseChatRequest(std::string_view body, int context_length);

/// How the completions API spells the fields core::ValidateGeneration names.
extern const core::FieldNames kCompletionFields;
/// How the chat API spells them (the rendered messages are the prompt).
extern const core::FieldNames kChatFieldNames;

/// Parses a /v1/completions body. INVALID_ARGUMENT naming the field and the value for: a body
/// that is not a JSON object; a field of the wrong type; a field this API does not have (with the
/// closest one that exists); a feature this server does not offer yet (best_of other than n,
/// suffix, logit_bias). `prompt` may be an array of prompts (strings or token-id arrays; an error
/// names "prompt[i]"). `echo` with `logprobs` asks for the prompt's logprobs too
/// (GenerationRequest::prompt_logprobs). `max_tokens: null` asks for as many
/// tokens as the context allows (`context_length`).
StatusOr<CompletionRequest> ParseCompletionRequest(std::string_view body, int context_length);

/// The HTTP status for a failed request: 400 INVALID_ARGUMENT, FAILED_PRECONDITION and OUT_OF_RANGE;
/// 401 UNAUTHENTICATED; 403 PERMISSION_DENIED; 404 NOT_FOUND; 408 DEADLINE_EXCEEDED (the request
/// timeout); 429 RESOURCE_EXHAUSTED (queue full); 499 CANCELLED; 501 UNIMPLEMENTED;
/// 503 UNAVAILABLE and ABORTED; 500 otherwise.
int HttpStatus(const Status& s);

/// The OpenAI error object for `s`: {"error": {"message", "type", "param", "code"}}, `param` being
/// the field the message names ("field 'top_p' ..."), or null.
nlohmann::json ErrorObject(const Status& s, int http_status);

/// Serializes `j` as compact JSON; invalid UTF-8 in strings (a token that is half of a
/// character) becomes U+FFFD instead of an exception.
std::string Dump(const nlohmann::json& j);

}  // namespace kraken::openai
