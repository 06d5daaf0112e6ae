// Stop strings over streamed text: held text, matches across deltas, release on flush.
#include <gtest/gtest.h>

#include <random>

#include "core/stop_matcher.h"

namespace kraken::core {
namespace {

TEST(StopMatcher, HoldsAPossiblePrefixAndReleasesItWhenRuledOut) {
  StopMatcher m({"END"});
  auto r = m.Push("Hello E");
  EXPECT_EQ(r.release, "Hello ");
  EXPECT_FALSE(r.matched);
  EXPECT_EQ(m.held_bytes(), 1u);
  r = m.Push("Nx");
  EXPECT_EQ(r.release, "ENx");
  EXPECT_EQ(m.held_bytes(), 0u);
}

TEST(StopMatcher, MatchAcrossThreeDeltasReleasesOnlyTheTextBefore) {
  StopMatcher m({"\n\nQ:"});
  EXPECT_EQ(m.Push("answer.\n").release, "answer.");
  EXPECT_EQ(m.Push("\n").release, "");
  auto r = m.Push("Q: next");
  EXPECT_TRUE(r.matched);
  EXPECT_EQ(r.stop, "\n\nQ:");
  EXPECT_EQ(r.release, "");
  EXPECT_EQ(m.Push("more").release, "") << "nothing after a match";
}

TEST(StopMatcher, FirstToCompleteWinsThenLongest) {
  StopMatcher m({"bc", "abcd", "ab"});
  auto r = m.Push("xxabcdyy");
  EXPECT_TRUE(r.matched);
  EXPECT_EQ(r.stop, "ab");
  EXPECT_EQ(r.release, "xx");
  StopMatcher n({"b", "ab"});
  r = n.Push("xab");
  EXPECT_EQ(r.stop, "ab") << "both end at the same byte: the longer wins";
  EXPECT_EQ(r.release, "x");
}

TEST(StopMatcher, FlushReleasesHeldText) {
  StopMatcher m({"stop here"});
  EXPECT_EQ(m.Push("we stop h").release, "we ");
  EXPECT_EQ(m.Flush(), "stop h");
}

TEST(StopMatcher, MultiByteStopStrings) {
  StopMatcher m({"\xE5\x8F\xA5\xE3\x80\x82"});  // "句。"
  EXPECT_EQ(m.Push("\xE4\xB8\x80\xE5\x8F\xA5").release, "\xE4\xB8\x80");
  auto r = m.Push("\xE3\x80\x82\xE4\xBA\x8C");
  EXPECT_TRUE(r.matched);
  EXPECT_EQ(r.release, "");
}

// Property: for any split of a text into deltas, the released text is the text before the first
// occurrence of any stop (or the whole text, after Flush), exactly as a one-shot search finds it.
TEST(StopMatcher, AnyChunkingGivesTheOneShotResult) {
  std::mt19937 rng(7);
  const std::string alphabet = "ab \n";
  for (int trial = 0; trial < 3000; ++trial) {
    std::string text;
    const int len = static_cast<int>(rng() % 40);
    for (int i = 0; i < len; ++i) text += alphabet[rng() % alphabet.size()];
    std::vector<std::string> stops;
    const int ns = 1 + static_cast<int>(rng() % 3);
    for (int i = 0; i < ns; ++i) {
      std::string s;
      const int sl = 1 + static_cast<int>(rng() % 4);
      for (int j = 0; j < sl; ++j) s += alphabet[rng() % alphabet.size()];
      stops.push_back(s);
    }
    // Byte by byte: the first prefix of the text that ends with a stop (the longest on a tie).
    size_t first = std::string::npos;
    for (size_t i = 1; i <= text.size() && first == std::string::npos; ++i) {
      size_t best_len = 0;
      for (const auto& s : stops)
        if (s.size() <= i && text.compare(i - s.size(), s.size(), s) == 0) best_len = std::max(best_len, s.size());
      if (best_len > 0) first = i - best_len;
    }
    const std::string want = first == std::string::npos ? text : text.substr(0, first);

    StopMatcher m(stops);
    std::string got;
    bool matched = false;
    for (size_t at = 0; at < text.size() && !matched;) {
      const size_t n = std::min<size_t>(text.size() - at, 1 + rng() % 5);
      auto r = m.Push(std::string_view(text).substr(at, n));
      got += r.release;
      matched = r.matched;
      at += n;
    }
    if (!matched) got += m.Flush();
    ASSERT_EQ(got, want) << "text '" << text << "'";
    ASSERT_EQ(matched, first != std::string::npos);
  }
}

}  // namespace
}  // namespace kraken::core
