// Strict JSON parsing for files that come from outside (safetensors headers, config.json,
// shard indexes, tokenizer.json): a first streaming (SAX) pass rejects nesting deeper than a
// limit and duplicate keys before any DOM is built, so a hostile file can neither exhaust memory
// with deep nesting nor hide a value behind a repeated key (nlohmann keeps the last one).
//
//   KRAKEN_ASSIGN_OR_RETURN(nlohmann::json j, ParseJsonStrict(text, "config.json", 32));
//   InvalidArgument("field 'x' must be an integer, got ", DescribeJson(j["x"]));
#pragma once

#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/status.h"

namespace kraken {

namespace internal {

// Rejects depth > max_depth and duplicate keys; records the first problem.
class StrictSax : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit StrictSax(int max_depth) : max_depth_(max_depth) {}
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return Enter();
  }
  bool key(string_t& k) override {
    if (!keys_.back().insert(k).second) {
      problem_ = StrCat("duplicate key '", k.size() > 64 ? k.substr(0, 64) + "..." : k, "'");
      return false;
    }
    return true;
  }
  bool end_object() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override {
    keys_.emplace_back();  // keeps the stack aligned with depth; unused for arrays
    return Enter();
  }
  bool end_array() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception&) override {
    problem_ = StrCat("not valid JSON (at byte ", position, ")");
    return false;
  }
  const std::string& problem() const { return problem_; }

 private:
  bool Enter() {
    if (++depth_ > max_depth_) {
      problem_ = StrCat("JSON nests deeper than ", max_depth_, " levels");
      return false;
    }
    return true;
  }
  int max_depth_;
  int depth_ = 0;
  std::vector<std::set<std::string>> keys_;
  std::string problem_;
};

}  // namespace internal

/// Parses `text`; INVALID_ARGUMENT "<label>: <problem>" for malformed JSON, nesting deeper than
/// `max_depth`, or a key repeated within one object.
inline StatusOr<nlohmann::json> ParseJsonStrict(std::string_view text, std::string_view label, int max_depth) {
  internal::StrictSax sax(max_depth);
  const bool ok = nlohmann::json::sax_parse(text.begin(), text.end(), &sax, nlohmann::json::input_format_t::json,
                                            /*strict=*/true);
  if (!ok) return InvalidArgument(label, ": ", sax.problem().empty() ? "not valid JSON" : sax.problem());
  nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument(label, ": not valid JSON");
  return j;
}

/// The deepest nesting a request body may have (OpenAI bodies, KServe `sampling_parameters`):
/// the deepest field either API defines nests 3 levels (`prompt: [[ids]]`), so 32 leaves room for
/// any extension while a hostile body is refused before a deep value is ever built.
inline constexpr int kMaxRequestJsonDepth = 32;

/// At most `max_chars` characters (then "...") of `v`'s JSON, for an error message. Written
/// iteratively and stopping as soon as the preview is full, so neither the value's nesting nor its
/// size costs more than the preview; a cut never splits a UTF-8 character, and invalid UTF-8 in a
/// string shows as U+FFFD.
inline std::string PreviewJson(const nlohmann::json& v, size_t max_chars = 80) {
  using nlohmann::json;
  std::string out;
  // A string's JSON from its first bytes only: the rest would be cut anyway.
  auto quote = [&](const std::string& s) {
    const std::string head = s.size() > max_chars ? s.substr(0, max_chars + 1) : s;
    out += json(head).dump(-1, ' ', false, json::error_handler_t::replace);
  };
  struct Frame {
    const json* value;
    json::const_iterator it;
    bool first;
  };
  std::vector<Frame> open;
  auto visit = [&](const json& x) {
    if (x.is_structured()) {
      out += x.is_object() ? '{' : '[';
      open.push_back({&x, x.cbegin(), true});
    } else if (x.is_string()) {
      quote(x.get_ref<const std::string&>());
    } else {
      out += x.dump(-1, ' ', false, json::error_handler_t::replace);  // a number, bool or null
    }
  };
  visit(v);
  while (!open.empty() && out.size() <= max_chars) {
    Frame& f = open.back();
    if (f.it == f.value->cend()) {
      out += f.value->is_object() ? '}' : ']';
      open.pop_back();
      continue;
    }
    if (!f.first) out += ',';
    f.first = false;
    if (f.value->is_object()) {
      quote(f.it.key());
      out += ':';
    }
    const json& child = *f.it;
    ++f.it;
    visit(child);  // may grow `open`: `f` is not used after this
  }
  if (out.size() > max_chars) {
    out.resize(max_chars > 3 ? max_chars - 3 : 0);
    // Back off a partial UTF-8 character: continuation bytes, then the lead byte they follow.
    while (!out.empty() && (static_cast<unsigned char>(out.back()) & 0xC0) == 0x80) out.pop_back();
    if (!out.empty() && static_cast<unsigned char>(out.back()) >= 0xC0) out.pop_back();
    out += "...";
  }
  return out;
}

/// A value for an error message: PreviewJson(v, 80).
inline std::string DescribeJson(const nlohmann::json& v) {
  return PreviewJson(v, 80);
}

}  // namespace kraken
