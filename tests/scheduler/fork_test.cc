// A request's n samples as forks of its first sample, without a model: a fork waits while the
// prompt's K/V are being computed, then shares its full blocks and computes only the partial last
// block; with its origin ended or not running it is admitted like any other sequence.
#include <gtest/gtest.h>

#include "scheduler/scheduler.h"
#include "tests/scheduler/token_util.h"

namespace kraken::scheduler {
namespace {

SchedulerOptions Options(int blocks, int block_size, bool prefix_caching, int budget = 64) {
  return {.num_kv_blocks = blocks,
          .block_size = block_size,
          .max_batch_tokens = budget,
          .max_batch_seqs = 8,
          .watermark = 0,
          .prefix_caching = prefix_caching};
}

const ScheduledSeq* Planned(const StepPlan& p, uint64_t id) {
  for (const ScheduledSeq& ss : p.seqs)
    if (ss.seq->id == id) return &ss;
  return nullptr;
}

class ForkTest : public ::testing::TestWithParam<bool> {};  // prefix caching on, off

TEST_P(ForkTest, ForksWaitForThePromptThenShareItsFullBlocks) {
  Scheduler s(Options(32, 4, GetParam()));
  const std::vector<int32_t> prompt = Iota(10);  // 2 full blocks, 2 tokens in a partial one
  ASSERT_TRUE(s.Add(1, prompt, 0).ok());
  ASSERT_TRUE(s.Add(2, prompt, 0, true, /*fork_of=*/1).ok());
  ASSERT_TRUE(s.Add(3, prompt, 0, true, /*fork_of=*/1).ok());

  StepPlan p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 1u) << "the forks wait while the prompt's K/V are being computed";
  EXPECT_EQ(p.seqs[0].seq->id, 1u);
  EXPECT_EQ(s.num_waiting(), 2);
  s.CacheComputed();
  s.AppendToken(1, 500);

  p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 3u);
  for (uint64_t id : {2u, 3u}) {
    const ScheduledSeq* f = Planned(p, id);
    ASSERT_NE(f, nullptr);
    EXPECT_TRUE(f->admitted);
    EXPECT_TRUE(f->sample);
    EXPECT_EQ(f->start_pos, 8) << "the 2 full blocks are shared";
    EXPECT_EQ(f->num_tokens, 2) << "the partial block is computed by each fork";
    EXPECT_EQ(f->seq->cached_tokens, 0) << "shared, not taken from the prefix cache";
  }
  const Sequence& one = *s.Find(1);
  const Sequence& two = *s.Find(2);
  const Sequence& three = *s.Find(3);
  ASSERT_EQ(two.block_table.size(), 3u);
  ASSERT_EQ(three.block_table.size(), 3u);
  for (int b = 0; b < 2; ++b) {
    EXPECT_EQ(two.block_table[b], one.block_table[b]);
    EXPECT_EQ(three.block_table[b], one.block_table[b]);
    EXPECT_EQ(s.blocks().RefCount(one.block_table[b]), 3);
  }
  EXPECT_NE(two.block_table[2], one.block_table[2]) << "the partial block is each sample's own";
  EXPECT_NE(three.block_table[2], two.block_table[2]);
  EXPECT_EQ(p.num_tokens, 1 + 2 + 2);
  EXPECT_EQ(s.prefix_cache_hits(), 0u);

  // The origin ends; the forks keep their blocks.
  s.CacheComputed();
  s.Remove(1);
  EXPECT_EQ(s.blocks().RefCount(two.block_table[0]), 2);
  s.Remove(2);
  s.Remove(3);
  EXPECT_EQ(s.blocks().num_free(), 32) << "every block is back";
}

TEST_P(ForkTest, AForkWaitsThroughAChunkedPrefill) {
  Scheduler s(Options(32, 4, GetParam(), /*budget=*/6));
  const std::vector<int32_t> prompt = Iota(13);  // 3 full blocks: 12 tokens to share
  ASSERT_TRUE(s.Add(1, prompt, 0).ok());
  ASSERT_TRUE(s.Add(2, prompt, 0, true, 1).ok());
  for (int step = 0; step < 2; ++step) {  // 6 + 6 tokens: the prompt's blocks are not all computed
    StepPlan p = s.Schedule();
    ASSERT_EQ(p.seqs.size(), 1u) << "step " << step;
    s.CacheComputed();
  }
  StepPlan p = s.Schedule();  // the origin's last token, and the fork's 1 token after 12 shared
  ASSERT_EQ(p.seqs.size(), 2u);
  EXPECT_EQ(Planned(p, 2)->start_pos, 12);
  EXPECT_EQ(Planned(p, 2)->num_tokens, 1);
}

TEST_P(ForkTest, AForkWhoseOriginIsGoneOrWaitingComputesItsWholePrompt) {
  Scheduler s(Options(32, 4, false));
  const std::vector<int32_t> prompt = Iota(10);
  ASSERT_TRUE(s.Add(1, prompt, 0).ok());
  ASSERT_TRUE(s.Add(2, prompt, 0, true, 1).ok());
  s.Remove(1);  // cancelled before it ran
  StepPlan p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].seq->id, 2u);
  EXPECT_EQ(p.seqs[0].start_pos, 0);

  // A prompt with no full block before its last token has nothing to share: no wait.
  ASSERT_TRUE(s.Add(3, Iota(4), 0).ok());
  ASSERT_TRUE(s.Add(4, Iota(4), 0, true, 3).ok());
  p = s.Schedule();
  EXPECT_NE(Planned(p, 3), nullptr);
  ASSERT_NE(Planned(p, 4), nullptr);
  EXPECT_EQ(Planned(p, 4)->start_pos, 0);

  // A "fork" whose tokens differ from its origin's shares nothing.
  s.CacheComputed();
  std::vector<int32_t> other = prompt;
  other[0] = 99;
  ASSERT_TRUE(s.Add(5, prompt, 0).ok());
  s.Schedule();
  s.CacheComputed();
  ASSERT_TRUE(s.Add(6, other, 0, true, 5).ok());
  p = s.Schedule();
  ASSERT_NE(Planned(p, 6), nullptr);
  EXPECT_EQ(Planned(p, 6)->start_pos, 0);
}

TEST_P(ForkTest, APreemptedForkIsReadmittedWithoutWaitingForItsOrigin) {
  // 6 blocks of 4: the origin and the fork run, then the origin's decode needs a block there is
  // none of and the fork (the last in order) is preempted; it comes back by recompute.
  Scheduler s(Options(6, 4, GetParam()));
  const std::vector<int32_t> prompt = Iota(10);
  ASSERT_TRUE(s.Add(1, prompt, 0).ok());
  ASSERT_TRUE(s.Add(2, prompt, 0, true, 1).ok());
  s.Schedule();
  s.CacheComputed();
  s.AppendToken(1, 100);
  s.Schedule();  // origin decodes; fork admitted sharing 2 blocks: 3 + 1 blocks held
  s.CacheComputed();
  s.AppendToken(1, 101);
  s.AppendToken(2, 200);
  bool preempted = false;
  for (int i = 0; i < 12 && !preempted; ++i) {
    StepPlan p = s.Schedule();
    s.CacheComputed();
    for (const ScheduledSeq& ss : p.seqs) s.AppendToken(ss.seq->id, 300 + i);
    preempted = !p.preempted.empty();
    if (preempted) {
      EXPECT_EQ(p.preempted[0], 2u);
    }
  }
  ASSERT_TRUE(preempted);
  s.Remove(1);
  StepPlan p = s.Schedule();
  ASSERT_NE(Planned(p, 2), nullptr) << "readmitted once there is room";
  EXPECT_EQ(Planned(p, 2)->start_pos, GetParam() ? Planned(p, 2)->seq->cached_tokens : 0);
}

INSTANTIATE_TEST_SUITE_P(PrefixCaching, ForkTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "CachingOn" : "CachingOff"; });

}  // namespace
}  // namespace kraken::scheduler
