// The engine loop (core/engine.h) over a fake step runner instead of worker processes: generation
// to max_tokens, requests in flight carried across a worker failure token for token, cancellation,
// deadlines and the waiting queue's bound. The fake samples a token from the sequence's last token
// and position only, so a request recomputed after a failure must continue exactly as it would
// have; it refuses a sequence that continues from a KV cache an earlier "restart" lost, as the
// real workers do.
#include "core/engine.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace kraken::core {
namespace {

using std::chrono::milliseconds;

constexpr int kVocab = 1000;

// The token the fake samples after `last` at position `pos`, as the sequence's `draw`-th sample
// (a request resumed with the wrong draw index would continue differently).
int32_t NextToken(int32_t last, int64_t pos, int64_t draw) {
  return static_cast<int32_t>((last * 31 + pos * 7 + draw * 13 + 3) % kVocab);
}

class FakeWorkers final : public runtime::StepRunner {
 public:
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    int steps = 0;              // steps run (failed ones included)
    int fail_at_step = 0;       // this step fails as a worker crash would (0: none)
    int stale_refusals = 0;     // steps refused for a sequence continuing from a lost KV cache
    bool hold = false;          // steps wait while set (a slow worker)
    bool holding = false;       // a step is waiting
    std::vector<bool> serving;  // what the recovery callback said, in order
  };
  explicit FakeWorkers(std::shared_ptr<Shared> shared) : sh_(std::move(shared)) {}

  StatusOr<runtime::StepResultView> RunStep(std::span<const runtime::SeqStep> seqs) override {
    for (const runtime::SeqStep& s : seqs) {  // as WorkerGroup::RunStep, before anything runs
      if (s.start_pos > 0 && s.kv_generation != generation_) {
        std::lock_guard<std::mutex> l(sh_->mu);
        ++sh_->stale_refusals;
        return FailedPrecondition("sequence ", s.seq_id, " continues from a KV cache lost in a restart");
      }
    }
    {
      std::unique_lock<std::mutex> l(sh_->mu);
      sh_->holding = true;
      sh_->cv.notify_all();
      sh_->cv.wait(l, [&] { return !sh_->hold; });
      sh_->holding = false;
      if (++sh_->steps == sh_->fail_at_step) {
        l.unlock();
        const Status cause = absl::UnavailableError("rank 1 exited with signal 9");
        if (cb_) cb_(true, cause);
        ++generation_;
        ++restarts_;
        if (cb_) cb_(false, absl::OkStatus());
        return cause;
      }
    }
    results_.clear();
    for (const runtime::SeqStep& s : seqs) {
      runtime::ResultSeq r;
      r.seq_id = s.seq_id;
      if (s.sample) {
        r.token = NextToken(s.tokens.back(), s.start_pos + static_cast<int64_t>(s.tokens.size()) - 1, s.draw_index);
        r.logprob = -0.25f;
      }
      results_.push_back(r);
    }
    return runtime::StepResultView{.seqs = results_};
  }
  Status Supervise() override { return absl::OkStatus(); }
  void CancelRestarts() override {}
  void set_recovery_callback(std::function<void(bool, const Status&)> cb) override { cb_ = std::move(cb); }
  std::vector<runtime::RankStatsSnapshot> Stats() const override { return {runtime::RankStatsSnapshot{.up = true}}; }
  int world_size() const override { return 1; }
  int restarts() const override { return restarts_; }
  uint64_t generation() const override { return generation_; }

 private:
  std::shared_ptr<Shared> sh_;
  std::function<void(bool, const Status&)> cb_;
  std::vector<runtime::ResultSeq> results_;
  uint64_t generation_ = 1;
  int restarts_ = 0;
};

struct Fixture {
  explicit Fixture(int max_waiting = 16) : shared(std::make_shared<FakeWorkers::Shared>()) {
    EngineOptions o;
    o.scheduler = {.num_kv_blocks = 64,
                   .block_size = 16,
                   .max_batch_tokens = 256,
                   .max_batch_seqs = 8,
                   .max_waiting = max_waiting};
    o.context_length = 256;
    o.on_serving = [sh = shared](bool serving) {
      std::lock_guard<std::mutex> l(sh->mu);
      sh->serving.push_back(serving);
    };
    engine.emplace(std::make_unique<FakeWorkers>(shared), nullptr, o);
  }
  ~Fixture() {
    Release();
    engine->Stop();
  }
  void Hold() {
    std::lock_guard<std::mutex> l(shared->mu);
    shared->hold = true;
  }
  void Release() {
    std::lock_guard<std::mutex> l(shared->mu);
    shared->hold = false;
    shared->cv.notify_all();
  }
  void AwaitHeldStep() {
    std::unique_lock<std::mutex> l(shared->mu);
    ASSERT_TRUE(shared->cv.wait_for(l, std::chrono::seconds(10), [&] { return shared->holding; }));
  }
  std::shared_ptr<RequestHandle> Submit(std::vector<int32_t> prompt, uint32_t max_tokens,
                                        Clock::time_point deadline = Clock::time_point::max()) {
    RequestParams p;
    p.prompt = std::move(prompt);
    p.max_tokens = max_tokens;
    p.sampling.seed = 1;
    auto h = engine->Submit(std::move(p), Clock::now(), deadline);
    if (!h.ok()) ADD_FAILURE() << h.status();
    return h.ok() ? *h : std::make_shared<RequestHandle>(0, RequestParams{}, Clock::now(), Clock::time_point::max());
  }

  std::shared_ptr<FakeWorkers::Shared> shared;
  std::optional<Engine> engine;
};

// Waits for the request to end and returns everything it produced.
Output Wait(RequestHandle& h) {
  Output out;
  for (int i = 0; i < 10000 && !out.finished; ++i) {
    h.Take(&out);
    if (!out.finished) std::this_thread::sleep_for(milliseconds(1));
  }
  EXPECT_TRUE(out.finished);
  return out;
}

std::vector<int32_t> Expected(std::vector<int32_t> prompt, int n) {
  std::vector<int32_t> out;
  int32_t last = prompt.back();
  for (int i = 0; i < n; ++i) {
    last = NextToken(last, static_cast<int64_t>(prompt.size()) - 1 + i, i);
    out.push_back(last);
  }
  return out;
}

TEST(Engine, GeneratesMaxTokensAndEndsWithLength) {
  Fixture f;
  auto h = f.Submit({5, 6, 7}, 6);
  const Output out = Wait(*h);
  EXPECT_TRUE(out.status.ok()) << out.status;
  EXPECT_EQ(out.ids, Expected({5, 6, 7}, 6));
  EXPECT_EQ(out.finish_reason, FinishReason::kLength);
  EXPECT_EQ(out.completion_tokens, 6u);
  ASSERT_EQ(out.logprobs.size(), 0u);  // not asked for
  EXPECT_GE(out.e2e_s, out.ttft_s);
  EXPECT_EQ(f.engine->active(), 0);
}

TEST(Engine, AWorkerFailureMidRequestLosesNoTokenAndHealthFollowsTheRecovery) {
  Fixture f;
  f.shared->fail_at_step = 4;  // the prefill, two decodes, then a crash
  auto a = f.Submit({5, 6, 7}, 8);
  auto b = f.Submit({9}, 5);
  const Output oa = Wait(*a), ob = Wait(*b);
  EXPECT_TRUE(oa.status.ok()) << oa.status;
  EXPECT_TRUE(ob.status.ok()) << ob.status;
  EXPECT_EQ(oa.ids, Expected({5, 6, 7}, 8));
  EXPECT_EQ(ob.ids, Expected({9}, 5));
  std::lock_guard<std::mutex> l(f.shared->mu);
  EXPECT_EQ(f.shared->serving, (std::vector<bool>{false, true}));
  EXPECT_GT(f.shared->steps, 4);
  // Resumed by the failure itself, never by tripping over a KV cache the restart lost.
  EXPECT_EQ(f.shared->stale_refusals, 0);
}

TEST(Engine, ACancelledRequestEndsCancelledAndTheOthersGoOn) {
  Fixture f;
  f.Hold();
  auto a = f.Submit({1, 2}, 50);
  auto b = f.Submit({3}, 4);
  ASSERT_NO_FATAL_FAILURE(f.AwaitHeldStep());
  a->Cancel();
  f.Release();
  const Output oa = Wait(*a), ob = Wait(*b);
  EXPECT_EQ(oa.status.code(), absl::StatusCode::kCancelled) << oa.status;
  EXPECT_LT(oa.ids.size(), 50u);
  EXPECT_TRUE(ob.status.ok()) << ob.status;
  EXPECT_EQ(ob.ids, Expected({3}, 4));
}

TEST(Engine, ARequestPastItsDeadlineWhileGeneratingEndsDeadlineExceeded) {
  Fixture f;
  f.Hold();
  const auto deadline = Clock::now() + milliseconds(1000);  // far enough for a slow host to schedule it
  auto h = f.Submit({1, 2}, 50, deadline);
  ASSERT_NO_FATAL_FAILURE(f.AwaitHeldStep());
  std::this_thread::sleep_until(deadline + milliseconds(50));
  f.Release();
  const Output out = Wait(*h);
  EXPECT_EQ(out.status.code(), absl::StatusCode::kDeadlineExceeded) << out.status;
  EXPECT_NE(out.status.message().find("while generating"), std::string::npos) << out.status;
}

TEST(Engine, TheWaitingQueueIsBoundedAndSaysSo) {
  Fixture f(/*max_waiting=*/1);
  f.Hold();
  auto running = f.Submit({1}, 4);
  ASSERT_NO_FATAL_FAILURE(f.AwaitHeldStep());  // scheduled: no longer waiting
  auto waiting = f.Submit({2}, 4);             // the one waiting place
  RequestParams p;
  p.prompt = {3};
  p.max_tokens = 4;
  auto refused = f.engine->Submit(std::move(p), Clock::now(), Clock::time_point::max());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("waiting queue is full (1"), std::string::npos) << refused.status();
  f.Release();
  EXPECT_TRUE(Wait(*running).status.ok());
  EXPECT_TRUE(Wait(*waiting).status.ok());
}

}  // namespace
}  // namespace kraken::core
