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

/// A value for an error message: its JSON, cut to 80 characters. (Values come from
/// ParseJsonStrict, so their nesting is bounded and dumping them is cheap.)
inline std::string DescribeJson(const nlohmann::json& v) {
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

}  // namespace kraken
