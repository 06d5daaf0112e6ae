// The paged KV cache's allocator on the front-end side: which physical blocks of the workers'
// pools belong to which sequence. Every worker has a pool of the same size and uses the same block
// ids, so one allocator serves them all. Blocks are reference counted so that a block can later be
// shared between sequences (a common prefix); a block returns to the free list when its count
// drops to zero. Allocation is all-or-nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"

namespace kraken::scheduler {

class BlockManager {
 public:
  /// `num_blocks` blocks of `block_size` tokens each. Both must be >= 1.
  BlockManager(int num_blocks, int block_size);

  int num_blocks() const { return static_cast<int>(refs_.size()); }
  int block_size() const { return block_size_; }
  int num_free() const { return static_cast<int>(free_.size()); }
  /// Blocks needed to hold `tokens` tokens.
  int BlocksFor(int64_t tokens) const { return static_cast<int>((tokens + block_size_ - 1) / block_size_); }
  /// Fraction of blocks in use, [0, 1].
  double usage() const { return 1.0 - static_cast<double>(num_free()) / num_blocks(); }

  /// Appends `n` fresh blocks (reference count 1) to `*table`. RESOURCE_EXHAUSTED (nothing taken)
  /// when fewer than `n` are free.
  Status Allocate(int n, std::vector<int32_t>* table);
  /// Adds a reference to every block of `table` (sharing).
  void Share(const std::vector<int32_t>& table);
  /// Drops one reference to each block of `*table` and clears it.
  void Free(std::vector<int32_t>* table);
  int RefCount(int32_t block) const { return refs_[block]; }

 private:
  int block_size_;
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
};

}  // namespace kraken::scheduler
