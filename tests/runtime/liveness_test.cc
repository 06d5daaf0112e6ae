// SilenceClock against real processes: a thread that sleeps is charged its silence by the clock,
// a stopped process in full, and a process that waits for a CPU it cannot get is not charged
// for the wait (here: two processes pinned to one core, the silent one at the lowest priority).
#include "runtime/liveness.h"

#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "runtime/shm.h"

namespace kraken::runtime {
namespace {

// A child process running `body`; killed and reaped on destruction.
class Child {
 public:
  template <class F>
  explicit Child(F body) {
    pid_ = fork();
    if (pid_ == 0) {
      body();
      _exit(0);
    }
  }
  ~Child() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_;
};

// Updates `clock` every 20 ms for `ms`; the last charge.
uint64_t Watch(SilenceClock& clock, uint64_t mark, pid_t pid, int ms) {
  const uint64_t end = NowNs() + static_cast<uint64_t>(ms) * 1'000'000;
  while (NowNs() < end) {
    clock.Update(mark, NowNs(), pid, pid);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return clock.Update(mark, NowNs(), pid, pid);
}

TEST(ReadThreadSched, ReadsThisThreadAndFailsForAThreadThatIsGone) {
  const ThreadSched self = ReadThreadSched(getpid(), gettid());
  ASSERT_TRUE(self.ok);
  EXPECT_EQ(self.state, 'R');  // it is reading its own entry
  EXPECT_FALSE(ReadThreadSched(getpid(), 0x3fffffff).ok);
}

TEST(SilenceClock, ChargesASleepingThreadByTheClock) {
  Child sleeper([] { pause(); });
  SilenceClock clock;
  const uint64_t mark = NowNs();
  const uint64_t blamed = Watch(clock, mark, sleeper.pid(), 600);
  EXPECT_GE(blamed, 550'000'000u);
  EXPECT_LE(blamed, clock.wall_ns(NowNs()));
  EXPECT_EQ(clock.state(), 'S');
}

TEST(SilenceClock, ChargesAStoppedProcessInFull) {
  Child stopped([] { pause(); });
  kill(stopped.pid(), SIGSTOP);
  SilenceClock clock;
  const uint64_t mark = NowNs();
  const uint64_t blamed = Watch(clock, mark, stopped.pid(), 600);
  EXPECT_GE(blamed, 550'000'000u);
  EXPECT_EQ(clock.state(), 'T');
  EXPECT_NE(clock.Explain(NowNs()).find("now stopped"), std::string::npos) << clock.Explain(NowNs());
}

TEST(SilenceClock, DoesNotChargeAThreadForTheTimeTheHostKeptItWaiting) {
  // Both children on one core: the hog at normal priority, the starved one at nice 19 and busy
  // too, so it is runnable throughout and waits for the core most of the time.
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(0, &one);
  auto spin = [one] {
    sched_setaffinity(0, sizeof one, &one);
    std::atomic<uint64_t> i{0};
    while (true) i.fetch_add(1, std::memory_order_relaxed);
  };
  Child hog(spin);
  Child starved([spin] {
    setpriority(PRIO_PROCESS, 0, 19);
    spin();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  // Nice 19 against nice 0 gets about 1.5% of the core (weights 15 and 1024): nearly all of its
  // silence is waiting. The kernel's wait count lags by a scheduling period, which a thread that
  // never computes long (a heartbeat) is not charged: runnable is waiting for it.
  for (bool runnable_is_waiting : {false, true}) {
    SilenceClock clock(runnable_is_waiting);
    const uint64_t mark = NowNs();
    const uint64_t blamed = Watch(clock, mark, starved.pid(), 1000);
    EXPECT_GE(clock.wall_ns(NowNs()), 1'000'000'000u);
    EXPECT_LT(blamed, runnable_is_waiting ? 50'000'000u : 300'000'000u) << clock.Explain(NowNs());
    // A new mark starts the count again.
    EXPECT_EQ(clock.Update(mark + 1, mark + 1, starved.pid(), starved.pid()), 0u);
  }
}

TEST(SilenceClock, ExcusesAnOldMarkFirstSeenWhileTheThreadWaitsForACpu) {
  // A supervisor frozen with its workers (one container's quota) first sees a stamp long after it
  // was taken: a heartbeat thread that is runnable then has been waiting, not hung.
  Child runnable([] {
    std::atomic<uint64_t> i{0};
    while (true) i.fetch_add(1, std::memory_order_relaxed);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const uint64_t now = NowNs();
  SilenceClock heartbeat(/*runnable_is_waiting=*/true), serving;
  EXPECT_EQ(heartbeat.Update(now - 900'000'000, now, runnable.pid(), runnable.pid()), 0u);
  EXPECT_EQ(serving.Update(now - 900'000'000, now, runnable.pid(), runnable.pid()), 900'000'000u);
  Child sleeper([] { pause(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  SilenceClock asleep(/*runnable_is_waiting=*/true);
  EXPECT_EQ(asleep.Update(now - 900'000'000, now, sleeper.pid(), sleeper.pid()), 900'000'000u);
}

TEST(SilenceClock, ExcusesTheTimeTheJudgeItselfWasFrozen) {
  // A quota freeze stops the supervisor too: a heartbeat thread that stamped just before it and
  // is back asleep when the supervisor first runs again is excused what the supervisor waited.
  Child sleeper([] { pause(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const uint64_t now = NowNs();
  SilenceClock after_freeze(/*runnable_is_waiting=*/true);
  EXPECT_EQ(after_freeze.Update(now - 900'000'000, now, sleeper.pid(), sleeper.pid(), 880'000'000), 20'000'000u);
  // Never more than the silence itself.
  SilenceClock short_silence(/*runnable_is_waiting=*/true);
  EXPECT_EQ(short_silence.Update(now - 100'000'000, now, sleeper.pid(), sleeper.pid(), 880'000'000), 0u);
  // Later freezes add up, each at most its interval; a judge that ran all along excuses nothing.
  EXPECT_EQ(after_freeze.Update(now - 900'000'000, now + 500'000'000, sleeper.pid(), sleeper.pid(), 450'000'000),
            20'000'000u + 50'000'000u);
  EXPECT_EQ(after_freeze.Update(now - 900'000'000, now + 700'000'000, sleeper.pid(), sleeper.pid(), 900'000'000),
            20'000'000u + 50'000'000u);
  EXPECT_EQ(after_freeze.Update(now - 900'000'000, now + 1'700'000'000, sleeper.pid(), sleeper.pid(), 0),
            20'000'000u + 50'000'000u + 1'000'000'000u);
  // A stopped thread is charged in full, whatever the judge waited.
  Child stopped([] { pause(); });
  kill(stopped.pid(), SIGSTOP);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  SilenceClock frozen(/*runnable_is_waiting=*/true);
  EXPECT_EQ(frozen.Update(now - 900'000'000, now, stopped.pid(), stopped.pid(), 880'000'000), 900'000'000u);
  EXPECT_EQ(frozen.Update(now - 900'000'000, now + 500'000'000, stopped.pid(), stopped.pid(), 500'000'000),
            1'400'000'000u);
}

TEST(SilenceClock, ChargesASpinningThreadThatIsRunnableButRunning) {
  // Runnable is waiting only for the part of an interval the thread did not run: a heartbeat
  // thread that spins (it cannot by construction, but a hang could look so) is charged.
  Child spinner([] {
    std::atomic<uint64_t> i{0};
    while (true) i.fetch_add(1, std::memory_order_relaxed);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  SilenceClock clock(/*runnable_is_waiting=*/true);
  const uint64_t blamed = Watch(clock, NowNs(), spinner.pid(), 600);
  EXPECT_GE(blamed, 300'000'000u) << clock.Explain(NowNs());  // it has a core of its own most of the time
  EXPECT_EQ(clock.state(), 'R');
}

TEST(SilenceClock, AStampTakenAfterTheJudgesClockReadingStartsTheSilenceAtTheStamp) {
  // The judge read its clock, was frozen with the whole container, and the heartbeat thread ran
  // first when the quota thawed: the stamp is later than the judge's `now`. 950 ms on, the thread
  // has been silent 50 ms, not 950.
  Child sleeper([] { pause(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  SilenceClock clock;
  const uint64_t now = NowNs();
  const uint64_t stamp = now + 900'000'000;
  EXPECT_EQ(clock.Update(stamp, now, sleeper.pid(), sleeper.pid()), 0u);
  EXPECT_EQ(clock.state(), 'S');
  EXPECT_LE(clock.Update(stamp, now + 950'000'000, sleeper.pid(), sleeper.pid()), 50'000'000u);
}

TEST(SilenceClock, FallsBackToTheClockForAnUnknownThread) {
  SilenceClock clock;
  const uint64_t mark = NowNs();
  EXPECT_EQ(clock.Update(mark, mark + 5'000'000'000ull, -1, -1), 5'000'000'000ull);
  EXPECT_EQ(clock.Explain(mark), "");
}

TEST(OwnWaitMeter, CountsTheRunQueueWaitOfTheCallingThreadOnly) {
  // Pinned to one core beside a spinner of the same priority, this thread waits for the CPU about
  // half of the time it wants it; asleep, it waits for nothing.
  cpu_set_t saved;
  ASSERT_EQ(sched_getaffinity(0, sizeof saved, &saved), 0);
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(sched_getcpu(), &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
  OwnWaitMeter meter;
  EXPECT_EQ(meter.Take(), 0u);  // the first call sets the baseline
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_LT(meter.Take(), 20'000'000u);
  {
    Child spinner([] {
      std::atomic<uint64_t> i{0};
      while (true) i.fetch_add(1, std::memory_order_relaxed);
    });
    ASSERT_EQ(sched_setaffinity(spinner.pid(), sizeof one, &one), 0);
    meter.Take();
    const uint64_t until = NowNs() + 400'000'000;
    std::atomic<uint64_t> i{0};
    while (NowNs() < until) i.fetch_add(1, std::memory_order_relaxed);
    EXPECT_GE(meter.Take(), 100'000'000u);
  }
  ASSERT_EQ(sched_setaffinity(0, sizeof saved, &saved), 0);
}

constexpr uint64_t kMs = 1'000'000;

TEST(PeerSilence, AllowsTheBaseToAPeerThatNeverReportedAFreeze) {
  PeerSilence p(2000 * kMs, 10000 * kMs);
  const uint64_t t0 = 100'000 * kMs;
  EXPECT_FALSE(p.Expired(t0));  // nothing heard yet: nothing to judge
  p.Heard(t0, 0);
  EXPECT_FALSE(p.Expired(t0 + 2000 * kMs));
  EXPECT_TRUE(p.Expired(t0 + 2001 * kMs));
  EXPECT_EQ(p.Explain(t0 + 2001 * kMs),
            "silent for 2001 ms (allowed 2000 ms, + 0 ms it reported frozen lately, + 0 ms this judge was kept "
            "waiting; at most 10000 ms)");
}

TEST(PeerSilence, AllowsAsMuchMoreAsThePeerReportedFrozenLatelyForOneToTwoWindows) {
  PeerSilence p(2000 * kMs, 10000 * kMs);
  uint64_t t = 100'000 * kMs;
  p.Heard(t, 0);
  p.Heard(t += 1500 * kMs, 1400 * kMs);  // it was kept from a CPU 1.4 s of that gap
  EXPECT_EQ(p.allowance_ns(t), 3400 * kMs);
  EXPECT_FALSE(p.Expired(t + 3400 * kMs));
  EXPECT_TRUE(p.Expired(t + 3401 * kMs));
  // Small reports do not lower the longest one; it is still evidence 45 s later...
  for (int i = 0; i < 450; ++i) p.Heard(t += 100 * kMs, 5 * kMs);
  EXPECT_EQ(p.allowance_ns(t), 3400 * kMs);
  // ... and gone once two windows passed without another.
  for (int i = 0; i < 300; ++i) p.Heard(t += 100 * kMs, 5 * kMs);
  EXPECT_EQ(p.allowance_ns(t), 2005 * kMs);
}

TEST(PeerSilence, AllowsTheJudgesOwnFreezeSinceTheLastMessageOnly) {
  PeerSilence p(2000 * kMs, 10000 * kMs);
  const uint64_t t0 = 100'000 * kMs;
  p.Heard(t0, 0);
  p.JudgeWaited(900 * kMs);
  p.JudgeWaited(600 * kMs);
  EXPECT_FALSE(p.Expired(t0 + 3500 * kMs));
  EXPECT_TRUE(p.Expired(t0 + 3501 * kMs));
  p.Heard(t0 + 3500 * kMs, 0);  // a new message: the judge's wait counts from here
  EXPECT_TRUE(p.Expired(t0 + 5501 * kMs));
}

TEST(PeerSilence, TimeTheJudgeDidNotListenIsNoSilenceAndEscapesTheCeiling) {
  PeerSilence p(2000 * kMs, 10000 * kMs);
  const uint64_t t0 = 100'000 * kMs;
  p.Heard(t0, 0);
  p.NotListened(12'000 * kMs, t0 + 12'000 * kMs);  // it waited 12 s on its own workers
  EXPECT_FALSE(p.Expired(t0 + 14'000 * kMs));
  EXPECT_TRUE(p.Expired(t0 + 14'001 * kMs));
  p.NotListened(60'000 * kMs, t0 + 15'000 * kMs);  // never past now
  EXPECT_TRUE(p.Expired(t0 + 17'001 * kMs));
}

TEST(PeerSilence, NeverAllowsMoreThanTheCeilingWhateverThePeerReports) {
  PeerSilence p(2000 * kMs, 10000 * kMs);
  const uint64_t t0 = 100'000 * kMs;
  p.Heard(t0, 60'000 * kMs);
  p.JudgeWaited(60'000 * kMs);
  EXPECT_EQ(p.allowance_ns(t0), 10000 * kMs);
  EXPECT_TRUE(p.Expired(t0 + 10001 * kMs));
}

}  // namespace
}  // namespace kraken::runtime
