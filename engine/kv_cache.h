// The paged KV cache of one model shard: `num_blocks` physical blocks of `block_size` tokens,
// shared by every attention slot (a layer, or a layer's Kraken sub-layer). A sequence owns a list
// of block ids (its block table); the same block id addresses the same token range in every slot.
//
//   KvLayout layout = model->kv_layout();                  // slots, heads, head_dim
//   KRAKEN_ASSIGN_OR_RETURN(KvCache kv, KvCache::Create(*backend, layout, {.num_blocks = 512}));
//   KvSlot slot = kv.slot(3);
//
// Size: 2 (K and V) * slots * heads * head_dim * block_size * DTypeSize(dtype) bytes per block.
// For a Kraken layer that is 2 * d elements per token per sub-layer (docs/kraken.md "KV cache").
#pragma once

#include <cstdint>

#include "base/status.h"
#include "engine/backend.h"

namespace kraken::engine {

/// What a model shard needs per cached token.
struct KvLayout {
  int slots = 0;     // attention blocks held by this shard
  int heads = 0;     // heads per slot on this shard
  int head_dim = 0;  // floats per head
};

struct KvCacheOptions {
  int num_blocks = 0;
  int block_size = 16;        // tokens per block
  DType dtype = DType::kF32;  // element type: F32, BF16 or F16
};

class KvCache {
 public:
  /// Allocates the pool (zeroed). INVALID_ARGUMENT for non-positive sizes or a dtype other than
  /// F32/BF16/F16; RESOURCE_EXHAUSTED when the backend cannot allocate it.
  static StatusOr<KvCache> Create(Backend& backend, const KvLayout& layout, const KvCacheOptions& options);

  /// Bytes one block takes across all slots of `layout` with `dtype` elements (-1 past 2^62).
  static int64_t BytesPerBlock(const KvLayout& layout, int block_size, DType dtype);

  /// The pool of attention slot `i` in [0, layout().slots) (a programmer error otherwise): slot i's
  /// K and V start i * num_blocks * block_elems elements into the pools.
  KvSlot slot(int i) const;
  int num_blocks() const { return options_.num_blocks; }
  int block_size() const { return options_.block_size; }
  /// Element type of K and V: F32, BF16 or F16.
  DType dtype() const { return options_.dtype; }
  const KvLayout& layout() const { return layout_; }
  int64_t bytes() const { return BytesPerBlock(layout_, options_.block_size, options_.dtype) * options_.num_blocks; }

 private:
  KvLayout layout_;
  KvCacheOptions options_;
  Buffer k_, v_;
};

}  // namespace kraken::engine
