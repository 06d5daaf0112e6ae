// When a sequence stops (core/finish.h): stop ids only after min_tokens, a matched stop string,
// the length limits, and their precedence.
#include <gtest/gtest.h>

#include "core/finish.h"

namespace kraken::core {
namespace {

RequestParams Params() {
  RequestParams p;
  p.prompt = {1, 2, 3};
  p.max_tokens = 5;
  p.min_tokens = 2;
  p.stop_token_ids = {0, 7};
  return p;
}

TEST(CheckStop, AStopTokenEndsOnlyAfterMinTokens) {
  const RequestParams p = Params();
  EXPECT_FALSE(StopsOnToken(p, 7, 1));
  EXPECT_FALSE(StopsOnToken(p, 7, 2));  // min_tokens 2: the stop id may end the third token on
  EXPECT_TRUE(StopsOnToken(p, 7, 3));
  EXPECT_FALSE(StopsOnToken(p, 8, 3));
  const StopCheck c = CheckStop(p, 0, 3, 100, nullptr);
  EXPECT_EQ(c.reason, FinishReason::kStop);
  EXPECT_EQ(c.stop_reason, "token:0");
  EXPECT_EQ(CheckStop(p, 7, 2, 100, nullptr).reason, FinishReason::kNone);
}

TEST(CheckStop, AMatchedStopStringEndsWithItsText) {
  const RequestParams p = Params();
  const std::string stop = "END";
  const StopCheck c = CheckStop(p, 9, 1, 100, &stop);
  EXPECT_EQ(c.reason, FinishReason::kStop);
  EXPECT_EQ(c.stop_reason, "END");
}

TEST(CheckStop, LengthByMaxTokensOrByAFullContext) {
  const RequestParams p = Params();
  EXPECT_EQ(CheckStop(p, 9, 4, 100, nullptr).reason, FinishReason::kNone);
  EXPECT_EQ(CheckStop(p, 9, 5, 100, nullptr).reason, FinishReason::kLength);  // max_tokens 5
  EXPECT_EQ(CheckStop(p, 9, 3, 6, nullptr).reason, FinishReason::kLength);    // 3 prompt + 3 = context 6
  EXPECT_EQ(CheckStop(p, 9, 2, 6, nullptr).reason, FinishReason::kNone);
  EXPECT_EQ(CheckStop(p, 9, 5, 100, nullptr).stop_reason, "");
}

TEST(CheckStop, AStopBeatsLengthOnTheSameToken) {
  const RequestParams p = Params();
  const std::string stop = "END";
  EXPECT_EQ(CheckStop(p, 7, 5, 100, nullptr).reason, FinishReason::kStop);
  EXPECT_EQ(CheckStop(p, 9, 5, 100, &stop).stop_reason, "END");
  EXPECT_EQ(CheckStop(p, 7, 5, 100, &stop).stop_reason, "token:7");  // the id is seen before the text
}

}  // namespace
}  // namespace kraken::core
