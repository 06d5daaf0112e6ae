#include "runtime/shm.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

namespace kraken::runtime {

StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::Create(size_t bytes) {
  const int fd = memfd_create("kraken-dispatch", MFD_CLOEXEC);
  if (fd < 0) return Internal("memfd_create failed: ", std::strerror(errno));
  std::unique_ptr<SharedSegment> s(new SharedSegment());
  s->fd_ = fd;
  // Reserve the pages now, so a shortage fails here with a message rather than as SIGBUS on
  // first touch in some worker.
  const int rc = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (rc != 0) {
    return ResourceExhausted("cannot reserve ", bytes,
                             " bytes of shared memory for the dispatch segment: ", std::strerror(rc));
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return Internal("mmap of the dispatch segment failed: ", std::strerror(errno));
  s->base_ = p;
  s->size_ = bytes;
  return s;
}

StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::FromFd(int fd, size_t bytes) {
  std::unique_ptr<SharedSegment> s(new SharedSegment());
  s->fd_ = fd;
  struct stat st {};
  if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != bytes) {
    return FailedPrecondition("dispatch segment (fd ", fd, ") is ", st.st_size, " bytes, expected ", bytes);
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return Internal("mmap of the dispatch segment failed: ", std::strerror(errno));
  s->base_ = p;
  s->size_ = bytes;
  return s;
}

SharedSegment::~SharedSegment() {
  if (base_ != nullptr) munmap(base_, size_);
  if (fd_ >= 0) ::close(fd_);
}

void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ns) {
  struct timespec ts {
    static_cast<time_t>(timeout_ns / 1000000000), static_cast<long>(timeout_ns % 1000000000)
  };
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void FutexWakeAll(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace kraken::runtime
