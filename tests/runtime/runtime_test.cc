// The multi-process runtime end to end: worker processes over shared memory and Gloo reproduce
// the single-process engine for every architecture and world size, and survive killed, stopped
// and failing workers without leaving shared memory or rendezvous files behind.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <sys/wait.h>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <thread>

#include "engine/model.h"
#include "runtime/worker_group.h"
#include "tests/engine/test_util.h"

namespace kraken::runtime {
namespace {

using Clock = std::chrono::steady_clock;

// Anything in /dev/shm or /tmp whose name mentions kraken (the runtime should create nothing
// that has a name).
int Leftovers() {
  int n = 0;
  std::error_code ec;
  for (const char* dir : {"/dev/shm", "/tmp"}) {
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
      const std::string name = e.path().filename().string();
      n += name.rfind("kraken-rendezvous", 0) == 0 || (name.rfind("kraken-", 0) == 0 && dir[1] == 'd');
    }
  }
  return n;
}

// True while `pid` exists and is not a zombie.
bool Alive(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(in, stat)) return false;
  const size_t close = stat.rfind(')');
  return close != std::string::npos && stat.size() > close + 2 && stat[close + 2] != 'Z';
}

std::vector<int32_t> Iota(int n, int first) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

struct Outcome {
  std::vector<float> prompt_logprobs;  // logprob of token j+1 given tokens 0..j
  std::vector<int32_t> greedy;         // 12 greedy tokens after the prompt
};

// The golden prompt through a group: prompt logprobs from the prefill, then greedy decoding.
Outcome Through(WorkerGroup& g, const std::vector<int32_t>& prompt) {
  Outcome out;
  const std::vector<int32_t> blocks = Iota(4, 0);
  SeqStep s{.seq_id = 7,
            .tokens = prompt,
            .start_pos = 0,
            .block_table = blocks,
            .sample = true,
            .prompt_logprobs = true,
            .sampling = {.temperature = 0.f}};
  auto r = g.RunStep({&s, 1});
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return out;
  EXPECT_EQ(r->seqs.size(), 1u);
  EXPECT_EQ(r->seqs[0].seq_id, 7u);
  EXPECT_EQ(r->seqs[0].num_prompt_logprobs, static_cast<int32_t>(prompt.size()) - 1);
  for (int j = 0; j < r->seqs[0].num_prompt_logprobs; ++j) {
    const PromptLogprob& lp = r->prompt_logprobs[r->seqs[0].prompt_logprob_offset + j];
    EXPECT_EQ(lp.token, prompt[j + 1]);
    out.prompt_logprobs.push_back(lp.logprob);
  }
  int32_t next = r->seqs[0].token;
  for (int i = 0; i < 12; ++i) {
    out.greedy.push_back(next);
    SeqStep d{.seq_id = 7,
              .kv_generation = g.generation(),
              .tokens = {&next, 1},
              .start_pos = static_cast<int32_t>(prompt.size()) + i,
              .block_table = blocks,
              .sampling = {.temperature = 0.f},
              .draw_index = i + 1};
    auto rr = g.RunStep({&d, 1});
    EXPECT_TRUE(rr.ok()) << rr.status();
    if (!rr.ok()) return out;
    next = rr->seqs[0].token;
  }
  return out;
}

// The same with the single-process engine, as the reference.
Outcome Alone(const std::string& model, const std::vector<int32_t>& prompt) {
  Outcome out;
  auto backend = engine::CreateBackend({});
  auto m = engine::LoadModel(engine::testing::TestModelDir(model), backend->get(),
                             {.max_tokens = 64, .max_seqs = 1, .max_logit_rows = 64});
  auto kv = engine::KvCache::Create(**backend, (*m)->kv_layout(), {.num_blocks = 4});
  engine::LocalCommunicator comm;
  const std::vector<int32_t> blocks = Iota(4, 0);
  engine::SequenceInput s{.tokens = prompt, .start_pos = 0, .block_table = blocks, .all_logits = true};
  auto r = (*m)->Forward({.seqs = {&s, 1}}, *kv, comm);
  const int V = r->vocab;
  for (size_t j = 0; j + 1 < prompt.size(); ++j) {
    const float* l = r->logits + j * V;
    double mx = -INFINITY, sum = 0;
    for (int v = 0; v < V; ++v) mx = std::max<double>(mx, l[v]);
    for (int v = 0; v < V; ++v) sum += std::exp(l[v] - mx);
    out.prompt_logprobs.push_back(static_cast<float>(l[prompt[j + 1]] - mx - std::log(sum)));
  }
  auto argmax = [&](const float* l) { return static_cast<int32_t>(std::max_element(l, l + V) - l); };
  int32_t next = argmax(r->logits + (prompt.size() - 1) * V);
  for (int i = 0; i < 12; ++i) {
    out.greedy.push_back(next);
    engine::SequenceInput d{
        .tokens = {&next, 1}, .start_pos = static_cast<int32_t>(prompt.size()) + i, .block_table = blocks};
    auto rr = (*m)->Forward({.seqs = {&d, 1}}, *kv, comm);
    next = argmax(rr->logits);
  }
  return out;
}

WorkerGroupOptions Options(const std::string& model, int world) {
  return {.model_dir = engine::testing::TestModelDir(model),
          .devices = *ParseDevices("cpu:" + std::to_string(world)),
          .threads_per_worker = 1,
          .max_tokens = 64,
          .max_seqs = 4,
          .num_kv_blocks = 16};
}

struct WorldCase {
  std::string model;
  int world;
};

class Equivalence : public ::testing::TestWithParam<WorldCase> {};

TEST_P(Equivalence, WorkersReproduceTheSingleProcessEngine) {
  const auto [model, world] = GetParam();
  engine::testing::Golden g(engine::testing::TestModelDir(model));
  const std::vector<int32_t> prompt = g.Ints("tokens");
  const Outcome want = Alone(model, prompt);
  {
    auto group = WorkerGroup::Start(Options(model, world));
    ASSERT_TRUE(group.ok()) << group.status();
    EXPECT_EQ(Leftovers(), 0) << "the segment name must be gone once workers are up";
    const Outcome got = Through(**group, prompt);
    ASSERT_EQ(got.prompt_logprobs.size(), want.prompt_logprobs.size());
    for (size_t i = 0; i < want.prompt_logprobs.size(); ++i) {
      EXPECT_NEAR(got.prompt_logprobs[i], want.prompt_logprobs[i], 2e-4) << "position " << i;
    }
    EXPECT_EQ(got.greedy, want.greedy);
    const auto stats = (*group)->Stats();
    ASSERT_EQ(static_cast<int>(stats.size()), world);
    for (const auto& s : stats) {
      EXPECT_EQ(s.steps, 13u) << "rank " << s.rank;
      EXPECT_GT(s.busy_s, 0.0);
      if (world > 1) {
        EXPECT_GT(s.collectives, 13u) << "rank " << s.rank;
      }
    }
  }
  EXPECT_EQ(Leftovers(), 0);
}

INSTANTIATE_TEST_SUITE_P(Worlds, Equivalence,
                         ::testing::Values(WorldCase{"kraken-n4-bf16", 1}, WorldCase{"kraken-n4-bf16", 2},
                                           WorldCase{"kraken-n4-bf16", 4}, WorldCase{"kraken-n2-h113-f32", 2},
                                           WorldCase{"gpt2-f32", 1}, WorldCase{"gpt2-f32", 2}, WorldCase{"gpt2-f32", 4},
                                           WorldCase{"parallel-block-f16-sharded", 1},
                                           WorldCase{"parallel-block-f16-sharded", 3}),
                         [](const auto& param_info) {
                           std::string s = param_info.param.model + "_W" + std::to_string(param_info.param.world);
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

// A step that takes a while: collectives emulate a slow link, so a kill lands mid-step.
WorkerGroupOptions SlowOptions(int world) {
  WorkerGroupOptions o = Options("kraken-n4-bf16", world);
  o.link_preset = "ethernet-100g";
  o.measured_gemm_flops = 312e12 / 5000;  // link time x5000: ~100 ms per collective
  return o;
}

TEST(Faults, AWorkerKilledMidStepIsNoticedAndAllAreRestarted) {
  auto group = WorkerGroup::Start(SlowOptions(2));
  ASSERT_TRUE(group.ok()) << group.status();
  const std::vector<int32_t> prompt = Iota(20, 3), blocks = Iota(4, 0);
  SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks, .sampling = {.temperature = 0.f}};
  const auto before = (*group)->RunStep({&s, 1});
  ASSERT_TRUE(before.ok()) << before.status();
  const int32_t token = before->seqs[0].token;
  const pid_t victim = (*group)->worker_pids()[1];
  Clock::time_point killed_at;
  std::thread killer([victim, &killed_at] {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));  // the step is under way
    killed_at = Clock::now();
    kill(victim, SIGKILL);
  });
  auto failed = (*group)->RunStep({&s, 1});
  killer.join();
  const double noticed = std::chrono::duration<double>((*group)->last_failure_noticed() - killed_at).count();
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(std::string(failed.status().message()).find("worker rank 1"), std::string::npos) << failed.status();
  EXPECT_NE(std::string(failed.status().message()).find("signal 9"), std::string::npos) << failed.status();
  EXPECT_GE(noticed, 0.0);
  EXPECT_LT(noticed, 2.0) << "seconds from the kill to noticing it";
  EXPECT_EQ((*group)->restarts(), 1);
  EXPECT_NE((*group)->worker_pids()[1], victim);
  auto after = (*group)->RunStep({&s, 1});
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->seqs[0].token, token) << "the restarted workers compute the same thing";
  group->reset();
  EXPECT_EQ(Leftovers(), 0);
}

TEST(Faults, TheKilledRankIsTheOneBlamedAndLostKvCachesAreRefused) {
  auto group = WorkerGroup::Start(Options("gpt2-f32", 2));
  ASSERT_TRUE(group.ok()) << group.status();
  const std::vector<int32_t> prompt = Iota(8, 3), blocks = Iota(4, 0);
  SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks, .sampling = {.temperature = 0.f}};
  ASSERT_TRUE((*group)->RunStep({&s, 1}).ok());
  const uint64_t gen = (*group)->generation();
  const pid_t victim = (*group)->worker_pids()[1];
  std::thread killer([victim] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    kill(victim, SIGKILL);
  });
  // Decode steps in a loop until the kill lands; the failure must name rank 1, not its peer's
  // failed collective.
  Status failure;
  int32_t next = 5;
  for (int i = 0; i < 100000 && failure.ok(); ++i) {
    SeqStep d{.seq_id = 1,
              .kv_generation = gen,
              .tokens = {&next, 1},
              .start_pos = 8 + (i % 50),
              .block_table = blocks,
              .sampling = {.temperature = 0.f}};
    failure = (*group)->RunStep({&d, 1}).status();
  }
  killer.join();
  ASSERT_FALSE(failure.ok());
  EXPECT_NE(std::string(failure.message()).find("worker rank 1"), std::string::npos) << failure;
  EXPECT_NE(std::string(failure.message()).find("signal 9"), std::string::npos) << failure;
  EXPECT_NE((*group)->generation(), gen);
  // The sequence's KV cache died with the workers: continuing it is refused, a new prefill works.
  SeqStep stale{.seq_id = 1, .kv_generation = gen, .tokens = {&next, 1}, .start_pos = 8, .block_table = blocks};
  auto refused = (*group)->RunStep({&stale, 1});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_TRUE((*group)->RunStep({&s, 1}).ok());
}

TEST(Faults, WorkersDieWithTheFrontEndAndLeaveNothingBehind) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t front = fork();
  ASSERT_GE(front, 0);
  if (front == 0) {  // a front-end that starts workers and is then killed
    ::close(fds[0]);
    auto group = WorkerGroup::Start(Options("kraken-n4-bf16", 2));
    if (!group.ok()) _exit(1);
    const auto pids = (*group)->worker_pids();
    if (write(fds[1], pids.data(), sizeof(pid_t) * pids.size()) < 0) _exit(1);
    for (;;) pause();
  }
  ::close(fds[1]);
  pid_t workers[2] = {0, 0};
  ASSERT_EQ(read(fds[0], workers, sizeof workers), static_cast<ssize_t>(sizeof workers));
  ::close(fds[0]);
  ASSERT_TRUE(Alive(workers[0]) && Alive(workers[1]));
  kill(front, SIGKILL);
  waitpid(front, nullptr, 0);
  const auto t0 = Clock::now();
  while ((Alive(workers[0]) || Alive(workers[1])) && Clock::now() - t0 < std::chrono::seconds(5)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_FALSE(Alive(workers[0]));
  EXPECT_FALSE(Alive(workers[1]));
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 2.0);
  EXPECT_EQ(Leftovers(), 0);
}

TEST(Faults, AStoppedWorkerIsCaughtByTheHeartbeat) {
  auto group = WorkerGroup::Start(Options("gpt2-f32", 2));
  ASSERT_TRUE(group.ok()) << group.status();
  const std::vector<int32_t> prompt = Iota(5, 3), blocks = Iota(4, 0);
  SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks, .sampling = {.temperature = 0.f}};
  const pid_t victim = (*group)->worker_pids()[0];
  kill(victim, SIGSTOP);
  const auto t0 = Clock::now();
  auto r = (*group)->RunStep({&s, 1});
  const double seconds = std::chrono::duration<double>((*group)->last_failure_noticed() - t0).count();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(std::string(r.status().message()).find("stopped responding"), std::string::npos) << r.status();
  EXPECT_LT(seconds, 2.0) << "seconds from the stop to noticing it";
  EXPECT_TRUE((*group)->RunStep({&s, 1}).ok());
}

// Nodes that never answer: the refusal below comes before the group would talk to them.
class NoNodes : public RemoteNodes {
 public:
  Status Start(uint64_t, uint8_t*, const Layout&, uint64_t) override { return absl::UnavailableError("no nodes"); }
  void ExchangeStore() override {}
  void SetKvBlocks(int32_t) override {}
  void Publish(uint64_t) override {}
  void Stop() override {}
  void Cancel() override {}
  std::string Where(int) const override { return "nowhere"; }
};

TEST(Faults, AMultiNodeGroupWhosePlansCouldPassANodesMessageLimitIsRefusedByName) {
  Limits l;
  l.max_seqs = 2, l.max_tokens = 10, l.max_blocks_per_seq = 3, l.max_history = 100;
  EXPECT_EQ(MaxPlanBytes(l), static_cast<int64_t>(sizeof(PlanHeader) + 2 * sizeof(PlanSeq) + 4 * (10 + 6 + 100)));
  WorkerGroupOptions o = Options("gpt2-f32", 2);
  auto nodes = std::make_shared<NoNodes>();
  o.remote = nodes;
  o.max_seqs = 4096;
  o.max_history = 70'000'000;  // 267 MiB of penalty history alone
  auto group = WorkerGroup::Start(o);
  ASSERT_FALSE(group.ok());
  EXPECT_EQ(group.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(group.status().message()).find("in one message of at most 256 MiB: lower --max-batch-seqs"),
            std::string::npos)
      << group.status();
  EXPECT_EQ(Leftovers(), 0);
}

TEST(Faults, StartUpFailuresNameTheRankAndTheReason) {
  auto bad_device = WorkerGroup::Start({.model_dir = engine::testing::TestModelDir("gpt2-f32"),
                                        .devices = {engine::Device::Cuda(0)},
                                        .max_tokens = 8,
                                        .max_seqs = 1,
                                        .num_kv_blocks = 4});
  ASSERT_FALSE(bad_device.ok());
  EXPECT_NE(std::string(bad_device.status().message()).find("worker rank 0 (cuda:0) failed to start"),
            std::string::npos)
      << bad_device.status();
  EXPECT_NE(std::string(bad_device.status().message()).find("built without CUDA"), std::string::npos);
  // Sharding that the model cannot do: every rank reports it; the first is named.
  auto bad_world = WorkerGroup::Start(Options("kraken-n4-bf16", 3));
  ASSERT_FALSE(bad_world.ok());
  EXPECT_NE(std::string(bad_world.status().message()).find("cannot be split over a world of size 3"), std::string::npos)
      << bad_world.status();
  EXPECT_FALSE(ParseDevices("tpu:1").ok());
  EXPECT_EQ(*ParseDevices("cuda:0-2,5"),
            (std::vector<engine::Device>{engine::Device::Cuda(0), engine::Device::Cuda(1), engine::Device::Cuda(2),
                                         engine::Device::Cuda(5)}));
  EXPECT_EQ(*ParseDevices("cpu:3"), std::vector<engine::Device>(3, engine::Device::Cpu()));
  EXPECT_FALSE(ParseDevices("cuda:0-9999").ok());
  EXPECT_EQ(Leftovers(), 0);
}

TEST(Faults, GivesUpAfterTooManyRestarts) {
  WorkerGroupOptions o = Options("gpt2-f32", 2);
  o.max_restarts = 1;
  auto group = WorkerGroup::Start(o);
  ASSERT_TRUE(group.ok());
  const std::vector<int32_t> prompt = Iota(5, 3), blocks = Iota(4, 0);
  SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks};
  kill((*group)->worker_pids()[1], SIGKILL);
  EXPECT_EQ((*group)->RunStep({&s, 1}).status().code(), absl::StatusCode::kUnavailable);
  kill((*group)->worker_pids()[0], SIGKILL);
  auto r = (*group)->RunStep({&s, 1});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted) << r.status();
  EXPECT_NE(std::string(r.status().message()).find("giving up"), std::string::npos);
  EXPECT_EQ((*group)->RunStep({&s, 1}).status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(Leftovers(), 0);
}

TEST(Dispatch, OversizedOrInvalidStepsAreRefusedAndTheGroupStaysUsable) {
  auto group = WorkerGroup::Start(Options("kraken-n4-bf16", 2));
  ASSERT_TRUE(group.ok());
  const std::vector<int32_t> many(65, 1), blocks = Iota(4, 0), ok = {1, 2, 3}, bad = {1, 999};
  SeqStep big{.seq_id = 1, .tokens = many, .block_table = blocks};
  EXPECT_EQ((*group)->RunStep({&big, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  SeqStep wrong{.seq_id = 2, .tokens = bad, .block_table = blocks};
  auto r = (*group)->RunStep({&wrong, 1});  // caught by the workers' own validation
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("token 1 = 999 is outside the vocabulary"), std::string::npos);
  SeqStep good{.seq_id = 3, .tokens = ok, .block_table = blocks};
  auto g2 = (*group)->RunStep({&good, 1});
  ASSERT_TRUE(g2.ok()) << g2.status();
  EXPECT_EQ((*group)->restarts(), 0);
}

// ---- Timers: each fires on a real failure within its bound, and never on mere inactivity. ----

// Seconds since `t0`.
double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Calls Supervise every 20 ms until it reports something or `limit_s` pass; the status and when.
std::pair<Status, double> SuperviseUntilFailure(WorkerGroup& g, double limit_s) {
  const auto t0 = Clock::now();
  while (Since(t0) < limit_s) {
    Status s = g.Supervise();
    if (!s.ok()) return {s, Since(t0)};
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return {absl::OkStatus(), Since(t0)};
}

// True when `pid` no longer exists at all (exited and reaped: not even a zombie).
bool Reaped(pid_t pid) {
  return !std::filesystem::exists("/proc/" + std::to_string(pid));
}

WorkerGroupOptions ShortTimers(const std::string& model, int world) {
  WorkerGroupOptions o = Options(model, world);
  o.heartbeat_timeout = std::chrono::milliseconds(300);
  o.stall_timeout = std::chrono::milliseconds(300);
  o.collective_timeout = std::chrono::milliseconds(300);
  o.start_timeout = std::chrono::milliseconds(20000);
  o.restart_window = std::chrono::milliseconds(600000);
  return o;
}

TEST(Timers, AnIdleGapLongerThanEveryTimerFiresNone) {
  // Heartbeat, stall and collective timers of 0.3 s, then 1.5 s with no step: the next steps must
  // run, and supervision meanwhile must find nothing (the stall timer once measured this gap).
  auto group = WorkerGroup::Start(ShortTimers("kraken-n4-bf16", 2));
  ASSERT_TRUE(group.ok()) << group.status();
  const std::vector<int32_t> prompt = Iota(6, 3), blocks = Iota(4, 0);
  SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks, .sampling = {.temperature = 0.f}};
  auto first = (*group)->RunStep({&s, 1});
  ASSERT_TRUE(first.ok()) << first.status();
  const int32_t token = first->seqs[0].token;
  auto [idle, seconds] = SuperviseUntilFailure(**group, 1.5);
  EXPECT_TRUE(idle.ok()) << idle << " after " << seconds << " s idle";
  for (int i = 0; i < 3; ++i) {
    auto again = (*group)->RunStep({&s, 1});
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->seqs[0].token, token);
    std::this_thread::sleep_for(std::chrono::milliseconds(400));  // each gap longer than every timer
  }
  EXPECT_EQ((*group)->restarts(), 0);
}

TEST(Timers, AStepWithoutProgressPastTheStallTimeoutIsCaughtInTime) {
  // Collectives slowed to ~100 ms each: a stall timeout of 30 ms must fire within the step.
  WorkerGroupOptions o = SlowOptions(2);
  o.stall_timeout = std::chrono::milliseconds(30);
  auto group = WorkerGroup::Start(o);
  ASSERT_TRUE(group.ok()) << group.status();
  const std::vector<int32_t> prompt = Iota(20, 3), blocks = Iota(4, 0);
  SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks, .sampling = {.temperature = 0.f}};
  const auto t0 = Clock::now();
  auto r = (*group)->RunStep({&s, 1});
  const double noticed = std::chrono::duration<double>((*group)->last_failure_noticed() - t0).count();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(std::string(r.status().message()).find("is stuck: no progress in step"), std::string::npos) << r.status();
  EXPECT_GE(noticed, 0.03);
  EXPECT_LT(noticed, 0.03 + 0.5) << "seconds from publishing the step to noticing the stall";
  EXPECT_EQ((*group)->restarts(), 1);
}

TEST(Timers, AWorkerKilledWhileIdleIsReapedAndReplacedBeforeTheNextStep) {
  auto group = WorkerGroup::Start(ShortTimers("gpt2-f32", 2));
  ASSERT_TRUE(group.ok()) << group.status();
  const std::vector<int32_t> prompt = Iota(5, 3), blocks = Iota(4, 0);
  SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks, .sampling = {.temperature = 0.f}};
  ASSERT_TRUE((*group)->RunStep({&s, 1}).ok());
  const uint64_t generation = (*group)->generation();
  const pid_t victim = (*group)->worker_pids()[1];
  kill(victim, SIGKILL);
  auto [failure, seconds] = SuperviseUntilFailure(**group, 5);
  EXPECT_EQ(failure.code(), absl::StatusCode::kUnavailable) << failure;
  EXPECT_NE(std::string(failure.message()).find("worker rank 1"), std::string::npos) << failure;
  EXPECT_NE(std::string(failure.message()).find("signal 9"), std::string::npos) << failure;
  EXPECT_NE(std::string(failure.message()).find("workers were restarted"), std::string::npos) << failure;
  EXPECT_LT(seconds, 2.0) << "seconds from the kill to a working group";
  EXPECT_TRUE(Reaped(victim)) << "the killed worker is left as a zombie";
  EXPECT_EQ((*group)->restarts(), 1);
  EXPECT_NE((*group)->generation(), generation);
  EXPECT_NE((*group)->worker_pids()[1], victim);
  EXPECT_TRUE((*group)->Supervise().ok());
  auto next = (*group)->RunStep({&s, 1});
  EXPECT_TRUE(next.ok()) << next.status() << ": the first step after an idle failure must not fail";
}

TEST(Timers, AWorkerStoppedWhileIdleIsCaughtByTheHeartbeatWithinItsBound) {
  auto group = WorkerGroup::Start(ShortTimers("gpt2-f32", 2));
  ASSERT_TRUE(group.ok()) << group.status();
  const pid_t victim = (*group)->worker_pids()[0];
  kill(victim, SIGSTOP);
  auto [failure, seconds] = SuperviseUntilFailure(**group, 5);
  EXPECT_EQ(failure.code(), absl::StatusCode::kUnavailable) << failure;
  EXPECT_NE(std::string(failure.message()).find("worker rank 0"), std::string::npos) << failure;
  EXPECT_NE(std::string(failure.message()).find("stopped responding"), std::string::npos) << failure;
  // Heartbeat timeout 0.3 s + the heartbeat period 0.1 s + the 0.2 s the report waits for an exit
  // + one supervision interval, then the restart itself.
  EXPECT_LT(seconds, 3.0) << "seconds from the stop to a restarted group";
  EXPECT_TRUE(Reaped(victim)) << "the stopped worker must be killed and reaped";
  const std::vector<int32_t> prompt = Iota(5, 3), blocks = Iota(4, 0);
  SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks};
  EXPECT_TRUE((*group)->RunStep({&s, 1}).ok());
}

TEST(Timers, ACollectiveThatNeverCompletesFailsItsRankAfterTheCollectiveTimeout) {
  // Rank 1 stopped mid-run, with a heartbeat and stall timeout too long to matter: rank 0's
  // AllReduce must give up after the 0.3 s collective timeout and the group must be restarted.
  WorkerGroupOptions o = ShortTimers("kraken-n4-bf16", 2);
  o.heartbeat_timeout = std::chrono::milliseconds(60000);
  o.stall_timeout = std::chrono::milliseconds(60000);
  auto group = WorkerGroup::Start(o);
  ASSERT_TRUE(group.ok()) << group.status();
  const std::vector<int32_t> prompt = Iota(6, 3), blocks = Iota(4, 0);
  SeqStep s{.seq_id = 1, .tokens = prompt, .start_pos = 0, .block_table = blocks};
  const pid_t stopped = (*group)->worker_pids()[1];
  kill(stopped, SIGSTOP);
  const auto t0 = Clock::now();
  auto r = (*group)->RunStep({&s, 1});
  const double seconds = Since(t0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_NE(std::string(r.status().message()).find("worker rank 0"), std::string::npos) << r.status();
  EXPECT_GE(seconds, 0.3) << r.status();
  EXPECT_LT(seconds, 10.0) << r.status();
  EXPECT_TRUE(Reaped(stopped));
  EXPECT_TRUE((*group)->RunStep({&s, 1}).ok());
}

TEST(Timers, FailuresFartherApartThanTheRestartWindowNeverAddUp) {
  // One failure tolerated per 0.5 s window: two failures 0.8 s apart are two restarts, never a
  // give-up; two within the window give up.
  WorkerGroupOptions o = ShortTimers("gpt2-f32", 1);
  o.max_restarts = 1;
  o.restart_window = std::chrono::milliseconds(500);
  auto group = WorkerGroup::Start(o);
  ASSERT_TRUE(group.ok()) << group.status();
  for (int i = 0; i < 2; ++i) {
    kill((*group)->worker_pids()[0], SIGKILL);
    auto [failure, seconds] = SuperviseUntilFailure(**group, 5);
    EXPECT_EQ(failure.code(), absl::StatusCode::kUnavailable) << "failure " << i << ": " << failure;
    std::this_thread::sleep_for(std::chrono::milliseconds(800));
  }
  EXPECT_EQ((*group)->restarts(), 2);
  EXPECT_TRUE((*group)->Supervise().ok());
  o.restart_window = std::chrono::milliseconds(60000);
  auto strict = WorkerGroup::Start(o);
  ASSERT_TRUE(strict.ok()) << strict.status();
  kill((*strict)->worker_pids()[0], SIGKILL);
  EXPECT_EQ(SuperviseUntilFailure(**strict, 5).first.code(), absl::StatusCode::kUnavailable);
  kill((*strict)->worker_pids()[0], SIGKILL);
  const Status gave_up = SuperviseUntilFailure(**strict, 5).first;
  EXPECT_EQ(gave_up.code(), absl::StatusCode::kAborted) << gave_up;
  EXPECT_NE(std::string(gave_up.message()).find("giving up: 2 worker failures within 60 s"), std::string::npos)
      << gave_up;
  EXPECT_EQ(Leftovers(), 0);
}

TEST(Timers, TheStartTimeoutBoundsAStartThatCannotFinish) {
  // The warm-up's collectives on the slowed link take ~100 ms each: a 30 ms start timeout fires
  // before any rank is ready, and the same start with the default timeout succeeds.
  WorkerGroupOptions o = SlowOptions(2);
  o.start_timeout = std::chrono::milliseconds(30);
  const auto t0 = Clock::now();
  auto group = WorkerGroup::Start(o);
  ASSERT_FALSE(group.ok());
  EXPECT_EQ(group.status().code(), absl::StatusCode::kDeadlineExceeded) << group.status();
  EXPECT_NE(std::string(group.status().message()).find("did not become ready within 30 ms"), std::string::npos)
      << group.status();
  EXPECT_LT(Since(t0), 2.0);
  EXPECT_EQ(Leftovers(), 0);
  EXPECT_TRUE(WorkerGroup::Start(SlowOptions(2)).ok());
}

TEST(PlanCodec, WhatTheWriterEncodesTheReaderDecodesAndCorruptionIsRefused) {
  const Limits limits{.world_size = 1,
                      .max_tokens = 16,
                      .max_seqs = 3,
                      .max_blocks_per_seq = 4,
                      .max_history = 32,
                      .vocab_size = 100,
                      .num_kv_blocks = 12,
                      .block_size = 4};
  const Layout layout = ComputeLayout(limits);
  std::vector<uint8_t> segment(layout.total);
  const std::vector<int32_t> a_tokens = {5, 6, 7}, a_blocks = {0, 1}, prompt = {1, 2}, generated = {3}, banned = {9};
  const std::vector<int32_t> b_tokens = {8}, b_blocks = {2, 3, 4};
  const std::vector<engine::TokenBias> bias = {{.token = 4, .bias = -100.f}, {.token = 60, .bias = 2.5f}};
  const SeqStep steps[] = {
      {.seq_id = 11,
       .tokens = a_tokens,
       .start_pos = 0,
       .block_table = a_blocks,
       .sample = true,
       .prompt_logprobs = true,
       .next_token = 42,
       .sampling = {.temperature = 0.5f, .top_k = 3, .seed = 77},
       .draw_index = 4,
       .history_prompt = prompt,
       .history_generated = generated,
       .banned = banned,
       .logit_bias = bias},
      {.seq_id = 12, .tokens = b_tokens, .start_pos = 9, .block_table = b_blocks, .sample = false}};
  PlanWriter writer(segment.data(), layout, limits);
  ASSERT_TRUE(writer.Check(steps).ok());
  writer.Write(5, steps);
  const PlanReader reader(segment.data(), layout, limits);
  const PlanHeader h = reader.header();
  EXPECT_EQ(h.step, 5u);
  EXPECT_EQ(h.num_seqs, 2);
  ASSERT_TRUE(reader.Check(h).ok());
  auto same = [](std::span<const int32_t> got, const std::vector<int32_t>& want) {
    return std::vector<int32_t>(got.begin(), got.end()) == want;
  };
  const PlannedSeq a = reader.seq(h, 0), b = reader.seq(h, 1);
  EXPECT_EQ(a.plan->seq_id, 11u);
  EXPECT_TRUE(same(a.tokens, a_tokens) && same(a.block_table, a_blocks));
  EXPECT_TRUE(same(a.history.prompt, prompt) && same(a.history.generated, generated) && same(a.history.banned, banned));
  ASSERT_EQ(a.history.logit_bias.size(), 2u);
  EXPECT_EQ(a.history.logit_bias[0].token, 4);
  EXPECT_EQ(a.history.logit_bias[0].bias, -100.f);
  EXPECT_EQ(a.history.logit_bias[1].token, 60);
  EXPECT_EQ(a.history.logit_bias[1].bias, 2.5f);
  EXPECT_EQ(h.num_history, 2 + 1 + 1 + 2 * 2) << "two slots per bias";
  EXPECT_TRUE(b.history.logit_bias.empty());
  EXPECT_EQ(a.plan->sampling.seed, 77u);
  EXPECT_EQ(a.plan->sampling.top_k, 3);
  EXPECT_EQ(a.plan->draw_index, 4);
  EXPECT_EQ(a.plan->sample, 1);
  EXPECT_EQ(a.plan->prompt_logprobs, 1);
  EXPECT_EQ(a.plan->next_token, 42);
  EXPECT_EQ(b.plan->next_token, -1);
  EXPECT_EQ(b.plan->start_pos, 9);
  EXPECT_TRUE(same(b.tokens, b_tokens) && same(b.block_table, b_blocks));
  EXPECT_TRUE(b.history.prompt.empty() && b.history.banned.empty());
  EXPECT_EQ(b.plan->sample, 0);
  // Biases counted past the plan's history are refused before anything reads them.
  reinterpret_cast<PlanSeq*>(segment.data() + layout.plan_seqs)[0].history_bias = 3;
  EXPECT_EQ(reader.Check(h).message(), "step plan sequence 0 points outside the plan's arrays");
  reinterpret_cast<PlanSeq*>(segment.data() + layout.plan_seqs)[0].history_bias = 2;
  ASSERT_TRUE(reader.Check(h).ok());
  // A sequence pointing past the plan's token array is refused before anything reads it.
  reinterpret_cast<PlanSeq*>(segment.data() + layout.plan_seqs)[1].num_tokens = 50;
  EXPECT_EQ(reader.Check(h).message(), "step plan sequence 1 points outside the plan's arrays");
  // The writer refuses what does not fit, naming the limit.
  const std::vector<int32_t> many(17, 1);
  const SeqStep big{.seq_id = 1, .tokens = many, .block_table = a_blocks};
  EXPECT_EQ(writer.Check({&big, 1}).code(), absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> long_table(5, 0);
  const SeqStep wide{.seq_id = 1, .tokens = b_tokens, .block_table = long_table};
  EXPECT_EQ(writer.Check({&wide, 1}).message(), "sequence 0: block table of 5 blocks exceeds the limit 4");
}

// ---- A follower node's share (cluster/follower.h): plans arrive as bytes from another node. ----

TEST(Share, APlanWhosePartsDisagreeWithItsHeaderIsRefusedByNameAndNothingIsWritten) {
  WorkerGroupOptions o = Options("kraken-n4-bf16", 2);
  o.first_rank = 1;  // rank 1 of 2 here; rank 0 would be the leader's
  o.local_ranks = 1;
  auto limits = PlanLimits(o);
  ASSERT_TRUE(limits.ok()) << limits.status();
  auto share = WorkerGroup::StartShare(o, *limits);
  ASSERT_TRUE(share.ok()) << share.status();
  auto bytes = [](const auto& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(v[0]));
  };
  PlanHeader h{.step = 1, .num_seqs = 1, .num_tokens = 3, .num_block_ids = 1};
  const std::string header(reinterpret_cast<const char*>(&h), sizeof h);
  const std::vector<PlanSeq> seqs(1);
  const std::vector<int32_t> tokens = {1, 2, 3}, block = {0}, too_many(limits->max_tokens + 1, 0);
  auto publish = [&](std::string_view hdr, const std::string& t) {
    return (*share)->PublishPlan(1, hdr, bytes(seqs), t, bytes(block), "");
  };
  Status s = publish(header.substr(1), bytes(tokens));  // a header one byte short
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("plan header of " + std::to_string(sizeof h - 1) + " bytes"),
            std::string::npos)
      << s;
  s = publish(header, bytes(std::vector<int32_t>{1, 2}));  // 2 tokens where the header says 3
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("plan tokens: 8 bytes for 3 entries (at most 64)"), std::string::npos) << s;
  h.num_tokens = limits->max_tokens + 1;
  s = publish(std::string(reinterpret_cast<const char*>(&h), sizeof h), bytes(too_many));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("for 65 entries (at most 64)"), std::string::npos) << s;
  EXPECT_EQ((*share)->control().plan_step.load(), 0u);  // nothing was published
  EXPECT_TRUE(publish(header, bytes(tokens)).ok());
  EXPECT_EQ((*share)->control().plan_step.load(), 1u);
  (*share)->Kill();
}

}  // namespace
}  // namespace kraken::runtime
