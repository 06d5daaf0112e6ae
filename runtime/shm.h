// POSIX shared-memory segments and process-shared futex wake-ups for the dispatch channel.
//
//   KRAKEN_ASSIGN_OR_RETURN(auto seg, SharedSegment::Create(UniqueSegmentName(), bytes));  // front-end
//   KRAKEN_ASSIGN_OR_RETURN(auto seg, SharedSegment::Open(name, bytes));                   // worker
//   seg->Unlink();   // the name goes away; mappings stay valid until every process unmaps
//
// Segments are created with O_EXCL and mode 0600; the front-end unlinks the name as soon as every
// worker has mapped it (and on every exit path before that), so nothing is left in /dev/shm.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "engine/status.h"

namespace kraken::runtime {

class SharedSegment {
 public:
  /// Creates and maps a new segment of `bytes` (zero-filled). ALREADY_EXISTS if the name is taken,
  /// RESOURCE_EXHAUSTED when /dev/shm cannot hold it (the message says how much was asked).
  static StatusOr<std::unique_ptr<SharedSegment>> Create(const std::string& name, size_t bytes);
  /// Maps an existing segment, which must be exactly `bytes` long.
  static StatusOr<std::unique_ptr<SharedSegment>> Open(const std::string& name, size_t bytes);
  ~SharedSegment();
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  /// Removes the name (idempotent). Creators also do this in the destructor.
  void Unlink();
  uint8_t* data() const { return static_cast<uint8_t*>(base_); }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }

 private:
  SharedSegment() = default;
  std::string name_;
  void* base_ = nullptr;
  size_t size_ = 0;
  bool owner_ = false;
  bool unlinked_ = false;
};

/// "/kraken-<pid>-<random hex>": unique per server process.
std::string UniqueSegmentName();

/// Free bytes of the file system behind /dev/shm (0 if it cannot be read).
uint64_t ShmFreeBytes();

/// Blocks while *word == expected, up to `timeout_ns` (process-shared futex). Returns early on a
/// wake-up, a change, a signal or the timeout; callers re-check their condition.
void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ns);
/// Wakes every waiter on *word.
void FutexWakeAll(std::atomic<uint32_t>* word);

/// Monotonic clock in nanoseconds.
uint64_t NowNs();

}  // namespace kraken::runtime
