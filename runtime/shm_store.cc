#include "runtime/shm_store.h"

#include <cstring>
#include <stdexcept>
#include <thread>

namespace kraken::runtime {

void ShmStore::set(const std::string& key, const std::vector<char>& data) {
  if (key.size() > StoreSlot::kKeyBytes || data.size() > StoreSlot::kValueBytes) {
    throw std::runtime_error("rendezvous store: key '" + key + "' or its value is too large");
  }
  for (size_t i = 0; i < count_; ++i) {
    uint32_t expected = 0;
    if (slots_[i].state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      StoreSlot& s = slots_[i];
      std::memcpy(s.key, key.data(), key.size());
      s.key_len = static_cast<uint32_t>(key.size());
      std::memcpy(s.value, data.data(), data.size());
      s.value_len = static_cast<uint32_t>(data.size());
      s.state.store(2, std::memory_order_release);
      return;
    }
  }
  throw std::runtime_error("rendezvous store is full");
}

const StoreSlot* ShmStore::Find(const std::string& key) const {
  for (size_t i = 0; i < count_; ++i) {
    const StoreSlot& s = slots_[i];
    if (s.state.load(std::memory_order_acquire) == 2 && s.key_len == key.size() &&
        std::memcmp(s.key, key.data(), key.size()) == 0) {
      return &s;
    }
  }
  return nullptr;
}

std::vector<std::pair<std::string, std::vector<char>>> ShmStore::Entries() const {
  std::vector<std::pair<std::string, std::vector<char>>> out;
  for (size_t i = 0; i < count_; ++i) {
    const StoreSlot& s = slots_[i];
    if (s.state.load(std::memory_order_acquire) != 2) continue;
    out.emplace_back(std::string(s.key, s.key_len), std::vector<char>(s.value, s.value + s.value_len));
  }
  return out;
}

std::vector<char> ShmStore::get(const std::string& key) {
  wait({key});
  const StoreSlot* s = Find(key);
  return std::vector<char>(s->value, s->value + s->value_len);
}

void ShmStore::wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    bool all = true;
    for (const std::string& k : keys) all = all && Find(k) != nullptr;
    if (all) return;
    if (std::chrono::steady_clock::now() > deadline) {
      throw std::runtime_error("rendezvous store: timed out waiting for peers' keys");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

}  // namespace kraken::runtime
