// Telling a hung worker from a starved host. A thread that has been silent because the host did
// not run it has not hung: it was runnable but waiting for a CPU (an oversubscribed host, or a
// container throttled by its cgroup CPU quota: the kernel counts both, per thread, as run-queue
// wait, /proc/PID/task/TID/schedstat field 2, Documentation/scheduler/sched-stats.rst), or it was
// waiting on the host itself in uninterruptible sleep (state 'D' in /proc/PID/task/TID/stat,
// proc(5): a page fault on a busy disk, memory reclaim). A SilenceClock charges a thread only the
// rest of its silence, the part the thread is to blame for; a stopped thread (SIGSTOP, state
// 'T') is charged in full.
//
//   SilenceClock clock;
//   uint64_t blamed = clock.Update(slot.heartbeat_ns, NowNs(), pid, tid);
//   if (blamed > timeout_ns) ...   // hung: the host gave it the time and it stayed silent
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace kraken::runtime {

/// What the kernel says of one thread. ok = false when it cannot be read (the thread is gone, or
/// no /proc): the caller then counts silence by the wall clock.
struct ThreadSched {
  bool ok = false;
  char state = '?';      // proc(5): R running, S sleeping, D uninterruptible, T stopped, t traced, Z zombie
  uint64_t run_ns = 0;   // nanoseconds on a CPU, since the thread began
  uint64_t wait_ns = 0;  // nanoseconds runnable but not running, since the thread began
};

/// Reads /proc/`pid`/task/`tid`/stat and .../schedstat.
ThreadSched ReadThreadSched(pid_t pid, pid_t tid);

/// How long one thread has been silent by its own fault, in nanoseconds of the monotonic clock
/// (NowNs). Update it with the thread's latest sign of life (a stamp taken with NowNs; 0 = none
/// yet) whenever the supervisor checks; a new stamp starts the count again. Each Update reads two
/// small /proc files (about 10 us): call it at most every few tens of milliseconds.
///
/// At the first sight of a stamp the kernel's account of the thread is taken as a baseline; from
/// then on the thread is excused the larger of two measures: the run-queue wait it accrued (the
/// kernel adds a wait when the wait ends, so this one lags by up to a scheduling period), and the
/// intervals between updates at whose end it was in uninterruptible sleep or, for a thread that
/// never computes for long (`runnable_is_waiting`: a heartbeat thread stamps and sleeps),
/// runnable, less the time it ran in them (a runnable thread that ran all along is spinning, not
/// waiting). A stopped thread is excused nothing. States are sampled, so updates should come at
/// least every 100 ms while the supervisor itself runs. At the first sight of an old stamp a
/// `runnable_is_waiting` thread that is runnable is taken to have waited since the stamp.
///
/// A third measure covers a freeze of the whole host or container (a cgroup CPU quota throttles
/// every thread of it at once, the supervisor's too): `judge_waited_ns` is the run-queue wait the
/// calling thread itself accrued since its previous Update (ReadThreadSched of itself; 0 when
/// unknown). Time the judge could not run is time it cannot blame on the thread, at first sight
/// of a stamp as later: a heartbeat thread seen asleep just after a freeze stamped before it and
/// slept through it. A stopped thread is not excused it either.
class SilenceClock {
 public:
  explicit SilenceClock(bool runnable_is_waiting = false) : runnable_is_waiting_(runnable_is_waiting) {}

  /// The silence charged to the thread at `now` since `mark`. Thread: one caller.
  uint64_t Update(uint64_t mark, uint64_t now, pid_t pid, pid_t tid, uint64_t judge_waited_ns = 0);
  /// Wall-clock time since the mark (ns).
  uint64_t wall_ns(uint64_t now) const { return now > mark_ ? now - mark_ : 0; }
  /// The thread's state at the last read ('?' when not read).
  char state() const { return state_; }
  /// "; the host kept it waiting 3200 ms of 4000" and the like, for a report; "" when the
  /// silence was charged by the wall clock alone.
  std::string Explain(uint64_t now) const;

 private:
  bool runnable_is_waiting_;
  bool started_ = false;
  uint64_t mark_ = 0;
  bool sampling_ = false;
  uint64_t start_ns_ = 0;       // the first read of this silence (the baseline)
  uint64_t initial_ns_ = 0;     // the silence charged by the clock before it
  uint64_t start_wait_ns_ = 0;  // the thread's run-queue wait then
  uint64_t wait_ns_ = 0;        // ... and at the last read
  uint64_t run_ns_ = 0;         // the thread's time on a CPU at the last read
  uint64_t checked_ns_ = 0;     // the last read
  uint64_t excused_by_state_ns_ = 0;
  uint64_t excused_by_judge_ns_ = 0;  // the judge's own run-queue wait since the baseline
  uint64_t blamed_ns_ = 0;
  char state_ = '?';
};

/// The run-queue wait the calling thread accrued since its previous call, in nanoseconds: how long
/// the host kept it from a CPU (an oversubscribed host, or its container's CPU quota). Reads
/// /proc/thread-self/schedstat (field 2, Documentation/scheduler/sched-stats.rst); 0 at the first
/// call and when it cannot be read. One object per thread.
class OwnWaitMeter {
 public:
  uint64_t Take();

 private:
  uint64_t last_ns_ = 0;  // 0: not read yet
};

/// How long a peer on another host may be silent before it is given up. Its scheduler cannot be
/// read from here, so the peer says with each message how long its sending thread was kept from a
/// CPU since its previous message (an OwnWaitMeter there): a host or container that froze it for
/// F ns lately may freeze it as long again. A silence is allowed
///
///   base + the longest freeze the peer reported in the last 30 to 60 s
///        + the judge's own run-queue wait since the peer's last message,
///
/// and never more than `ceiling` by the clock, whatever the reports say (a stopped peer is caught
/// within it). The first freeze of a peer that never reported one must fit in `base`.
/// Thread: one caller (the owner's lock).
class PeerSilence {
 public:
  PeerSilence(uint64_t base_ns, uint64_t ceiling_ns) : base_ns_(base_ns), ceiling_ns_(ceiling_ns) {}

  /// A message arrived at `now` (NowNs); `peer_waited_ns` is the wait the peer reported with it.
  void Heard(uint64_t now, uint64_t peer_waited_ns);
  /// The judge itself was kept from a CPU for `ns` (its OwnWaitMeter) since it last looked.
  void JudgeWaited(uint64_t ns) { judge_waited_ns_ += ns; }
  /// The judge did not listen for `ns` up to `now` (it waited on something of its own): that time
  /// is not the peer's silence at all, and the ceiling does not count it either.
  void NotListened(uint64_t ns, uint64_t now) {
    if (heard_ns_ != 0) heard_ns_ = std::min(now, heard_ns_ + ns);
  }
  /// Since the last message (ns); 0 before the first.
  uint64_t silent_ns(uint64_t now) const { return heard_ns_ != 0 && now > heard_ns_ ? now - heard_ns_ : 0; }
  /// The silence allowed now (ns), within [base, ceiling].
  uint64_t allowance_ns(uint64_t now) const;
  bool Expired(uint64_t now) const { return heard_ns_ != 0 && silent_ns(now) > allowance_ns(now); }
  /// "silent for 2300 ms (allowed 2000 ms, + 900 ms it reported frozen lately, + 0 ms this
  /// judge was kept waiting)", for a report.
  std::string Explain(uint64_t now) const;

 private:
  static constexpr uint64_t kWindowNs = 30'000'000'000;  // evidence is kept one to two windows
  uint64_t evidence_ns(uint64_t now) const;

  uint64_t base_ns_, ceiling_ns_;
  uint64_t heard_ns_ = 0;
  uint64_t judge_waited_ns_ = 0;  // since heard_ns_
  uint64_t window_start_ns_ = 0;
  uint64_t window_max_ns_ = 0;    // the longest freeze reported in the current window
  uint64_t previous_max_ns_ = 0;  // ... and in the one before
};

}  // namespace kraken::runtime
