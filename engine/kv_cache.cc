#include "engine/kv_cache.h"

#include <cstddef>

namespace kraken::engine {

namespace {

// Product of positive factors, or -1 if it exceeds 2^62.
int64_t CheckedProduct(std::initializer_list<int64_t> factors) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (f < 0 || __builtin_mul_overflow(p, f, &p) || p > (int64_t{1} << 62)) return -1;
  }
  return p;
}

}  // namespace

int64_t KvCache::BytesPerBlock(const KvLayout& layout, int block_size, DType dtype) {
  return CheckedProduct(
      {2, layout.slots, layout.heads, layout.head_dim, block_size, static_cast<int64_t>(DTypeSize(dtype))});
}

StatusOr<KvCache> KvCache::Create(Backend& backend, const KvLayout& layout, const KvCacheOptions& options) {
  if (options.num_blocks <= 0) return InvalidArgument("KV cache 'num_blocks' must be > 0, got ", options.num_blocks);
  if (options.block_size <= 0 || options.block_size > 1024) {
    return InvalidArgument("KV cache 'block_size' must be in [1, 1024], got ", options.block_size);
  }
  if (layout.slots <= 0 || layout.heads <= 0 || layout.head_dim <= 0) {
    return InvalidArgument("KV layout must have positive slots, heads and head_dim");
  }
  if (!IsComputeFloat(options.dtype)) {
    return InvalidArgument("KV cache 'dtype' must be F32, BF16 or F16, got ", DTypeName(options.dtype));
  }
  const int64_t bytes = CheckedProduct({layout.slots, options.num_blocks, layout.heads, layout.head_dim,
                                        options.block_size, static_cast<int64_t>(DTypeSize(options.dtype))});
  if (bytes < 0) {
    return ResourceExhausted("KV cache of ", options.num_blocks, " blocks of ", options.block_size, " tokens for ",
                             layout.slots, " slots x ", layout.heads, " heads x ", layout.head_dim,
                             " elements is too large to address");
  }
  KvCache c;
  c.layout_ = layout;
  c.options_ = options;
  // Buffers count floats: a 16-bit pool takes half as many, rounded up.
  const int64_t floats = (bytes + 3) / 4;
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
  s.dtype = options_.dtype;
  const int64_t slot_bytes = s.block_elems() * options_.num_blocks * static_cast<int64_t>(DTypeSize(s.dtype));
  s.k = reinterpret_cast<std::byte*>(k_.data()) + i * slot_bytes;
  s.v = reinterpret_cast<std::byte*>(v_.data()) + i * slot_bytes;
  return s;
}

}  // namespace kraken::engine
