#include "scheduler/block_manager.h"

#include <algorithm>

namespace kraken::scheduler {

size_t BlockManager::KeyHash::operator()(const Key& k) const {
  // splitmix64's finalizer over the parent id and each token: well mixed, and only a bucket
  // choice (keys are compared exactly).
  auto mix = [](uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  };
  uint64_t h = mix(k.parent + 0x9e3779b97f4a7c15ULL);
  for (int32_t t : k.tokens) h = mix(h ^ static_cast<uint32_t>(t));
  return static_cast<size_t>(h);
}

BlockManager::BlockManager(int num_blocks, int block_size, bool prefix_caching)
    : block_size_(block_size), prefix_caching_(prefix_caching), refs_(num_blocks, 0) {
  KRAKEN_CHECK(num_blocks >= 1 && block_size >= 1, "BlockManager needs >= 1 block of >= 1 token");
  free_.reserve(num_blocks);
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
  entry_of_.resize(num_blocks);
  // Never more entries than blocks: no insertion rehashes, so the iterators in entry_of_ stay valid.
  entries_.reserve(static_cast<size_t>(num_blocks));
}

void BlockManager::SetKey(uint64_t parent, std::span<const int32_t> tokens, int64_t block, Key* key) const {
  key->parent = parent;
  key->tokens.assign(tokens.begin() + block * block_size_, tokens.begin() + (block + 1) * block_size_);
}

void BlockManager::Uncache(int32_t block) {
  Entry& e = entry_of_[block];
  if (e.id == 0) return;
  entries_.erase(e.where);
  if (refs_[block] == 0) {
    evictable_.erase(e.lru);
    free_.push_back(block);
  }
  e = Entry{};
}

Status BlockManager::Allocate(int n, std::vector<int32_t>* table) {
  if (n < 0) return InvalidArgument("cannot allocate ", n, " blocks");
  if (n > num_free()) return ResourceExhausted("KV cache: ", n, " blocks needed, ", num_free(), " free");
  for (int i = 0; i < n; ++i) {
    if (free_.empty()) Uncache(evictable_.front());  // moves it to free_
    const int32_t b = free_.back();
    free_.pop_back();
    refs_[b] = 1;
    table->push_back(b);
  }
  return absl::OkStatus();
}

void BlockManager::Share(const std::vector<int32_t>& table) {
  for (int32_t b : table) {
    if (refs_[b]++ == 0) {
      KRAKEN_CHECK(entry_of_[b].id != 0, "sharing a free block that is not cached");
      evictable_.erase(entry_of_[b].lru);
    }
  }
}

void BlockManager::Free(std::vector<int32_t>* table) {
  for (auto it = table->rbegin(); it != table->rend(); ++it) {
    const int32_t b = *it;
    KRAKEN_CHECK(refs_[b] > 0, "freeing a block that is not allocated");
    if (--refs_[b] > 0) continue;
    if (entry_of_[b].id != 0) {
      entry_of_[b].lru = evictable_.insert(evictable_.end(), b);
    } else {
      free_.push_back(b);
    }
  }
  table->clear();
}

BlockManager::Chain BlockManager::MatchPrefix(std::span<const int32_t> tokens, int max_blocks,
                                              std::vector<int32_t>* blocks) const {
  blocks->clear();
  Chain chain;
  if (!prefix_caching_) return chain;
  const int64_t full = static_cast<int64_t>(tokens.size()) / block_size_;
  Key key;
  for (int64_t i = 0; i < full && i < max_blocks; ++i) {
    SetKey(chain.parent, tokens, i, &key);
    auto it = entries_.find(key);
    if (it == entries_.end()) break;
    blocks->push_back(it->second);
    chain.parent = entry_of_[it->second].id;
    ++chain.blocks;
  }
  return chain;
}

void BlockManager::CacheFullBlocks(std::span<const int32_t> tokens, int64_t num_computed,
                                   const std::vector<int32_t>& table, Chain* chain) {
  if (!prefix_caching_) return;
  const int64_t full = std::min<int64_t>(num_computed / block_size_, static_cast<int64_t>(table.size()));
  Key key;
  for (int64_t i = chain->blocks; i < full; ++i) {
    const int32_t b = table[i];
    if (entry_of_[b].id != 0) {  // a block this sequence got from the cache
      chain->parent = entry_of_[b].id;
      chain->blocks = static_cast<int32_t>(i + 1);
      continue;
    }
    SetKey(chain->parent, tokens, i, &key);
    auto [it, inserted] = entries_.try_emplace(key, b);
    if (inserted) {
      entry_of_[b].id = next_id_++;
      entry_of_[b].where = it;
    }
    chain->parent = entry_of_[it->second].id;
    chain->blocks = static_cast<int32_t>(i + 1);
  }
}

void BlockManager::ResetPrefixCache() {
  for (int32_t b = 0; b < num_blocks(); ++b) Uncache(b);
}

}  // namespace kraken::scheduler
