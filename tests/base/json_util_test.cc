#include "base/json_util.h"

#include <gtest/gtest.h>

#include <string>

#include "absl/strings/match.h"

namespace kraken {
namespace {

using nlohmann::json;

std::string Nested(int depth) {
  return std::string(depth, '[') + std::string(depth, ']');
}

TEST(ParseJsonStrict, RefusesNestingPastTheLimitByName) {
  EXPECT_TRUE(ParseJsonStrict(Nested(32), "body", 32).ok());
  const auto deep = ParseJsonStrict(Nested(33), "body", 32);
  ASSERT_FALSE(deep.ok());
  EXPECT_EQ(deep.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(deep.status().message(), "body: JSON nests deeper than 32 levels");
  // Far deeper than any stack could recurse: refused the same way, nothing built.
  EXPECT_EQ(ParseJsonStrict(Nested(1'000'000), "body", 32).status().message(),
            "body: JSON nests deeper than 32 levels");
  EXPECT_EQ(ParseJsonStrict("{\"a\": " + Nested(40) + "}", "body", 32).status().message(),
            "body: JSON nests deeper than 32 levels");
}

TEST(ParseJsonStrict, RefusesARepeatedKeyByName) {
  EXPECT_EQ(ParseJsonStrict(R"({"max_tokens": 1, "max_tokens": 5})", "body", 8).status().message(),
            "body: duplicate key 'max_tokens'");
  // The same key in two objects is not a repeat.
  EXPECT_TRUE(ParseJsonStrict(R"({"a": {"k": 1}, "b": {"k": 2}})", "body", 8).ok());
  EXPECT_TRUE(absl::StartsWith(ParseJsonStrict("{\"a\": 1", "body", 8).status().message(), "body: not valid JSON"));
}

TEST(PreviewJson, ShowsSmallValuesWhole) {
  EXPECT_EQ(PreviewJson(json::parse(R"({"a":[1,2.5,null,true],"b":"x"})")), R"({"a":[1,2.5,null,true],"b":"x"})");
  EXPECT_EQ(PreviewJson(json::array()), "[]");
  EXPECT_EQ(PreviewJson(json::object()), "{}");
  EXPECT_EQ(PreviewJson(json(42)), "42");
}

TEST(PreviewJson, CutsLongAndDeepValuesToTheLimit) {
  EXPECT_EQ(PreviewJson(json(std::string(1000, 'a')), 10), "\"aaaaaa...");
  json wide = json::array();
  for (int i = 0; i < 100'000; ++i) wide.push_back(i);
  EXPECT_EQ(PreviewJson(wide, 20), "[0,1,2,3,4,5,6,7,...");
  // A value nested far deeper than any recursive dump could survive (built bottom-up here; a
  // request never gets one past ParseJsonStrict): the preview reads only what it shows.
  json deep = json::array();
  for (int i = 0; i < 200'000; ++i) {
    json outer = json::array();
    outer.push_back(std::move(deep));
    deep = std::move(outer);
  }
  EXPECT_EQ(PreviewJson(deep, 12), "[[[[[[[[[...");
}

TEST(PreviewJson, NeverSplitsAUtf8CharacterAndReplacesInvalidBytes) {
  // "é" is two bytes: a cut between them drops the character whole.
  const std::string s = PreviewJson(json(std::string(5, 'a') + "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"), 10);
  EXPECT_EQ(s, "\"aaaaa...");
  EXPECT_EQ(PreviewJson(json(std::string("a\xff"))), "\"a\xef\xbf\xbd\"");  // U+FFFD
}

}  // namespace
}  // namespace kraken
