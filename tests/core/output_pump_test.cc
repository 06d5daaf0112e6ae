// The one output pump (core/output_pump.h) over real request handles, fed by hand as the engine
// would: round robin with no starvation, each delta mode's idea of news, the first failure, the
// end counted once, token counts, retirement on an open-ended stream, cancellation, and wakes.
#include "core/output_pump.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kraken::core {
namespace {

std::shared_ptr<RequestHandle> Handle(uint64_t id) {
  RequestParams p;
  p.prompt = {1};
  p.max_tokens = 8;
  return std::make_shared<RequestHandle>(id, p, Clock::now(), Clock::time_point::max());
}

void Token(RequestHandle& h, const std::string& text, int32_t id) {
  h.Publish([&](Output& o) {
    o.text += text;
    o.ids.push_back(id);
    o.logprobs.push_back({.token = id, .logprob = -0.5f});
  });
}

void End(RequestHandle& h, const Status& status = absl::OkStatus()) {
  h.Finish(status, status.ok() ? FinishReason::kLength : FinishReason::kNone, "", 1, 0, 0, 0);
}

// The order a writer with one write outstanding sends in: the slot indexes, "*" marking an end.
std::vector<std::string> Drain(OutputPump<>& pump) {
  std::vector<std::string> order;
  pump.TakeAll();
  while (auto* s = pump.Next()) {
    order.push_back(std::to_string(s->index) + (s->taken.finished ? "*" : ""));
    pump.Sent(*s);
    pump.TakeAll();
  }
  return order;
}

TEST(OutputPump, RoundRobinGivesEverySampleItsTurnSoNoneStarves) {
  OutputPump<> pump;
  std::vector<std::shared_ptr<RequestHandle>> hs{Handle(1), Handle(2), Handle(3)};
  for (auto& h : hs) pump.Add(h, Deltas::kTokens, {});
  for (auto& h : hs) Token(*h, "a", 5);
  // One write goes out, then sample 0 gets more before the next: 1 and 2 still go first.
  pump.TakeAll();
  auto* first = pump.Next();
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(first->index, 0u);
  EXPECT_EQ(first->taken.text, "a");
  pump.Sent(*first);
  Token(*hs[0], "b", 6);
  EXPECT_EQ(Drain(pump), (std::vector<std::string>{"1", "2", "0"}));
  for (auto& h : hs) End(*h);
  EXPECT_FALSE(pump.AllSent());
  EXPECT_EQ(Drain(pump), (std::vector<std::string>{"1*", "2*", "0*"}));
  EXPECT_TRUE(pump.AllSent());
  EXPECT_EQ(pump.Next(), nullptr);
}

TEST(OutputPump, DeltasCoalesceWhileAWriteIsOutstandingAndTokensAreCountedWhenSent) {
  OutputPump<> pump;
  auto h = Handle(1);
  pump.Add(h, Deltas::kTokens, {});
  Token(*h, "In", 10);
  Token(*h, " the", 11);
  pump.TakeAll();
  auto* s = pump.Next();
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->taken.text, "In the");
  EXPECT_EQ(s->taken.ids, (std::vector<int32_t>{10, 11}));
  EXPECT_EQ(s->taken.logprobs.size(), 2u);
  EXPECT_FALSE(s->first_sent);
  pump.Sent(*s);
  EXPECT_TRUE(s->first_sent);
  EXPECT_EQ(s->sent_tokens, 2);
  EXPECT_TRUE(s->taken.text.empty() && s->taken.ids.empty() && s->taken.logprobs.empty());
  pump.TakeAll();
  EXPECT_EQ(pump.Next(), nullptr);  // nothing new
  Token(*h, " beginning", 12);
  End(*h);
  pump.TakeAll();
  s = pump.Next();
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->taken.text, " beginning");  // the last tokens travel with the end
  EXPECT_TRUE(s->taken.finished);
  pump.Sent(*s);
  EXPECT_EQ(s->sent_tokens, 3);
  EXPECT_TRUE(s->end_sent);
  EXPECT_TRUE(pump.AllSent());
}

TEST(OutputPump, EachDeltaModeHasItsOwnNews) {
  OutputPump<> pump;
  auto end_only = Handle(1), text = Handle(2), tokens = Handle(3);
  pump.Add(end_only, Deltas::kEndOnly, {});
  pump.Add(text, Deltas::kTextOrLogprobs, {});
  pump.Add(tokens, Deltas::kTokens, {});
  // A token whose text is held back (an incomplete character, a possible stop string): ids only.
  for (auto& h : {end_only, text, tokens}) h->Publish([](Output& o) { o.ids.push_back(7); });
  EXPECT_EQ(Drain(pump), (std::vector<std::string>{"2"}));
  // Logprobs without text are news to a text protocol that reports them.
  for (auto& h : {end_only, text}) h->Publish([](Output& o) { o.logprobs.push_back({.token = 7, .logprob = -1.f}); });
  EXPECT_EQ(Drain(pump), (std::vector<std::string>{"1"}));
  // The end is news to every mode.
  for (auto& h : {end_only, text, tokens}) End(*h);
  EXPECT_EQ(Drain(pump), (std::vector<std::string>{"2*", "0*", "1*"}));
  EXPECT_TRUE(pump.AllFinished());
}

TEST(OutputPump, TheFirstFailureIsFoundWhateverTheCursorAndCancelAllSparesTheEnded) {
  OutputPump<> pump;
  std::vector<std::shared_ptr<RequestHandle>> hs{Handle(1), Handle(2), Handle(3)};
  for (auto& h : hs) pump.Add(h, Deltas::kTokens, {});
  Token(*hs[1], "a", 1);
  pump.TakeAll();
  auto* sent = pump.Next();  // the round robin now starts after sample 1
  ASSERT_EQ(sent->index, 1u);
  pump.Sent(*sent);
  End(*hs[2], absl::UnavailableError("third"));
  End(*hs[0], absl::InternalError("first"));
  End(*hs[1]);
  pump.TakeAll();
  auto* failed = pump.Failed();
  ASSERT_NE(failed, nullptr);
  EXPECT_EQ(failed->index, 0u);  // in order, not from the cursor
  EXPECT_EQ(failed->taken.status, absl::InternalError("first"));
  auto fresh = Handle(4);
  pump.Add(fresh, Deltas::kTokens, {});
  pump.CancelAll();
  EXPECT_TRUE(fresh->cancelled());
  EXPECT_FALSE(hs[1]->cancelled());  // ended before: nothing to cancel
  EXPECT_FALSE(pump.AllFinished());
}

TEST(OutputPump, AStreamPumpRetiresEndedRequestsAndKeepsTheTurnOfTheNext) {
  OutputPump<int> pump(/*retire_sent=*/true);
  std::vector<std::shared_ptr<RequestHandle>> hs{Handle(1), Handle(2), Handle(3)};
  for (int i = 0; i < 3; ++i) pump.Add(hs[i], Deltas::kTokens, {}, 100 + i);
  for (auto& h : hs) Token(*h, "x", 1);
  pump.TakeAll();
  auto* s = pump.Next();
  ASSERT_EQ(s->extra, 100);
  pump.Sent(*s);
  End(*hs[1]);
  pump.TakeAll();
  s = pump.Next();
  ASSERT_EQ(s->extra, 101);
  pump.Sent(*s);  // ended: retired
  EXPECT_EQ(pump.size(), 2u);
  EXPECT_EQ(pump.handles().size(), 3u);  // still there to Detach
  Token(*hs[0], "y", 2);                 // the first has news again, but it is not its turn
  pump.TakeAll();
  s = pump.Next();
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->extra, 102);  // the one after the retired request keeps its turn
  pump.Sent(*s);
  s = pump.Next();
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->extra, 100);
  pump.Sent(*s);
  pump.Add(Handle(4), Deltas::kTokens, {}, 103);
  EXPECT_EQ(pump[2].index, 3u);
  EXPECT_FALSE(pump.AllSent());
}

TEST(OutputPump, AddSetsTheListenerTheEngineWakes) {
  OutputPump<> pump;
  auto h = Handle(1);
  int wakes = 0;
  pump.Add(h, Deltas::kTokens, [&] { ++wakes; });
  Token(*h, "a", 1);
  Token(*h, "b", 2);
  EXPECT_EQ(wakes, 2);
  for (const auto& handle : pump.handles()) handle->Detach();
  Token(*h, "c", 3);
  End(*h);
  EXPECT_EQ(wakes, 2);  // detached: the engine no longer calls it
  pump.TakeAll();
  EXPECT_EQ(pump[0].taken.text, "abc");
}

}  // namespace
}  // namespace kraken::core
