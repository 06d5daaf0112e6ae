// A request handle between the engine thread and a front-end: output taken in order and exactly
// once, the end once, listeners called without a lock (a listener may Take), and Detach waiting
// out a listener call in flight.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "core/request.h"

namespace kraken::core {
namespace {

std::shared_ptr<RequestHandle> Handle() {
  RequestParams p;
  p.prompt = {1};
  p.max_tokens = 4;
  return std::make_shared<RequestHandle>(1, p, Clock::now(), Clock::time_point::max());
}

TEST(RequestHandle, OutputIsTakenOnceInOrderAndTheEndOnce) {
  auto h = Handle();
  Output out;
  EXPECT_FALSE(h->Take(&out));
  h->Publish([](Output& o) {
    o.text += "ab";
    o.ids.push_back(5);
  });
  h->Publish([](Output& o) {
    o.text += "c";
    o.ids.push_back(6);
  });
  ASSERT_TRUE(h->Take(&out));
  EXPECT_EQ(out.text, "abc");
  EXPECT_EQ(out.ids, (std::vector<int32_t>{5, 6}));
  EXPECT_FALSE(out.finished);
  Output more;
  EXPECT_FALSE(h->Take(&more));
  EXPECT_TRUE(more.text.empty());
  h->Finish(absl::OkStatus(), FinishReason::kLength, "", 2, 0.1, 0.2, 0.3);
  h->Finish(absl::CancelledError("late"), FinishReason::kNone, "", 0, 0, 0, 0);  // ignored
  h->Publish([](Output& o) { o.text += "after the end"; });                      // ignored
  ASSERT_TRUE(h->Take(&more));
  EXPECT_TRUE(more.finished);
  EXPECT_TRUE(more.status.ok());
  EXPECT_EQ(more.finish_reason, FinishReason::kLength);
  EXPECT_EQ(more.completion_tokens, 2u);
  EXPECT_DOUBLE_EQ(more.e2e_s, 0.3);
  EXPECT_TRUE(more.text.empty());
  EXPECT_FALSE(h->Take(&more));  // the end is news once
}

TEST(RequestHandle, TheListenerRunsWithoutTheHandlesLockAndDetachWaitsForIt) {
  auto h = Handle();
  std::atomic<bool> in_listener{false}, release{false};
  std::string seen;
  h->Listen([&] {
    Output o;
    h->Take(&o);  // would deadlock if the engine called the listener under the handle's lock
    seen += o.text;
    in_listener = true;
    while (!release) std::this_thread::yield();
  });
  std::thread engine([&] { h->Publish([](Output& o) { o.text += "x"; }); });
  while (!in_listener) std::this_thread::yield();
  std::atomic<bool> detached{false};
  std::thread front_end([&] {
    h->Detach();
    detached = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(detached) << "Detach returned while the listener was still running";
  release = true;
  engine.join();
  front_end.join();
  EXPECT_TRUE(detached);
  EXPECT_EQ(seen, "x");
  int calls = 0;
  h->Listen(nullptr);
  h->Publish([&](Output&) { ++calls; });  // no listener: nothing is called, the edit still happens
  EXPECT_EQ(calls, 1);
}

TEST(RequestHandle, CancelIsSeenAndWakesTheEngine) {
  auto h = Handle();
  int woken = 0;
  h->set_on_cancel([&] { ++woken; });
  EXPECT_FALSE(h->cancelled());
  h->Cancel();
  EXPECT_TRUE(h->cancelled());
  EXPECT_EQ(woken, 1);
}

}  // namespace
}  // namespace kraken::core
