// Iteration-level continuous batching (Yu et al., "Orca", OSDI 2022) over a paged KV cache
// (Kwon et al., "vLLM / PagedAttention", SOSP 2023), with chunked prefill inside a per-step token
// budget (Agrawal et al., "Sarathi-Serve", OSDI 2024).
//
// The scheduler knows requests only as token sequences: it never sees text, a model or a clock,
// so every decision is a pure function of (queues, free KV blocks, budget) and is unit-tested
// without a model (tests/scheduler/). One call to Schedule() plans one forward step:
//
//   1. Running sequences that decode (one known token not yet in the KV cache) get 1 token each,
//      in order; then running sequences still in prefill get a chunk of their remaining prompt
//      from what is left of the token budget. A long prompt therefore never stalls decodes.
//   2. If a running sequence needs a block and none is free, the last running sequence in order
//      that is not yet part of this step is preempted by recompute: its blocks are freed, it goes
//      back to the head of the waiting queue, and later it is prefilled again over its prompt and
//      the tokens it had generated (nothing is lost; its seeded sampling continues identically).
//      With no such victim the sequence preempts itself.
//   3. Waiting requests are admitted in order while budget, sequence slots and blocks above the
//      watermark remain; a prompt longer than the remaining budget is admitted with a first chunk.
//      Admission is strictly in order: a request that does not fit blocks those behind it.
//      With prefix caching, an admitted sequence first takes the longest run of cached full blocks
//      that holds its leading tokens (BlockManager::MatchPrefix) and is planned from the end of
//      that run: those tokens cost neither budget nor new blocks. At least its last token is
//      always computed, since its logits are needed to sample.
//      A fork (one of a request's n samples, Add's `fork_of`) shares instead the full blocks that
//      hold the prompt of the sequence it was forked from, once their K/V are computed: it waits
//      in its place in the queue while they are being computed, then computes only the rest of
//      the prompt (less than a block, its partial last block being its own) and samples on its
//      own. Sharing needs no prefix cache; a fork whose origin has ended or is not running is
//      admitted like any other sequence.
//   0. Before all of that, a suspect (Sequence::solo: a sequence that was in the batch at repeated
//      worker failures, see Requeue) runs in steps of its own: a running suspect is the only
//      sequence planned; otherwise the first waiting suspect is admitted alone if its blocks are
//      free, and the running sequences skip that step (their KV stays). So when the workers fail
//      again, the one sequence in the step is the one to blame.
//
// Order everywhere is the scheduling policy's, a value in SchedulerOptions: kPriority orders by
// (priority, arrival), lower priority values first and first come first served among equals (all
// requests have priority 0 unless a client says otherwise); kFcfs by arrival alone.
// Schedule() assumes the step will run: it advances each planned sequence's computed-token count.
// After a failed step the caller aborts the sequences it had planned; after a successful one it
// calls CacheComputed(), which registers the full blocks the step completed in the prefix cache.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "scheduler/block_manager.h"

namespace kraken::scheduler {

/// How the waiting and running queues are ordered (admission, preemption victims).
enum class SchedulingPolicy {
  kPriority,  // (priority, arrival)
  kFcfs,      // arrival; priorities are ignored
};

struct SchedulerOptions {
  int num_kv_blocks = 0;       // in each worker's pool
  int block_size = 16;         // tokens per block
  int max_batch_tokens = 512;  // new tokens per step, all sequences together
  int max_batch_seqs = 64;     // sequences per step
  int max_waiting = 256;       // waiting-queue capacity; Add beyond it is RESOURCE_EXHAUSTED
  double watermark = 0.01;     // fraction of blocks admission leaves free for running decodes
  SchedulingPolicy policy = SchedulingPolicy::kPriority;
  bool prefix_caching = false;  // reuse cached full blocks of earlier sequences (BlockManager)
};

/// One sequence as the scheduler tracks it.
struct Sequence {
  uint64_t id = 0;
  int priority = 0;
  uint64_t arrival = 0;              // order of Add calls
  std::vector<int32_t> tokens;       // prompt then generated tokens: everything known
  int32_t num_computed = 0;          // tokens of `tokens` whose K/V are in the cache
  std::vector<int32_t> block_table;  // physical blocks covering [0, num_computed)
  int preemptions = 0;
  bool running = false;
  bool use_prefix_cache = true;  // may start from cached blocks when admitted
  int32_t cached_tokens = 0;     // tokens taken from the prefix cache at its latest admission
  BlockManager::Chain chain;     // how far its blocks are registered in the prefix cache
  int32_t num_ready = 0;         // of num_computed, the tokens whose K/V a finished step computed
  uint64_t fork_of = 0;          // until its first admission: the sequence whose prompt blocks it shares
  bool solo = false;             // a suspect: runs in steps of its own (Requeue)
};

/// One sequence's part of a planned step: feed tokens[start_pos, start_pos + num_tokens).
struct ScheduledSeq {
  Sequence* seq = nullptr;
  int32_t start_pos = 0;
  int32_t num_tokens = 0;
  bool sample = false;    // the chunk reaches the last known token: sample the next one
  bool admitted = false;  // first chunk since admission (its KV before start_pos came from the cache)
};

struct StepPlan {
  std::vector<ScheduledSeq> seqs;
  std::vector<uint64_t> preempted;  // sequences preempted while planning this step
  int num_tokens = 0;
  bool empty() const { return seqs.empty(); }
};

class Scheduler {
 public:
  /// CHECK-fails on non-positive sizes (a configuration error caught at server start-up).
  explicit Scheduler(const SchedulerOptions& options);

  /// Queues a request with `tokens` (>= 1) already known. RESOURCE_EXHAUSTED when the waiting
  /// queue holds max_waiting requests; INVALID_ARGUMENT for a duplicate id, no tokens, or a
  /// sequence whose full KV could never fit in the cache. `use_prefix_cache` false: always
  /// computed from position 0 (a request that needs every prompt position's logits).
  /// `fork_of` non-zero: a sibling of that sequence with the same prompt (one of a request's n
  /// samples), which shares its full prompt blocks when admitted (see the header comment).
  Status Add(uint64_t id, std::vector<int32_t> tokens, int priority, bool use_prefix_cache = true,
             uint64_t fork_of = 0);
  /// Plans the next step (see the header comment).
  StepPlan Schedule();
  /// After a step that succeeded: the K/V it planned are computed (forks may share them), and the
  /// full blocks it completed are registered in the prefix cache (when it is on).
  void CacheComputed();
  /// The workers' KV pools were lost: forget every cached block.
  void ResetPrefixCache() { blocks_.ResetPrefixCache(); }
  /// Prefix-cache totals since start, in tokens: looked up at admission, and found cached.
  uint64_t prefix_cache_queries() const { return prefix_queries_; }
  uint64_t prefix_cache_hits() const { return prefix_hits_; }
  /// Appends a sampled token to a running sequence.
  void AppendToken(uint64_t id, int32_t token);
  /// Forgets a sequence (finished, cancelled, failed) and frees its blocks. Unknown ids are ignored.
  void Remove(uint64_t id);
  /// The workers lost the KV caches (they were restarted): a running sequence goes back to the
  /// waiting queue like a preempted one, in its arrival's place, to be recomputed over its prompt
  /// and every token it generated. `solo`: from now on it runs in steps of its own (header, 0)
  /// until SetSolo(id, false). Unknown or waiting ids are left as they are (a waiting one's solo
  /// flag is still set).
  void Requeue(uint64_t id, bool solo);
  void SetSolo(uint64_t id, bool solo);

  const Sequence* Find(uint64_t id) const;
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  int num_running() const { return static_cast<int>(running_.size()); }
  const BlockManager& blocks() const { return blocks_; }
  const SchedulerOptions& options() const { return options_; }
  /// Ids of all running sequences, in order.
  std::vector<uint64_t> running_ids() const;

 private:
  void Preempt(Sequence* s);
  void SortRunning();
  bool Before(const Sequence* a, const Sequence* b) const {
    if (options_.policy == SchedulingPolicy::kPriority && a->priority != b->priority) return a->priority < b->priority;
    return a->arrival < b->arrival;
  }
  void InsertWaiting(Sequence* s);
  // Admits waiting sequence `s` with a first chunk within `*budget` if its blocks fit above the
  // watermark (or, with nothing running, at all): removes it from waiting_, adds it to the plan.
  // False, changing nothing, when it does not fit or is a fork whose origin is still computing.
  bool TryAdmit(Sequence* s, int* budget, StepPlan* plan);
  // Plans a step of a suspect alone (header, 0); false when there is none to plan.
  bool ScheduleSolo(StepPlan* plan);
  // Full blocks a fork may share from the sequence it was forked from: 0 for none (not a fork, the
  // origin is not running or its prompt is too short), -1 while their K/V are still being computed.
  int ForkBlocks(const Sequence& s) const;

  SchedulerOptions options_;
  BlockManager blocks_;
  int watermark_blocks_ = 0;
  uint64_t next_arrival_ = 0;
  std::unordered_map<uint64_t, std::unique_ptr<Sequence>> seqs_;
  std::deque<Sequence*> waiting_;  // in order
  std::vector<Sequence*> running_;
  std::vector<int32_t> matched_;  // scratch for admission
  uint64_t prefix_queries_ = 0, prefix_hits_ = 0;
};

}  // namespace kraken::scheduler
