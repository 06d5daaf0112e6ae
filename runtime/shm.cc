#include "runtime/shm.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>

namespace kraken::runtime {

StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::Create(const std::string& name, size_t bytes) {
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) return absl::AlreadyExistsError(StrCat("shared memory '", name, "' already exists"));
    return Internal("shm_open('", name, "') failed: ", std::strerror(errno));
  }
  std::unique_ptr<SharedSegment> s(new SharedSegment());
  s->name_ = name;
  s->owner_ = true;
  // posix_fallocate reserves the pages now, so a too-small /dev/shm fails here with ENOSPC
  // instead of a SIGBUS on first touch later.
  const int rc = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (rc != 0) {
    ::close(fd);
    s->Unlink();
    return ResourceExhausted("cannot reserve ", bytes, " bytes of shared memory for '", name, "' (",
                             std::strerror(rc), "); /dev/shm has ", ShmFreeBytes(),
                             " bytes free — raise its size (Docker: --shm-size; Kubernetes: a memory-backed "
                             "emptyDir at /dev/shm)");
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) {
    s->Unlink();
    return Internal("mmap of shared memory '", name, "' failed: ", std::strerror(errno));
  }
  s->base_ = p;
  s->size_ = bytes;
  return s;
}

StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::Open(const std::string& name, size_t bytes) {
  const int fd = shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) return NotFound("cannot open shared memory '", name, "': ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != bytes) {
    ::close(fd);
    return FailedPrecondition("shared memory '", name, "' is ", st.st_size, " bytes, expected ", bytes);
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) return Internal("mmap of shared memory '", name, "' failed: ", std::strerror(errno));
  std::unique_ptr<SharedSegment> s(new SharedSegment());
  s->name_ = name;
  s->base_ = p;
  s->size_ = bytes;
  return s;
}

SharedSegment::~SharedSegment() {
  if (base_ != nullptr) munmap(base_, size_);
  if (owner_) Unlink();
}

void SharedSegment::Unlink() {
  if (unlinked_) return;
  shm_unlink(name_.c_str());
  unlinked_ = true;
}

std::string UniqueSegmentName() {
  std::random_device rd;
  const uint64_t r = (static_cast<uint64_t>(rd()) << 32) | rd();
  char buf[64];
  std::snprintf(buf, sizeof buf, "/kraken-%d-%016llx", static_cast<int>(getpid()), static_cast<unsigned long long>(r));
  return buf;
}

uint64_t ShmFreeBytes() {
  struct statvfs v {};
  if (statvfs("/dev/shm", &v) != 0) return 0;
  return static_cast<uint64_t>(v.f_bavail) * v.f_frsize;
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
