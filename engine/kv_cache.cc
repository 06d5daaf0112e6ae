#include "engine/kv_cache.h"

namespace kraken::engine {

int64_t KvCache::BytesPerBlock(const KvLayout& layout, int block_size) {
  return 2 * static_cast<int64_t>(layout.slots) * layout.heads * layout.head_dim * block_size *
         static_cast<int64_t>(sizeof(float));
}

StatusOr<KvCache> KvCache::Create(Backend& backend, const KvLayout& layout, const KvCacheOptions& options) {
  if (options.num_blocks <= 0) return InvalidArgument("KV cache 'num_blocks' must be > 0, got ", options.num_blocks);
  if (options.block_size <= 0 || options.block_size > 1024) {
    return InvalidArgument("KV cache 'block_size' must be in [1, 1024], got ", options.block_size);
  }
  if (layout.slots <= 0 || layout.heads <= 0 || layout.head_dim <= 0) {
    return InvalidArgument("KV layout must have positive slots, heads and head_dim");
  }
  KvCache c;
  c.layout_ = layout;
  c.options_ = options;
  const int64_t floats = static_cast<int64_t>(layout.slots) * options.num_blocks * layout.heads *
                         layout.head_dim * options.block_size;
  KRAKEN_ASSIGN_OR_RETURN(c.k_, backend.Allocate(floats));
  KRAKEN_ASSIGN_OR_RETURN(c.v_, backend.Allocate(floats));
  return c;
}

KvSlot KvCache::slot(int i) const {
  KRAKEN_CHECK(i >= 0 && i < layout_.slots, "KV slot index out of range");
  KvSlot s;
  s.heads = layout_.heads;
  s.head_dim = layout_.head_dim;
  s.block_size = options_.block_size;
  s.num_blocks = options_.num_blocks;
  const int64_t per_slot = s.block_floats() * options_.num_blocks;
  s.k = k_.data() + i * per_slot;
  s.v = v_.data() + i * per_slot;
  return s;
}

}  // namespace kraken::engine
