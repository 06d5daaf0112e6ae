// Chat templates: the Jinja subset Hugging Face chat templates are written in, rendered as
// transformers' apply_chat_template renders them (jinja2's ImmutableSandboxedEnvironment with
// trim_blocks, lstrip_blocks and loop controls; https://jinja.palletsprojects.com/templates/).
//
//   KRAKEN_ASSIGN_OR_RETURN(ChatTemplate t, ChatTemplate::Parse(source));
//   KRAKEN_ASSIGN_OR_RETURN(std::string prompt, t.Render(context));   // {"messages": [...], ...}
//
// Supported: {{ }}, {% %} and {# #} with whitespace control ({%- -%}); if/elif/else, for (with a
// filter condition, else, tuple targets, loop.index/index0/first/last/length/revindex/revindex0,
// break and continue), set (a name, or a namespace attribute), generation blocks (rendered as their
// body). Expressions: literals (strings, numbers, true/false/none in either case, lists, dicts),
// names, attributes and subscripts (a dict's attribute is its item), slices, the operators
// + - * / // % ** ~, comparisons, in / not in, and / or / not, conditional expressions, calls of
// raise_exception, namespace, range and strftime_now, the str and dict methods templates use,
// filters and tests (listed in chat_template.cc). Statements outside that set (macros, call
// blocks, includes), stray tokens in a statement and break/continue outside a loop are refused by
// name when the template is parsed; an unsupported filter, test or method when it is first used.
//
// Values follow Python's rules as jinja2 applies them: None prints "None", booleans "True" /
// "False", an undefined name prints nothing and is false; / divides into a float, // and % floor.
// Rendering is bounded: at most kMaxRenderBytes of output and kMaxRenderSteps evaluations.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "base/status.h"

namespace kraken::tokenizer {

/// A parsed chat template, immutable: Render may run on several threads at once.
class ChatTemplate {
 public:
  static constexpr size_t kMaxRenderBytes = size_t{8} << 20;
  static constexpr int64_t kMaxRenderSteps = 4'000'000;
  static constexpr size_t kMaxSourceBytes = size_t{1} << 20;

  /// Parses a template's source. INVALID_ARGUMENT naming the line and what is wrong (a syntax
  /// error, an unclosed block, a construct outside the supported subset), or the size limit.
  static StatusOr<ChatTemplate> Parse(std::string_view source);

  /// Renders with `context` (an object: messages, add_generation_prompt, bos_token, ...; its
  /// keys are the template's top-level names). INVALID_ARGUMENT with the template's own message
  /// for raise_exception, or naming the line and the problem (an undefined value used as an
  /// object, a type error, a limit reached).
  StatusOr<std::string> Render(const nlohmann::ordered_json& context) const;

  struct Node;

 private:
  std::shared_ptr<const Node> root_;
};

/// A model's chat template and the special tokens its tokenizer_config.json names (bos, eos,
/// unk, pad, sep, cls and mask tokens as strings, additional_special_tokens as a list: what
/// transformers passes to the template as its special_tokens_map).
struct ModelChatTemplate {
  ChatTemplate chat_template;
  nlohmann::ordered_json special_tokens = nlohmann::ordered_json::object();
  std::string origin;  // the file it came from, for logs
};

/// The chat template to serve: the file `override_path` when not empty (--chat-template), else
/// `dir`/chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or of a
/// list of {"name", "template"} the one named "default"). nullopt when the model has none.
/// NOT_FOUND for an override that cannot be read; INVALID_ARGUMENT naming the file for a template
/// that does not parse or a tokenizer_config.json that is not valid JSON.
StatusOr<std::optional<ModelChatTemplate>> LoadChatTemplate(const std::string& dir, const std::string& override_path);

}  // namespace kraken::tokenizer
