// The paged KV cache's allocator on the front-end side: which physical blocks of the workers'
// pools belong to which sequence. Every worker has a pool of the same size and uses the same block
// ids, so one allocator serves them all. Blocks are reference counted: a block shared by several
// sequences (a common prefix) returns to the pool when its last holder frees it. Allocation is
// all-or-nothing.
//
// Prefix caching (automatic, as vLLM's "automatic prefix caching"): a *full* block whose K/V have
// been computed can be registered under a key made of its tokens and the key of the block before
// it, so a key stands for the whole prefix up to the block's end. Registered blocks outlive their
// sequences: at reference count zero they stay in the cache, reusable by the next request that
// starts with the same tokens, until an allocation needs them (least recently freed first).
// Keys are compared exactly (tokens, and the parent entry's unique id), never by hash alone, so a
// hit always holds the K/V the same tokens at the same positions produce. Partial blocks are never
// registered: a sequence keeps writing into its last block.
//
// The K/V in a block depend on the model, its weights and the KV dtype too; those are fixed for the
// life of the pools, and ResetPrefixCache() forgets every entry when the pools are lost (a worker
// restart), so an entry never outlives what its K/V were computed with.
#pragma once

#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/status.h"

namespace kraken::scheduler {

class BlockManager {
 public:
  /// `num_blocks` blocks of `block_size` tokens each. Both must be >= 1. With `prefix_caching`
  /// false, CacheFullBlocks registers nothing and MatchPrefix finds nothing.
  BlockManager(int num_blocks, int block_size, bool prefix_caching = false);

  int num_blocks() const { return static_cast<int>(refs_.size()); }
  int block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  /// Blocks Allocate can hand out: never used, or cached with no holder (evicted on demand).
  int num_free() const { return static_cast<int>(free_.size() + evictable_.size()); }
  /// Cached blocks with no holder (a subset of num_free()).
  int num_evictable() const { return static_cast<int>(evictable_.size()); }
  /// Blocks registered in the prefix cache, held or not.
  int num_cached() const { return static_cast<int>(entries_.size()); }
  /// Blocks needed to hold `tokens` tokens.
  int BlocksFor(int64_t tokens) const { return static_cast<int>((tokens + block_size_ - 1) / block_size_); }
  /// Fraction of blocks held by sequences, [0, 1] (cached blocks without a holder count as free).
  double usage() const { return 1.0 - static_cast<double>(num_free()) / num_blocks(); }

  /// Appends `n` blocks (reference count 1) to `*table`: never-used blocks first, then the least
  /// recently freed cached blocks, whose cache entries are dropped. RESOURCE_EXHAUSTED (nothing
  /// taken) when fewer than `n` are free.
  Status Allocate(int n, std::vector<int32_t>* table);
  /// Adds a reference to every block of `table` (sharing); a cached block without a holder leaves
  /// the eviction order.
  void Share(const std::vector<int32_t>& table);
  /// Drops one reference to each block of `*table` and clears it. Blocks that reach zero go back
  /// to the pool, the table's last block first, so a prefix's tail is evicted before its head.
  void Free(std::vector<int32_t>* table);
  int RefCount(int32_t block) const { return refs_[block]; }

  /// Where a sequence's registration has got to: its first `blocks` blocks are known to the cache,
  /// and `parent` is the entry id the next block's key continues from (0: the start of a prompt).
  struct Chain {
    int32_t blocks = 0;
    uint64_t parent = 0;
  };
  /// The longest run of cached blocks holding `tokens` from position 0, at most `max_blocks`
  /// blocks; their ids go to `*blocks` (cleared first) and the returned chain continues after
  /// them. Takes no reference (Share does). Marks nothing as used.
  Chain MatchPrefix(std::span<const int32_t> tokens, int max_blocks, std::vector<int32_t>* blocks) const;
  /// Registers the full blocks of `table` covering `tokens[0, num_computed)` that `*chain` has not
  /// yet reached, and advances it. A block whose key is already cached (the same prefix computed
  /// by another sequence at the same time) stays private; the chain follows the cached entry.
  /// `tokens` must be the sequence's tokens; the K/V of the first `num_computed` must be computed.
  void CacheFullBlocks(std::span<const int32_t> tokens, int64_t num_computed, const std::vector<int32_t>& table,
                       Chain* chain);
  /// Forgets every cache entry (the workers' pools were lost). Held blocks stay held.
  void ResetPrefixCache();

 private:
  struct Key {
    uint64_t parent = 0;
    std::vector<int32_t> tokens;  // block_size of them
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const;
  };
  struct Entry {
    uint64_t id = 0;                                            // unique for the life of the manager, never 0
    std::list<int32_t>::iterator lru;                           // in evictable_ while unheld
    std::unordered_map<Key, int32_t, KeyHash>::iterator where;  // valid: entries_ never rehashes
  };
  void Uncache(int32_t block);
  // The key of block `block` of `tokens` (its block_size tokens) after the entry `parent`.
  void SetKey(uint64_t parent, std::span<const int32_t> tokens, int64_t block, Key* key) const;

  int block_size_;
  bool prefix_caching_;
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;                          // never used or uncached: a stack, the last freed reused first
  std::list<int32_t> evictable_;                       // cached, unheld: least recently freed at the front
  std::vector<Entry> entry_of_;                        // per block; id 0 when the block is not cached
  std::unordered_map<Key, int32_t, KeyHash> entries_;  // key -> block
  uint64_t next_id_ = 1;
};

}  // namespace kraken::scheduler
