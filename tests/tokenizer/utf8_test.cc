// UTF-8 scanning and lossy decoding, against the cases Rust's from_utf8_lossy documents and the
// Unicode "maximal subpart" rule.
#include "tokenizer/utf8.h"

#include <gtest/gtest.h>

namespace kraken::tokenizer {
namespace {

const std::string R(kReplacement);

TEST(Utf8, ScanFindsValidPrefixErrorLengthAndTruncation) {
  struct Case {
    std::string bytes;
    size_t valid, error_len;
    bool incomplete;
  } cases[] = {
      {"abc", 3, 0, false},
      {"a\xC3\xA9", 3, 0, false},         // é
      {"\xF0\x9F\x98\x80", 4, 0, false},  // 😀
      {"a\x80", 1, 1, false},             // lone continuation
      {"\xC0\x80", 0, 1, false},          // overlong lead: never valid
      {"\xE0\x80\x80", 0, 1, false},      // E0 needs A0..BF next
      {"\xED\xA0\x80", 0, 1, false},      // surrogate
      {"\xF4\x90\x80\x80", 0, 1, false},  // above U+10FFFF
      {"\xF5", 0, 1, false},
      {"\xE2\x82", 0, 0, true},  // truncated €
      {"\xF0\x9F\x98", 0, 0, true},
      {"\xE2\x82"
       "A",
       0, 2, false},  // broken after two bytes: one subpart of 2
      {"\xF0\x9F\x98"
       "A",
       0, 3, false},
  };
  for (const Case& c : cases) {
    const Utf8Scan s = ScanUtf8(c.bytes);
    EXPECT_EQ(s.valid, c.valid) << testing::PrintToString(c.bytes);
    EXPECT_EQ(s.error_len, c.error_len) << testing::PrintToString(c.bytes);
    EXPECT_EQ(s.incomplete, c.incomplete) << testing::PrintToString(c.bytes);
  }
}

TEST(Utf8, LossyReplacesEachMaximalSubpartOnce) {
  // Rust's documented example: "Hello\xF0\x90\x80World" -> "Hello\u{FFFD}World".
  EXPECT_EQ(LossyUtf8("Hello\xF0\x90\x80World"), "Hello" + R + "World");
  EXPECT_EQ(LossyUtf8("\xE2\x82"
                      "A"),
            R + "A");
  EXPECT_EQ(LossyUtf8("\xC0\x80"), R + R);  // C0 and 80 are separate subparts
  EXPECT_EQ(LossyUtf8("\xED\xA0\x80"), R + R + R);
  EXPECT_EQ(LossyUtf8("\xF0\x9F\x98"), R);  // truncated at the end: one
  EXPECT_EQ(LossyUtf8("ok\xFF\xFE"), "ok" + R + R);
  EXPECT_EQ(LossyUtf8(""), "");
  size_t at = 99;
  EXPECT_FALSE(IsValidUtf8("ab\xFF", &at));
  EXPECT_EQ(at, 2u);
  EXPECT_TRUE(IsValidUtf8("\xE4\xBD\xA0\xE5\xA5\xBD"));
}

TEST(Utf8, LossyOfAConcatenationEqualsLossyOfPiecesCutAtCharacterBoundaries) {
  // Exhaustive over short byte strings from an alphabet that hits every case.
  const unsigned char alphabet[] = {0x41, 0x80, 0xBF, 0xC2, 0xE0, 0xE2, 0xED, 0xF0, 0xF4, 0xFF, 0x9F, 0xA0};
  std::string s;
  for (int len = 1; len <= 4; ++len) {
    int total = 1;
    for (int i = 0; i < len; ++i) total *= 12;
    for (int code = 0; code < total; ++code) {
      s.clear();
      for (int i = 0, c = code; i < len; ++i, c /= 12) s.push_back(static_cast<char>(alphabet[c % 12]));
      const std::string whole = LossyUtf8(s);
      // Re-decode the same bytes piecewise as the streaming decoder does.
      std::string piecewise;
      std::string_view rest = s;
      while (!rest.empty()) {
        const Utf8Scan r = ScanUtf8(rest);
        piecewise.append(rest.substr(0, r.valid));
        if (r.valid == rest.size()) break;
        piecewise.append(kReplacement);
        if (r.incomplete) break;
        rest.remove_prefix(r.valid + r.error_len);
      }
      ASSERT_EQ(piecewise, whole) << testing::PrintToString(s);
      ASSERT_TRUE(IsValidUtf8(whole));
    }
  }
}

}  // namespace
}  // namespace kraken::tokenizer
