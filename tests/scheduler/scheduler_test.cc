// The batching decision without a model: budgets, admission, chunking, preemption, cancellation.
#include <gtest/gtest.h>

#include <numeric>

#include "scheduler/scheduler.h"

namespace kraken::scheduler {
namespace {

std::vector<int32_t> Tokens(int n) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), 1);
  return t;
}

struct Row {
  uint64_t id;
  int start, n;
  bool sample;
};

std::vector<Row> Rows(const StepPlan& p) {
  std::vector<Row> r;
  for (const auto& s : p.seqs) r.push_back({s.seq->id, s.start_pos, s.num_tokens, s.sample});
  return r;
}

void ExpectRows(const StepPlan& p, const std::vector<Row>& want) {
  auto got = Rows(p);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].id, want[i].id) << i;
    EXPECT_EQ(got[i].start, want[i].start) << i;
    EXPECT_EQ(got[i].n, want[i].n) << i;
    EXPECT_EQ(got[i].sample, want[i].sample) << i;
  }
}

TEST(BlockManager, AllocateFreeAndShare) {
  BlockManager m(4, 16);
  EXPECT_EQ(m.BlocksFor(0), 0);
  EXPECT_EQ(m.BlocksFor(16), 1);
  EXPECT_EQ(m.BlocksFor(17), 2);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(m.Allocate(3, &a).ok());
  EXPECT_EQ(a, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(m.num_free(), 1);
  Status s = m.Allocate(2, &b);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(), "KV cache: 2 blocks needed, 1 free");
  EXPECT_TRUE(b.empty()) << "all or nothing";
  m.Share(a);
  EXPECT_EQ(m.RefCount(1), 2);
  std::vector<int32_t> copy = a;
  m.Free(&a);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(m.num_free(), 1) << "shared blocks stay allocated";
  m.Free(&copy);
  EXPECT_EQ(m.num_free(), 4);
  EXPECT_DOUBLE_EQ(m.usage(), 0.0);
}

TEST(Scheduler, AdmitsPromptsWholeWithinBudgetThenDecodes) {
  Scheduler s({.num_kv_blocks = 100, .block_size = 4, .max_batch_tokens = 32, .max_batch_seqs = 8, .watermark = 0});
  ASSERT_TRUE(s.Add(1, Tokens(10), 0).ok());
  ASSERT_TRUE(s.Add(2, Tokens(5), 0).ok());
  StepPlan p = s.Schedule();
  ExpectRows(p, {{1, 0, 10, true}, {2, 0, 5, true}});
  EXPECT_EQ(p.num_tokens, 15);
  EXPECT_EQ(s.Find(1)->block_table.size(), 3u);
  EXPECT_EQ(s.Find(2)->block_table.size(), 2u);
  s.AppendToken(1, 7);
  s.AppendToken(2, 8);
  p = s.Schedule();
  ExpectRows(p, {{1, 10, 1, true}, {2, 5, 1, true}});
  EXPECT_EQ(s.Find(1)->tokens.back(), 7);
}

TEST(Scheduler, LongPromptIsChunkedAndNeverStallsDecodes) {
  Scheduler s({.num_kv_blocks = 100, .block_size = 4, .max_batch_tokens = 8, .max_batch_seqs = 8, .watermark = 0});
  ASSERT_TRUE(s.Add(1, Tokens(3), 0).ok());
  ExpectRows(s.Schedule(), {{1, 0, 3, true}});
  s.AppendToken(1, 99);
  ASSERT_TRUE(s.Add(2, Tokens(20), 0).ok());
  // Decode of 1 first, then 7 tokens of 2's prompt.
  ExpectRows(s.Schedule(), {{1, 3, 1, true}, {2, 0, 7, false}});
  s.AppendToken(1, 98);
  ExpectRows(s.Schedule(), {{1, 4, 1, true}, {2, 7, 7, false}});
  s.AppendToken(1, 97);
  ExpectRows(s.Schedule(), {{1, 5, 1, true}, {2, 14, 6, true}});
}

TEST(Scheduler, SequenceSlotsAndBudgetLimitAdmission) {
  Scheduler s({.num_kv_blocks = 100, .block_size = 4, .max_batch_tokens = 10, .max_batch_seqs = 2, .watermark = 0});
  for (uint64_t id = 1; id <= 4; ++id) ASSERT_TRUE(s.Add(id, Tokens(2), 0).ok());
  ExpectRows(s.Schedule(), {{1, 0, 2, true}, {2, 0, 2, true}});
  EXPECT_EQ(s.num_waiting(), 2);
  EXPECT_EQ(s.num_running(), 2);
}

TEST(Scheduler, WaitingQueueIsBounded) {
  Scheduler s({.num_kv_blocks = 10, .block_size = 4, .max_batch_tokens = 8, .max_batch_seqs = 2, .max_waiting = 2});
  ASSERT_TRUE(s.Add(1, Tokens(2), 0).ok());
  ASSERT_TRUE(s.Add(2, Tokens(2), 0).ok());
  Status st = s.Add(3, Tokens(2), 0);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(st.message(), "waiting queue is full (2 requests)");
  EXPECT_EQ(s.Add(1, Tokens(2), 0).code(), absl::StatusCode::kInvalidArgument);
  Status big = Scheduler({.num_kv_blocks = 2, .block_size = 4}).Add(9, Tokens(9), 0);
  EXPECT_EQ(big.message(), "sequence of 9 tokens needs more KV blocks than the cache has (2)");
}

TEST(Scheduler, PriorityOrdersAdmissionThenArrival) {
  Scheduler s({.num_kv_blocks = 100, .block_size = 4, .max_batch_tokens = 100, .max_batch_seqs = 2, .watermark = 0});
  ASSERT_TRUE(s.Add(1, Tokens(2), 5).ok());
  ASSERT_TRUE(s.Add(2, Tokens(2), 0).ok());
  ASSERT_TRUE(s.Add(3, Tokens(2), 0).ok());
  ExpectRows(s.Schedule(), {{2, 0, 2, true}, {3, 0, 2, true}});
}

TEST(Scheduler, WatermarkHoldsBackAdmission) {
  // 10 blocks, watermark 20% = 2 blocks kept free for running decodes.
  Scheduler s({.num_kv_blocks = 10, .block_size = 4, .max_batch_tokens = 100, .max_batch_seqs = 8, .watermark = 0.2});
  ASSERT_TRUE(s.Add(1, Tokens(24), 0).ok());  // 6 blocks
  ASSERT_TRUE(s.Add(2, Tokens(8), 0).ok());   // 2 more would leave 2: allowed
  ASSERT_TRUE(s.Add(3, Tokens(4), 0).ok());   // 1 more would leave 1: held back
  ExpectRows(s.Schedule(), {{1, 0, 24, true}, {2, 0, 8, true}});
  EXPECT_EQ(s.num_waiting(), 1);
  EXPECT_EQ(s.blocks().num_free(), 2);
}

TEST(Scheduler, PreemptsTheLastRunningByRecomputeWhenBlocksRunOut) {
  Scheduler s({.num_kv_blocks = 4, .block_size = 2, .max_batch_tokens = 100, .max_batch_seqs = 8, .watermark = 0});
  ASSERT_TRUE(s.Add(1, Tokens(4), 0).ok());  // 2 blocks
  ASSERT_TRUE(s.Add(2, Tokens(4), 0).ok());  // 2 blocks: the cache is full
  ExpectRows(s.Schedule(), {{1, 0, 4, true}, {2, 0, 4, true}});
  s.AppendToken(1, 50);
  s.AppendToken(2, 60);
  // Both need a third block for position 4; only by preempting 2 can 1 go on.
  StepPlan p = s.Schedule();
  ExpectRows(p, {{1, 4, 1, true}});
  EXPECT_EQ(p.preempted, (std::vector<uint64_t>{2}));
  const Sequence* two = s.Find(2);
  EXPECT_FALSE(two->running);
  EXPECT_EQ(two->num_computed, 0);
  EXPECT_TRUE(two->block_table.empty());
  EXPECT_EQ(two->tokens.size(), 5u) << "the generated token is kept for recompute";
  EXPECT_EQ(two->preemptions, 1);
  // When 1 finishes, 2 is prefilled again over prompt + generated and samples its next token.
  s.Remove(1);
  ExpectRows(s.Schedule(), {{2, 0, 5, true}});
}

TEST(Scheduler, ASequenceWithNoVictimPreemptsItself) {
  Scheduler s({.num_kv_blocks = 2, .block_size = 2, .max_batch_tokens = 100, .max_batch_seqs = 8, .watermark = 0});
  ASSERT_TRUE(s.Add(1, Tokens(4), 0).ok());
  ExpectRows(s.Schedule(), {{1, 0, 4, true}});
  s.AppendToken(1, 5);
  StepPlan p = s.Schedule();
  EXPECT_TRUE(p.empty());
  EXPECT_EQ(p.preempted, (std::vector<uint64_t>{1}));
  EXPECT_EQ(s.num_waiting(), 1);
}

TEST(Scheduler, ARequeuedSequenceIsRecomputedOverEveryTokenItHadInItsArrivalsPlace) {
  // The workers lost their KV caches: every running sequence is requeued and recomputed.
  Scheduler s({.num_kv_blocks = 100, .block_size = 4, .max_batch_tokens = 64, .max_batch_seqs = 8, .watermark = 0});
  ASSERT_TRUE(s.Add(1, Tokens(6), 0).ok());
  ASSERT_TRUE(s.Add(2, Tokens(3), 0).ok());
  ExpectRows(s.Schedule(), {{1, 0, 6, true}, {2, 0, 3, true}});
  s.AppendToken(1, 70);
  s.AppendToken(2, 80);
  ASSERT_TRUE(s.Add(3, Tokens(2), 0).ok());  // arrived later, waiting
  s.Requeue(2, /*solo=*/false);
  s.Requeue(1, /*solo=*/false);
  s.Requeue(3, /*solo=*/false);  // waiting already: unchanged
  EXPECT_EQ(s.num_running(), 0);
  EXPECT_EQ(s.blocks().num_free(), 100);
  EXPECT_EQ(s.Find(1)->tokens, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 70}));
  ExpectRows(s.Schedule(), {{1, 0, 7, true}, {2, 0, 4, true}, {3, 0, 2, true}});
}

TEST(Scheduler, ASuspectRunsInStepsOfItsOwnUntilCleared) {
  Scheduler s({.num_kv_blocks = 100, .block_size = 4, .max_batch_tokens = 64, .max_batch_seqs = 8, .watermark = 0});
  for (uint64_t id = 1; id <= 3; ++id) ASSERT_TRUE(s.Add(id, Tokens(5), 0).ok());
  ExpectRows(s.Schedule(), {{1, 0, 5, true}, {2, 0, 5, true}, {3, 0, 5, true}});
  for (uint64_t id = 1; id <= 3; ++id) s.AppendToken(id, 9);
  // A failure: 2 and 3 are suspects, 1 is not.
  s.Requeue(1, false);
  s.Requeue(2, true);
  s.Requeue(3, true);
  ASSERT_TRUE(s.Add(4, Tokens(2), 0).ok());
  ExpectRows(s.Schedule(), {{2, 0, 6, true}});  // the first suspect, alone
  s.AppendToken(2, 10);
  ExpectRows(s.Schedule(), {{2, 6, 1, true}});  // still alone while a suspect
  s.SetSolo(2, false);                          // it completed a step: not the culprit
  s.AppendToken(2, 11);
  ExpectRows(s.Schedule(), {{3, 0, 6, true}});  // the next suspect, alone; 2 skips this step
  EXPECT_EQ(s.Find(2)->num_computed, 7) << "a sequence that skips a step keeps its KV";
  s.SetSolo(3, false);
  s.AppendToken(3, 12);
  ExpectRows(s.Schedule(), {{2, 7, 1, true}, {3, 6, 1, true}, {1, 0, 6, true}, {4, 0, 2, true}});
}

TEST(Scheduler, RemoveFreesBlocksOfRunningAndWaiting) {
  Scheduler s({.num_kv_blocks = 10, .block_size = 4, .max_batch_tokens = 8, .max_batch_seqs = 8, .watermark = 0});
  ASSERT_TRUE(s.Add(1, Tokens(8), 0).ok());
  ASSERT_TRUE(s.Add(2, Tokens(8), 0).ok());
  s.Schedule();  // 1 admitted whole (budget 8), 2 waits
  EXPECT_EQ(s.blocks().num_free(), 8);
  s.Remove(1);  // cancelled mid-run
  EXPECT_EQ(s.blocks().num_free(), 10);
  s.Remove(2);  // cancelled while waiting
  EXPECT_EQ(s.num_waiting(), 0);
  EXPECT_EQ(s.num_running(), 0);
  s.Remove(42);  // unknown: ignored
  EXPECT_TRUE(s.Schedule().empty());
}

TEST(Scheduler, ThePolicyOrdersAdmission) {
  // One sequence slot: whoever the policy puts first is admitted first.
  for (SchedulingPolicy policy : {SchedulingPolicy::kPriority, SchedulingPolicy::kFcfs}) {
    Scheduler s({.num_kv_blocks = 64,
                 .block_size = 4,
                 .max_batch_tokens = 64,
                 .max_batch_seqs = 1,
                 .watermark = 0,
                 .policy = policy});
    ASSERT_TRUE(s.Add(1, Tokens(3), /*priority=*/5).ok());
    ASSERT_TRUE(s.Add(2, Tokens(3), /*priority=*/-1).ok());
    const uint64_t first = policy == SchedulingPolicy::kPriority ? 2 : 1;
    ExpectRows(s.Schedule(), {{first, 0, 3, true}});
  }
}

}  // namespace
}  // namespace kraken::scheduler
