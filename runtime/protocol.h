// The front-end <-> worker contract: the layout of the shared-memory segment through which the
// front-end hands every worker the same step plan and rank 0 hands back the step result. Both
// sides include only this header for it; the layout is fixed-size, pointer-free, versioned
// (kProtocolVersion, checked by workers at start) and sized by Limits.
//
//   Segment: [Control | rendezvous store (StoreSlot[2W + 8]) | plan header + PlanSeq[max_seqs] + tokens[max_tokens] +
//   block ids
//             [max_seqs * max_blocks_per_seq] + history[max_history] |
//             result header + ResultSeq[max_seqs] + prompt logprobs[max_tokens]]
//
// Step protocol: the front-end fills the plan, stores plan_step, bumps plan_futex and wakes the
// workers (FUTEX_WAKE on a process-shared word; no spinning while idle). Every worker runs its
// shard of the step — the collectives inside keep them in lock step — and records done_step;
// rank 0 also samples, fills the result, bumps result_futex and wakes the front-end.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "base/status.h"
#include "engine/sampler.h"
#include "runtime/memory.h"
#include "runtime/shm_store.h"

namespace kraken::runtime {

inline constexpr uint64_t kMagic = 0x31564e454b41524bull;  // "KRAKENV1"
inline constexpr uint32_t kProtocolVersion = 8;
inline constexpr int kMaxWorld = 64;
inline constexpr int kMessageBytes = 512;
inline constexpr int kSeqErrorBytes = 160;

/// How a worker process ends (its exit status). The front-end tells a failure that started in a
/// worker from its peers' reactions to it by these values: a peer whose collective failed because
/// another rank died exits kFailed too, while the one at fault was killed by a signal or exited
/// otherwise.
enum class WorkerExit : int {
  kShutdown = 0,      // told to shut down
  kBadArguments = 2,  // a command line the front-end could not have written
  kFailed = 3,        // its own error or a failed collective; the message is in its RankSlot
  kOrphaned = 4,      // the front-end is gone (lifeline closed or parent changed)
};

/// Sizes that fix a segment's layout. Written by the front-end, verified by each worker.
struct Limits {
  int32_t world_size = 1;
  int32_t max_tokens = 0;          // new tokens per step, all sequences together
  int32_t max_seqs = 0;            // sequences per step
  int32_t max_blocks_per_seq = 0;  // KV blocks of one sequence (context / block size, rounded up)
  int32_t max_history = 0;         // penalty-history tokens per step, all sequences together
  int32_t vocab_size = 0;
  int32_t num_kv_blocks = 0;  // blocks in each worker's KV pool (0 until decided: Control::kv_blocks)
  int32_t block_size = 16;    // tokens per KV block
};

enum class StepKind : uint32_t { kForward = 1, kShutdown = 2 };

/// One sequence of a step. Offsets index the plan's token, block and history arrays.
struct PlanSeq {
  uint64_t seq_id = 0;            // the scheduler's id, echoed in the result
  int32_t token_offset = 0;       // first of this sequence's new tokens in tokens[]
  int32_t num_tokens = 0;         // >= 1 (workers refuse 0)
  int32_t start_pos = 0;          // tokens already in the KV cache
  int32_t block_offset = 0;       // first block id in blocks[]
  int32_t num_blocks = 0;         // covers positions [0, start_pos + num_tokens)
  int32_t history_offset = 0;     // penalty history in history[]: prompt tokens then generated
  int32_t history_prompt = 0;     //   ... this many prompt tokens
  int32_t history_generated = 0;  //   ... then this many generated tokens
  int32_t history_banned = 0;     //   ... then this many ids that may not be sampled
  int64_t draw_index = 0;         // index of the token to sample (tokens generated so far)
  uint8_t sample = 0;             // 1: sample a next token from the last new token's logits
  uint8_t prompt_logprobs = 0;    // 1: score each new token after the first, then next_token (PromptLogprob)
  uint8_t reserved[2] = {};
  int32_t next_token = -1;   // with prompt_logprobs: the known token after this chunk, scored by its last row; -1: none
  int32_t history_bias = 0;  // after the banned ids: this many engine::TokenBias, two history slots each
  engine::SamplingParams sampling;  // as validated by the server
};

struct PlanHeader {
  uint64_t step = 0;
  StepKind kind = StepKind::kForward;
  int32_t num_seqs = 0;
  int32_t num_tokens = 0;
  int32_t num_block_ids = 0;
  int32_t num_history = 0;
  int32_t reserved = 0;
};

/// One sequence's result (written by rank 0).
struct ResultSeq {
  uint64_t seq_id = 0;
  int32_t token = -1;   // sampled id, or -1 when not sampled
  float logprob = 0.f;  // of `token` under the model's raw distribution
  int32_t num_top = 0;
  int32_t error = 0;  // 0, or an absl::StatusCode for this sequence alone
  engine::TokenLogprob top[engine::kMaxReportedLogprobs] = {};
  int32_t prompt_logprob_offset = 0;        // into prompt_logprobs[]: num_prompt_logprobs entries
  int32_t num_prompt_logprobs = 0;          // with prompt_logprobs: num_tokens - 1, plus 1 with a next_token
  char error_message[kSeqErrorBytes] = {};  // with error: the worker's message, NUL-terminated

  /// OK, or this sequence's own failure with the worker's code and message.
  Status status() const {
    if (error == 0) return absl::OkStatus();
    return Status(static_cast<absl::StatusCode>(error),
                  std::string(error_message, strnlen(error_message, kSeqErrorBytes)));
  }
};

/// One known token scored under the logits of the position before it (prompt logprobs): its
/// logprob and the step's sequence's top_logprobs most likely alternatives, then the token itself when it
/// is not among them (engine::Sampler::Score).
struct PromptLogprob {
  int32_t token = 0;
  float logprob = 0.f;
  int32_t num_top = 0;
  int32_t reserved = 0;
  engine::TokenLogprob top[engine::kMaxReportedLogprobs] = {};
};

struct ResultHeader {
  uint64_t step = 0;
  int32_t status = 0;  // absl::StatusCode of the whole step
  int32_t num_seqs = 0;
  char message[kMessageBytes] = {};
};

/// Per-rank timing of the steps so far, in nanoseconds (monotonic clock).
struct RankStats {
  std::atomic<uint64_t> steps{0};
  std::atomic<uint64_t> busy_ns{0};          // inside a step, not waiting on a collective
  std::atomic<uint64_t> exposed_comm_ns{0};  // the compute path blocked in Communicator::Wait
  std::atomic<uint64_t> collective_ns{0};    // collectives in flight (start to completion)
  std::atomic<uint64_t> idle_ns{0};          // between steps
  std::atomic<uint64_t> collectives{0};
};

// kStarting -> kLoaded (weights and activations allocated, `memory` filled in up to
// kv_budget_bytes) -> kReady (KV cache allocated, collectives joined, warmed up), or kFailed.
enum class RankState : uint32_t { kStarting = 0, kReady = 1, kFailed = 2, kLoaded = 3 };

struct alignas(64) RankSlot {
  std::atomic<uint64_t> heartbeat_ns{0};  // monotonic time of the last sign of life (own thread)
  std::atomic<uint64_t> progress_ns{0};   // the serving thread's last step or collective event
  std::atomic<uint32_t> state{0};         // RankState
  std::atomic<uint64_t> done_step{0};
  std::atomic<int32_t> heartbeat_tid{0};  // the heartbeat thread's kernel id (its /proc entry)
  RankStats stats;
  WorkerMemory memory;               // written before each state change (release), read after (acquire)
  char message[kMessageBytes] = {};  // why kFailed
};

struct Control {
  uint64_t magic = 0;
  uint32_t version = 0;
  uint32_t reserved = 0;
  Limits limits;
  KvSizing kv_sizing;                     // the KV budget policy (runtime/memory.h)
  std::atomic<int32_t> kv_blocks{0};      // 0 until the front-end has decided limits.num_kv_blocks
  std::atomic<uint32_t> plan_futex{0};    // bumped per published plan (workers wait on it)
  std::atomic<uint32_t> result_futex{0};  // bumped per published result (front-end waits on it)
  std::atomic<uint64_t> plan_step{0};     // the step the plan area holds
  char nccl_unique_id[128] = {};          // NCCL rendezvous (GPU workers)
  std::atomic<uint32_t> nccl_id_ready{0};
  RankSlot ranks[kMaxWorld];
};

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "shared-memory atomics must be lock-free to work across processes");

/// The object of type T at byte `offset` of a segment mapped at `base` (offsets from Layout).
template <typename T>
T* At(uint8_t* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}
template <typename T>
const T* At(const uint8_t* base, size_t offset) {
  return reinterpret_cast<const T*>(base + offset);
}

/// Byte offsets of each area in a segment for `limits` (every area 64-byte aligned).
struct Layout {
  size_t store, store_slots;
  size_t plan_header, plan_seqs, tokens, blocks, history;
  size_t result_header, result_seqs, prompt_logprobs;
  size_t total;
};

inline size_t AlignUp(size_t n, size_t a = 64) {
  return (n + a - 1) / a * a;
}

/// The largest step plan a multi-node group sends to a follower node in one message (bytes): the
/// follower's receive limit, and a bound the leader checks its Limits against (MaxPlanBytes) before
/// it starts, so a node never takes an unbounded message even from its authenticated leader.
inline constexpr int64_t kMaxNodePlanBytes = int64_t{256} << 20;

/// The bytes of the used parts of the largest plan `l` allows (header, sequences, tokens, block
/// ids, penalty history), before the message's own framing.
inline int64_t MaxPlanBytes(const Limits& l) {
  return static_cast<int64_t>(sizeof(PlanHeader)) + int64_t{l.max_seqs} * static_cast<int64_t>(sizeof(PlanSeq)) +
         4 * (int64_t{l.max_tokens} + int64_t{l.max_seqs} * l.max_blocks_per_seq + int64_t{l.max_history});
}

inline Layout ComputeLayout(const Limits& l) {
  Layout o{};
  size_t at = AlignUp(sizeof(Control), 4096);
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at = AlignUp(at + bytes);
    return here;
  };
  o.store_slots = StoreSlots(l.world_size);
  o.store = take(sizeof(StoreSlot) * o.store_slots);
  o.plan_header = take(sizeof(PlanHeader));
  o.plan_seqs = take(sizeof(PlanSeq) * static_cast<size_t>(l.max_seqs));
  o.tokens = take(sizeof(int32_t) * static_cast<size_t>(l.max_tokens));
  o.blocks = take(sizeof(int32_t) * static_cast<size_t>(l.max_seqs) * l.max_blocks_per_seq);
  o.history = take(sizeof(int32_t) * static_cast<size_t>(l.max_history));
  o.result_header = take(sizeof(ResultHeader));
  o.result_seqs = take(sizeof(ResultSeq) * static_cast<size_t>(l.max_seqs));
  o.prompt_logprobs = take(sizeof(PromptLogprob) * static_cast<size_t>(l.max_tokens));
  o.total = AlignUp(at, 4096);
  return o;
}

/// One sequence of a step as the front-end hands it over; PlanWriter encodes it as a PlanSeq.
struct SeqStep {
  uint64_t seq_id = 0;
  uint64_t kv_generation = 0;  // WorkerGroup::generation() when the sequence's KV cache was built
  std::span<const int32_t> tokens;
  int32_t start_pos = 0;
  std::span<const int32_t> block_table;
  bool sample = true;
  bool prompt_logprobs = false;  // score tokens[1..] and next_token (PromptLogprob)
  int32_t next_token = -1;       // with prompt_logprobs: the known token after `tokens`, or -1
  engine::SamplingParams sampling;
  int64_t draw_index = 0;
  std::span<const int32_t> history_prompt;  // only needed when penalties are on
  std::span<const int32_t> history_generated;
  std::span<const int32_t> banned;                // may not be sampled (min_tokens)
  std::span<const engine::TokenBias> logit_bias;  // added to the logits before sampling
};

/// Encodes step plans into a segment's plan area (the front-end's side of the codec).
class PlanWriter {
 public:
  PlanWriter(uint8_t* segment, const Layout& layout, const Limits& limits)
      : base_(segment), layout_(layout), limits_(limits) {}
  /// INVALID_ARGUMENT naming the sequence and the limit when `seqs` is empty, a sequence has no
  /// tokens or too long a block table, or the step's sequences, tokens or history tokens exceed
  /// the segment's limits. Nothing is written.
  Status Check(std::span<const SeqStep> seqs) const;
  /// Writes `seqs` (which passed Check) as the plan of step `step`.
  void Write(uint64_t step, std::span<const SeqStep> seqs);

 private:
  uint8_t* base_;
  Layout layout_;
  Limits limits_;
};

/// One sequence of a plan as a worker reads it: views into the segment.
struct PlannedSeq {
  const PlanSeq* plan = nullptr;
  std::span<const int32_t> tokens;
  std::span<const int32_t> block_table;
  engine::TokenHistory history;  // prompt, generated, banned, logit biases
};

/// Decodes the plan a segment holds (the workers' side of the codec). Every view is checked
/// against the plan's own array lengths and the segment's limits before it is handed out.
class PlanReader {
 public:
  PlanReader(const uint8_t* segment, const Layout& layout, const Limits& limits)
      : base_(segment), layout_(layout), limits_(limits) {}
  /// A copy of the plan header (the front-end may not write while workers read, but a copy
  /// keeps the sizes a worker checked the ones it uses).
  PlanHeader header() const;
  /// INVALID_ARGUMENT when `header` exceeds the limits or any sequence points outside the
  /// plan's arrays.
  Status Check(const PlanHeader& header) const;
  /// Sequence `i` of a plan that passed Check.
  PlannedSeq seq(const PlanHeader& header, int i) const;

 private:
  const uint8_t* base_;
  Layout layout_;
  Limits limits_;
};

}  // namespace kraken::runtime
