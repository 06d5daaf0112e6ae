// What one forward step computes: a mix of sequences, each adding a chunk of new tokens (a prompt,
// part of a long prompt, or one decode token) on top of what its KV cache already holds.
//
//   int32_t prompt[] = {5, 17, 9};
//   int32_t blocks[] = {3, 0};                  // physical KV blocks of this sequence, in order
//   SequenceInput s{.tokens = prompt, .start_pos = 0, .block_table = blocks};
//   ForwardBatch batch{.seqs = {&s, 1}};
#pragma once

#include <cstdint>
#include <span>

namespace kraken::engine {

/// One sequence's share of a step. Positions of the new tokens are start_pos .. start_pos + n - 1.
struct SequenceInput {
  std::span<const int32_t> tokens;       // n >= 1 new token ids, each in [0, V)
  int32_t start_pos = 0;                 // tokens of this sequence already in the KV cache
  std::span<const int32_t> block_table;  // physical block of logical block j (positions j*bs ..)
  bool all_logits = false;               // logits for every new token, not only the last
};

/// The sequences of one step; the caller owns everything the spans point to.
struct ForwardBatch {
  std::span<const SequenceInput> seqs;
};

/// A sequence as the attention kernels see it: rows token_begin .. token_begin + num_tokens - 1 of
/// the step's activations, at positions start_pos .. start_pos + num_tokens - 1.
struct AttentionSeq {
  int32_t token_begin = 0;
  int32_t num_tokens = 0;
  int32_t start_pos = 0;
  const int32_t* block_table = nullptr;
};

/// All sequences of a step plus the KV block size (tokens per block).
struct AttentionBatch {
  std::span<const AttentionSeq> seqs;
  int block_size = 16;
};

}  // namespace kraken::engine
