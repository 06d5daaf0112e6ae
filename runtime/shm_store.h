// A Gloo rendezvous store kept inside the dispatch segment, so that bringing up the workers'
// collectives needs no file, directory or port beyond Gloo's own sockets: nothing can be left
// behind, whatever way the server ends. Fixed slots of (key, value), claimed with atomics;
// readers poll until the keys they need appear or the timeout passes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <gloo/rendezvous/store.h>

namespace kraken::runtime {

/// One (key, value) slot of the store area.
struct StoreSlot {
  static constexpr size_t kKeyBytes = 128;
  static constexpr size_t kValueBytes = 32 * 1024;  // a rank's addresses for up to 64 peers fit
  std::atomic<uint32_t> state{0};                   // 0 free, 1 being written, 2 ready
  uint32_t key_len = 0;
  uint32_t value_len = 0;
  char key[kKeyBytes] = {};
  char value[kValueBytes] = {};
};

/// Slots a store for `world` ranks reserves (Gloo's full-mesh rendezvous sets one key per rank).
inline size_t StoreSlots(int world) {
  return 2 * static_cast<size_t>(world) + 8;
}

class ShmStore final : public gloo::rendezvous::Store {
 public:
  ShmStore(StoreSlot* slots, size_t count) : slots_(slots), count_(count) {}
  /// Throws gloo::EnforceNotMet-like std::runtime_error when full or a value is too large
  /// (Gloo's store interface reports errors by exceptions; the communicator catches them).
  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override { wait(keys, kDefaultTimeout); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override;
  /// Every complete (key, value) pair, in slot order (a multi-node group forwards them).
  std::vector<std::pair<std::string, std::vector<char>>> Entries() const;
  bool Has(const std::string& key) const { return Find(key) != nullptr; }

 private:
  const StoreSlot* Find(const std::string& key) const;
  StoreSlot* slots_;
  size_t count_;
};

}  // namespace kraken::runtime
