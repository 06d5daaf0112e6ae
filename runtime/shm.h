// Shared-memory segments and process-shared futex wake-ups for the dispatch channel.
//
//   KRAKEN_ASSIGN_OR_RETURN(auto seg, SharedSegment::Create(bytes));          // front-end
//   ... the child receives seg->fd() as a file descriptor (posix_spawn dup2) ...
//   KRAKEN_ASSIGN_OR_RETURN(auto seg, SharedSegment::FromFd(fd, bytes));      // worker
//
// Segments are anonymous (memfd_create): they have no name in any file system, so none can be
// left behind however the processes end; the memory goes away with the last mapping.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "base/status.h"

namespace kraken::runtime {

class SharedSegment {
 public:
  /// Creates and maps a new anonymous segment of `bytes` (zero-filled, pages reserved now).
  /// RESOURCE_EXHAUSTED when the memory cannot be reserved (the message says how much).
  static StatusOr<std::unique_ptr<SharedSegment>> Create(size_t bytes);
  /// Maps the segment behind an inherited descriptor (taking ownership of `fd`); it must be
  /// exactly `bytes` long.
  static StatusOr<std::unique_ptr<SharedSegment>> FromFd(int fd, size_t bytes);
  ~SharedSegment();
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(base_); }
  size_t size() const { return size_; }
  /// The descriptor (close-on-exec) to hand to child processes.
  int fd() const { return fd_; }

 private:
  SharedSegment() = default;
  int fd_ = -1;
  void* base_ = nullptr;
  size_t size_ = 0;
};

/// Blocks while *word == expected, up to `timeout_ns` (process-shared futex). Returns early on a
/// wake-up, a change, a signal or the timeout; callers re-check their condition.
void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ns);
/// Wakes every waiter on *word.
void FutexWakeAll(std::atomic<uint32_t>* word);

/// Monotonic clock in nanoseconds.
uint64_t NowNs();

}  // namespace kraken::runtime
