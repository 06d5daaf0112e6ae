#include "runtime/liveness.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "base/status.h"

namespace kraken::runtime {
namespace {

// The whole of a small /proc file, or "" when it cannot be read.
std::string ReadSmall(const char* path) {
  std::string out;
  if (FILE* f = std::fopen(path, "re")) {
    char buf[512];
    const size_t n = std::fread(buf, 1, sizeof buf, f);
    out.assign(buf, n);
    std::fclose(f);
  }
  return out;
}

// A thread's schedstat: nanoseconds it ran and waited runnable for a CPU. False when unreadable.
bool ReadSchedstat(const char* path, uint64_t* run_ns, uint64_t* wait_ns) {
  unsigned long long run = 0, wait = 0;
  if (std::sscanf(ReadSmall(path).c_str(), "%llu %llu", &run, &wait) != 2) return false;
  *run_ns = run;
  *wait_ns = wait;
  return true;
}

}  // namespace

ThreadSched ReadThreadSched(pid_t pid, pid_t tid) {
  ThreadSched t;
  char path[96];
  std::snprintf(path, sizeof path, "/proc/%d/task/%d/stat", static_cast<int>(pid), static_cast<int>(tid));
  const std::string stat = ReadSmall(path);
  // "tid (comm) S ...": the command may hold spaces and parentheses, so the state follows the
  // last ')'.
  const size_t close = stat.rfind(')');
  if (close == std::string::npos || close + 2 >= stat.size()) return t;
  t.state = stat[close + 2];
  std::snprintf(path, sizeof path, "/proc/%d/task/%d/schedstat", static_cast<int>(pid), static_cast<int>(tid));
  t.ok = ReadSchedstat(path, &t.run_ns, &t.wait_ns);
  return t;
}

uint64_t SilenceClock::Update(uint64_t mark, uint64_t now, pid_t pid, pid_t tid, uint64_t judge_waited_ns) {
  auto excused_state = [this](char state) { return state == 'D' || (runnable_is_waiting_ && state == 'R'); };
  auto stopped = [](char state) { return state == 'T' || state == 't'; };
  if (mark != mark_ || !started_) {
    // A new silence: the kernel's account of the thread now is its baseline. The time between the
    // mark and this first sight is charged by the clock, unless the thread is waiting on the host
    // right now (a heartbeat thread runnable at first sight of an old mark has been kept waiting:
    // it only stamps and sleeps).
    mark_ = mark;
    started_ = true;
    sampling_ = false;
    state_ = '?';
    blamed_ns_ = wall_ns(now);
    if (pid <= 0) return blamed_ns_;
    const ThreadSched t = ReadThreadSched(pid, tid);
    if (!t.ok) return blamed_ns_;
    sampling_ = true;
    // A stamp taken after the judge read its clock (the judge was frozen in between, as a quota
    // freezes every thread of a container and thaws them in any order) starts the silence at the
    // stamp, not before it.
    start_ns_ = checked_ns_ = std::max(now, mark);
    // The part of the silence the judge itself spent waiting for a CPU is not the thread's fault.
    const uint64_t judge = stopped(t.state) ? 0 : std::min(judge_waited_ns, wall_ns(now));
    initial_ns_ = blamed_ns_ = excused_state(t.state) ? 0 : wall_ns(now) - judge;
    excused_by_judge_ns_ = 0;
    start_wait_ns_ = wait_ns_ = t.wait_ns;
    run_ns_ = t.run_ns;
    excused_by_state_ns_ = 0;
    state_ = t.state;
    return blamed_ns_;
  }
  if (!sampling_) return blamed_ns_ = wall_ns(now);
  const ThreadSched t = ReadThreadSched(pid, tid);
  const uint64_t interval = now > checked_ns_ ? now - checked_ns_ : 0;
  checked_ns_ = now;
  if (t.ok) {
    state_ = t.state;
    wait_ns_ = std::max(wait_ns_, t.wait_ns);
    const uint64_t ran = t.run_ns > run_ns_ ? t.run_ns - run_ns_ : 0;
    run_ns_ = std::max(run_ns_, t.run_ns);
    if (excused_state(t.state)) excused_by_state_ns_ += interval > ran ? interval - ran : 0;
    if (stopped(t.state)) {
      excused_by_judge_ns_ = 0;
    } else {
      excused_by_judge_ns_ += std::min(judge_waited_ns, interval);
    }
  }
  const uint64_t excused = std::max({excused_by_state_ns_, wait_ns_ - start_wait_ns_, excused_by_judge_ns_});
  const uint64_t elapsed = now > start_ns_ ? now - start_ns_ : 0;
  // Never more than the silence itself.
  blamed_ns_ = std::min(wall_ns(now), initial_ns_ + (elapsed > excused ? elapsed - excused : 0));
  return blamed_ns_;
}

std::string SilenceClock::Explain(uint64_t now) const {
  if (!sampling_) return "";
  const std::string state = state_ == 'T' || state_ == 't' ? "stopped"
                            : state_ == 'D'                ? "waiting on the host's I/O"
                            : state_ == 'R'                ? "running"
                            : state_ == 'S'                ? "sleeping"
                                                           : StrCat("in state ", std::string(1, state_));
  std::string s = StrCat(" (", wall_ns(now) / 1'000'000, " ms by the clock, of which the host kept it waiting ",
                         (wall_ns(now) - std::min(wall_ns(now), blamed_ns_)) / 1'000'000, " ms; ");
  if (state_ == '?') return s + "state unknown)";
  return StrCat(s, "now ", state, ")");
}

uint64_t OwnWaitMeter::Take() {
  uint64_t run = 0, wait = 0;
  if (!ReadSchedstat("/proc/thread-self/schedstat", &run, &wait)) return 0;
  const uint64_t waited = last_ns_ != 0 && wait > last_ns_ ? wait - last_ns_ : 0;
  last_ns_ = wait;
  return waited;
}

void PeerSilence::Heard(uint64_t now, uint64_t peer_waited_ns) {
  if (now - window_start_ns_ > kWindowNs) {
    previous_max_ns_ = now - window_start_ns_ > 2 * kWindowNs ? 0 : window_max_ns_;
    window_max_ns_ = 0;
    window_start_ns_ = now;
  }
  window_max_ns_ = std::max(window_max_ns_, peer_waited_ns);
  heard_ns_ = now;
  judge_waited_ns_ = 0;
}

uint64_t PeerSilence::evidence_ns(uint64_t now) const {
  if (now - window_start_ns_ > 2 * kWindowNs) return 0;  // nothing reported in the last two windows
  return std::max(window_max_ns_, now - window_start_ns_ > kWindowNs ? 0 : previous_max_ns_);
}

uint64_t PeerSilence::allowance_ns(uint64_t now) const {
  // The evidence comes from the peer: bounded before the sum, which then cannot wrap.
  return std::min(ceiling_ns_, base_ns_ + std::min(evidence_ns(now), ceiling_ns_) + judge_waited_ns_);
}

std::string PeerSilence::Explain(uint64_t now) const {
  return StrCat("silent for ", silent_ns(now) / 1'000'000, " ms (allowed ", base_ns_ / 1'000'000, " ms, + ",
                evidence_ns(now) / 1'000'000, " ms it reported frozen lately, + ", judge_waited_ns_ / 1'000'000,
                " ms this judge was kept waiting; at most ", ceiling_ns_ / 1'000'000, " ms)");
}

}  // namespace kraken::runtime
