#include "scheduler/block_manager.h"

namespace kraken::scheduler {

BlockManager::BlockManager(int num_blocks, int block_size) : block_size_(block_size), refs_(num_blocks, 0) {
  KRAKEN_CHECK(num_blocks >= 1 && block_size >= 1, "BlockManager needs >= 1 block of >= 1 token");
  free_.reserve(num_blocks);
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
}

Status BlockManager::Allocate(int n, std::vector<int32_t>* table) {
  if (n < 0) return InvalidArgument("cannot allocate ", n, " blocks");
  if (n > num_free()) return ResourceExhausted("KV cache: ", n, " blocks needed, ", num_free(), " free");
  for (int i = 0; i < n; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    refs_[b] = 1;
    table->push_back(b);
  }
  return absl::OkStatus();
}

void BlockManager::Share(const std::vector<int32_t>& table) {
  for (int32_t b : table) ++refs_[b];
}

void BlockManager::Free(std::vector<int32_t>* table) {
  for (int32_t b : *table) {
    KRAKEN_CHECK(refs_[b] > 0, "freeing a block that is not allocated");
    if (--refs_[b] == 0) free_.push_back(b);
  }
  table->clear();
}

}  // namespace kraken::scheduler
