// Prefix caching without a model: which blocks are registered, matched, shared, evicted and
// forgotten, and how admission plans a sequence that starts with cached blocks.
#include <gtest/gtest.h>

#include "scheduler/scheduler.h"
#include "tests/scheduler/token_util.h"

namespace kraken::scheduler {
namespace {

// Allocates blocks for `tokens`, registers its full blocks as computed, and returns the table.
std::vector<int32_t> Computed(BlockManager& m, const std::vector<int32_t>& tokens) {
  std::vector<int32_t> table;
  EXPECT_TRUE(m.Allocate(m.BlocksFor(static_cast<int64_t>(tokens.size())), &table).ok());
  BlockManager::Chain chain;
  m.CacheFullBlocks(tokens, static_cast<int64_t>(tokens.size()), table, &chain);
  EXPECT_EQ(chain.blocks, static_cast<int>(tokens.size()) / m.block_size());
  return table;
}

TEST(PrefixCache, FullBlocksAreMatchedExactlyAndPartialOnesNever) {
  BlockManager m(8, 4, /*prefix_caching=*/true);
  const std::vector<int32_t> a = Iota(10);  // blocks [1..4] [5..8], partial [9 10]
  std::vector<int32_t> table = Computed(m, a);
  EXPECT_EQ(m.num_cached(), 2) << "the partial third block is not registered";

  std::vector<int32_t> hit;
  EXPECT_EQ(m.MatchPrefix(a, 100, &hit).blocks, 2);
  EXPECT_EQ(hit, (std::vector<int32_t>{table[0], table[1]}));
  // Same first block, different second: only the first matches.
  std::vector<int32_t> b = a;
  b[6] = 99;
  EXPECT_EQ(m.MatchPrefix(b, 100, &hit).blocks, 1);
  EXPECT_EQ(hit, (std::vector<int32_t>{table[0]}));
  // The second block's tokens after a different first block: a key is the whole prefix.
  std::vector<int32_t> c = a;
  c[0] = 99;
  EXPECT_EQ(m.MatchPrefix(c, 100, &hit).blocks, 0);
  EXPECT_TRUE(hit.empty());
  // A cap, and a prompt shorter than a block.
  EXPECT_EQ(m.MatchPrefix(a, 1, &hit).blocks, 1);
  EXPECT_EQ(m.MatchPrefix(Iota(3), 100, &hit).blocks, 0);

  BlockManager off(8, 4, /*prefix_caching=*/false);
  std::vector<int32_t> t;
  ASSERT_TRUE(off.Allocate(3, &t).ok());
  BlockManager::Chain chain;
  off.CacheFullBlocks(a, 10, t, &chain);
  EXPECT_EQ(off.num_cached(), 0);
  EXPECT_EQ(off.MatchPrefix(a, 100, &hit).blocks, 0);
}

TEST(PrefixCache, FreedBlocksStayCachedUntilAnAllocationNeedsThem) {
  BlockManager m(4, 2, /*prefix_caching=*/true);
  std::vector<int32_t> a = Computed(m, Iota(4));  // 2 cached blocks
  std::vector<int32_t> a_blocks = a;
  m.Free(&a);
  EXPECT_EQ(m.num_free(), 4) << "cached blocks without a holder count as free";
  EXPECT_EQ(m.num_evictable(), 2);
  EXPECT_DOUBLE_EQ(m.usage(), 0.0);

  // Never-used blocks are handed out first: the cached ones survive.
  std::vector<int32_t> other;
  ASSERT_TRUE(m.Allocate(2, &other).ok());
  std::vector<int32_t> hit;
  EXPECT_EQ(m.MatchPrefix(Iota(4), 100, &hit).blocks, 2);
  EXPECT_EQ(hit, a_blocks);

  // Then the least recently freed: the prefix's tail (its second block) before its head.
  std::vector<int32_t> more;
  ASSERT_TRUE(m.Allocate(1, &more).ok());
  EXPECT_EQ(more, (std::vector<int32_t>{a_blocks[1]}));
  EXPECT_EQ(m.MatchPrefix(Iota(4), 100, &hit).blocks, 1);
  EXPECT_EQ(m.num_cached(), 1);
  ASSERT_TRUE(m.Allocate(1, &more).ok());
  EXPECT_EQ(m.MatchPrefix(Iota(4), 100, &hit).blocks, 0);
  EXPECT_EQ(m.num_free(), 0);
  EXPECT_EQ(m.Allocate(1, &more).code(), absl::StatusCode::kResourceExhausted);
}

TEST(PrefixCache, SharingAnUnheldBlockTakesItOutOfTheEvictionOrder) {
  BlockManager m(3, 2, /*prefix_caching=*/true);
  std::vector<int32_t> a = Computed(m, Iota(4));
  m.Free(&a);
  std::vector<int32_t> hit;
  ASSERT_EQ(m.MatchPrefix(Iota(4), 100, &hit).blocks, 2);
  m.Share(hit);
  EXPECT_EQ(m.RefCount(hit[0]), 1);
  EXPECT_EQ(m.num_evictable(), 0);
  EXPECT_EQ(m.num_free(), 1);
  std::vector<int32_t> more;
  ASSERT_TRUE(m.Allocate(1, &more).ok());
  EXPECT_EQ(m.Allocate(1, &more).code(), absl::StatusCode::kResourceExhausted) << "held cached blocks are not free";
  EXPECT_EQ(m.MatchPrefix(Iota(4), 100, &hit).blocks, 2);
}

TEST(PrefixCache, ASecondCopyOfACachedPrefixStaysPrivate) {
  BlockManager m(8, 2, /*prefix_caching=*/true);
  std::vector<int32_t> first = Computed(m, Iota(4));
  // Computed at the same time by another sequence, in other blocks: the cache keeps the first.
  std::vector<int32_t> second;
  ASSERT_TRUE(m.Allocate(2, &second).ok());
  BlockManager::Chain chain;
  m.CacheFullBlocks(Iota(4), 4, second, &chain);
  EXPECT_EQ(chain.blocks, 2);
  EXPECT_EQ(m.num_cached(), 2);
  std::vector<int32_t> hit;
  m.MatchPrefix(Iota(4), 100, &hit);
  EXPECT_EQ(hit, first);
  // The private copy's chain continues from the cached entries: its next block is findable.
  std::vector<int32_t> longer = Iota(6);
  ASSERT_TRUE(m.Allocate(1, &second).ok());
  m.CacheFullBlocks(longer, 6, second, &chain);
  EXPECT_EQ(m.MatchPrefix(longer, 100, &hit).blocks, 3);
  EXPECT_EQ(hit, (std::vector<int32_t>{first[0], first[1], second[2]}));
  m.Free(&second);
  EXPECT_EQ(m.num_evictable(), 1) << "the private copies went back to the pool uncached";
}

TEST(PrefixCache, ResetForgetsEveryBlock) {
  BlockManager m(4, 2, /*prefix_caching=*/true);
  std::vector<int32_t> held = Computed(m, Iota(2));
  std::vector<int32_t> freed = Computed(m, Iota(4, 10));
  m.Free(&freed);
  m.ResetPrefixCache();
  std::vector<int32_t> hit;
  EXPECT_EQ(m.num_cached(), 0);
  EXPECT_EQ(m.num_evictable(), 0);
  EXPECT_EQ(m.num_free(), 3);
  EXPECT_EQ(m.RefCount(held[0]), 1) << "held blocks stay held";
  EXPECT_EQ(m.MatchPrefix(Iota(2), 100, &hit).blocks, 0);
  EXPECT_EQ(m.MatchPrefix(Iota(4, 10), 100, &hit).blocks, 0);
  m.Free(&held);
  EXPECT_EQ(m.num_free(), 4);
}

// The plan has one sequence, starting at `start`.
void ExpectRowsStart(const StepPlan& p, int start) {
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].start_pos, start);
}

// Sequence `id` with `tokens` is admitted, its step succeeds, and it ends: its full blocks stay
// cached.
void RunToTheEnd(Scheduler& s, uint64_t id, std::vector<int32_t> tokens) {
  ASSERT_TRUE(s.Add(id, std::move(tokens), 0).ok());
  s.Schedule();
  s.CacheComputed();
  s.Remove(id);
}

SchedulerOptions CachingOptions(int blocks, int block_size) {
  return {.num_kv_blocks = blocks,
          .block_size = block_size,
          .max_batch_tokens = 64,
          .max_batch_seqs = 8,
          .watermark = 0,
          .prefix_caching = true};
}

TEST(PrefixCacheScheduler, AnAdmittedSequenceStartsAfterItsCachedBlocks) {
  Scheduler s(CachingOptions(16, 4));
  std::vector<int32_t> prompt = Iota(10);
  ASSERT_TRUE(s.Add(1, prompt, 0).ok());
  StepPlan p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_TRUE(p.seqs[0].admitted);
  s.CacheComputed();
  s.Remove(1);

  // Same first 8 tokens (2 blocks), then different: computed from position 8.
  std::vector<int32_t> b = prompt;
  b[9] = 77;
  b.push_back(78);
  ASSERT_TRUE(s.Add(2, b, 0).ok());
  p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].start_pos, 8);
  EXPECT_EQ(p.seqs[0].num_tokens, 3);
  EXPECT_TRUE(p.seqs[0].sample);
  EXPECT_TRUE(p.seqs[0].admitted);
  EXPECT_EQ(p.num_tokens, 3) << "cached tokens cost no budget";
  const Sequence* two = s.Find(2);
  EXPECT_EQ(two->cached_tokens, 8);
  EXPECT_EQ(two->block_table.size(), 3u);
  EXPECT_EQ(s.prefix_cache_queries(), 10u + 11u);
  EXPECT_EQ(s.prefix_cache_hits(), 8u);
  s.AppendToken(2, 5);
  p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_FALSE(p.seqs[0].admitted) << "a decode step is not an admission";
}

TEST(PrefixCacheScheduler, TheLastTokenIsAlwaysComputed) {
  Scheduler s(CachingOptions(16, 4));
  RunToTheEnd(s, 1, Iota(8));
  // The whole prompt is cached (2 full blocks), but its last position's logits are needed.
  ASSERT_TRUE(s.Add(2, Iota(8), 0).ok());
  StepPlan p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].start_pos, 4);
  EXPECT_EQ(p.seqs[0].num_tokens, 4);
  EXPECT_EQ(s.Find(2)->cached_tokens, 4);
}

TEST(PrefixCacheScheduler, SequencesThatOptOutOrCachingOffComputeEverything) {
  Scheduler on(CachingOptions(16, 4));
  RunToTheEnd(on, 1, Iota(12));
  ASSERT_TRUE(on.Add(2, Iota(12), 0, /*use_prefix_cache=*/false).ok());
  ExpectRowsStart(on.Schedule(), 0);
  EXPECT_EQ(on.prefix_cache_queries(), 12u) << "an opted-out sequence is not a query";

  SchedulerOptions o = CachingOptions(16, 4);
  o.prefix_caching = false;
  Scheduler off(o);
  RunToTheEnd(off, 1, Iota(12));
  ASSERT_TRUE(off.Add(2, Iota(12), 0).ok());
  ExpectRowsStart(off.Schedule(), 0);
  EXPECT_EQ(off.prefix_cache_queries(), 0u);
}

TEST(PrefixCacheScheduler, BlocksAreCachedOnlyAfterTheirStepSucceeds) {
  Scheduler s(CachingOptions(16, 4));
  ASSERT_TRUE(s.Add(1, Iota(12), 0).ok());
  s.Schedule();  // the step "fails": no CacheComputed
  s.Remove(1);
  ASSERT_TRUE(s.Add(2, Iota(12), 0).ok());
  ExpectRowsStart(s.Schedule(), 0);
  EXPECT_EQ(s.blocks().num_cached(), 0);
}

TEST(PrefixCacheScheduler, TwoRunningSequencesShareThePrefixBlocks) {
  Scheduler s(CachingOptions(16, 4));
  std::vector<int32_t> system = Iota(8);
  std::vector<int32_t> a = system, b = system;
  a.insert(a.end(), {100, 101});
  b.insert(b.end(), {200, 201, 202});
  ASSERT_TRUE(s.Add(1, a, 0).ok());
  s.Schedule();
  s.CacheComputed();
  s.AppendToken(1, 102);
  ASSERT_TRUE(s.Add(2, b, 0).ok());
  StepPlan p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 2u);
  EXPECT_EQ(p.seqs[0].seq->id, 1u) << "1 decodes";
  EXPECT_EQ(p.seqs[1].start_pos, 8) << "2 starts after the shared blocks";
  const Sequence* one = s.Find(1);
  const Sequence* two = s.Find(2);
  EXPECT_EQ(one->block_table[0], two->block_table[0]);
  EXPECT_EQ(one->block_table[1], two->block_table[1]);
  EXPECT_NE(one->block_table[2], two->block_table[2]) << "partial blocks are private";
  EXPECT_EQ(s.blocks().RefCount(one->block_table[0]), 2);
  EXPECT_EQ(s.blocks().num_free(), 16 - 4);
  s.Remove(1);
  EXPECT_EQ(s.blocks().RefCount(two->block_table[0]), 1);
}

TEST(PrefixCacheScheduler, UnheldMatchedBlocksAreNotCountedFreeForTheWatermark) {
  // 4 blocks of 2: a finished 6-token sequence leaves 3 cached unheld blocks. A new 8-token
  // prompt matching 3 needs 1 more: 4 - 3 unheld - 1 = 0 free after admission, which a
  // watermark of 1 block refuses while another sequence runs.
  SchedulerOptions o = CachingOptions(5, 2);
  o.watermark = 0.2;  // 1 block
  Scheduler s(o);
  RunToTheEnd(s, 1, Iota(6));
  ASSERT_TRUE(s.Add(2, {50}, 0).ok());  // holds 1 block and keeps running
  s.Schedule();
  ASSERT_TRUE(s.Add(3, Iota(8), 0).ok());
  EXPECT_TRUE(s.Schedule().seqs.size() == 1 && s.Find(3)->running == false)
      << "only the decode of 2 is planned: 3 would leave 0 free blocks, under the watermark";
  s.Remove(2);
  StepPlan p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].start_pos, 6);
  EXPECT_EQ(s.blocks().num_free(), 1);
}

TEST(PrefixCacheScheduler, APreemptedSequenceResumesFromItsOwnCachedBlocks) {
  Scheduler s(CachingOptions(4, 2));
  ASSERT_TRUE(s.Add(1, Iota(4), 0).ok());
  ASSERT_TRUE(s.Add(2, Iota(4, 10), 0).ok());
  s.Schedule();
  s.CacheComputed();
  s.AppendToken(1, 50);
  s.AppendToken(2, 60);
  StepPlan p = s.Schedule();  // 2 is preempted so that 1 gets a third block
  ASSERT_EQ(p.preempted, (std::vector<uint64_t>{2}));
  s.CacheComputed();
  s.Remove(1);
  // 2 comes back over prompt + its generated token. Making room for 1 evicted 2's second block
  // (a freed prefix loses its tail first); its first is still cached.
  p = s.Schedule();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].seq->id, 2u);
  EXPECT_EQ(p.seqs[0].start_pos, 2);
  EXPECT_EQ(p.seqs[0].num_tokens, 3);
  EXPECT_EQ(s.Find(2)->cached_tokens, 2);
}

}  // namespace
}  // namespace kraken::scheduler
