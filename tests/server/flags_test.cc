// kraken-server's flag schema (server/flags.h) without starting a server: defaults read from the
// modules' option structs, the precedence command line > KRAKEN_* environment > --config file >
// default, and the refusals (an unknown variable, a bad value, half a TLS pair) with exit code 2.
#include "server/flags.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace kraken::server {
namespace {

// Parses `args` (after the program name) with the environment `env` ("NAME=value" each).
std::optional<int> Parse(std::vector<std::string> args, std::vector<std::string> env, ServerFlags& f) {
  args.insert(args.begin(), "kraken-server");
  std::vector<const char*> argv, envp;
  for (const std::string& a : args) argv.push_back(a.c_str());
  for (const std::string& e : env) envp.push_back(e.c_str());
  envp.push_back(nullptr);
  return ParseServerFlags(static_cast<int>(argv.size()), argv.data(), envp.data(), f);
}

// The defaults docs/api.md documents, which the modules' option structs now hold.
TEST(ServerFlags, DefaultsAreTheDocumentedOnes) {
  ServerFlags f;
  ASSERT_EQ(Parse({}, {}, f), std::nullopt);
  EXPECT_EQ(f.max_batch_tokens, 512);
  EXPECT_EQ(f.max_batch_seqs, 64);
  EXPECT_EQ(f.max_waiting, 0) << "from the host's memory";
  EXPECT_EQ(f.block_size, 16);
  EXPECT_EQ(f.num_kv_blocks, 0);
  EXPECT_EQ(f.kv_cache_memory, 0);
  EXPECT_EQ(f.threads_per_worker, 0);
  EXPECT_DOUBLE_EQ(f.kv_watermark, 0.01);
  EXPECT_EQ(f.max_restarts, 3);
  EXPECT_DOUBLE_EQ(f.restart_window_s, 300);
  EXPECT_DOUBLE_EQ(f.heartbeat_timeout_s, 1);
  EXPECT_DOUBLE_EQ(f.stall_timeout_s, 60);
  EXPECT_DOUBLE_EQ(f.start_timeout_s, 120);
  EXPECT_DOUBLE_EQ(f.collective_timeout_s, 30);
  EXPECT_DOUBLE_EQ(f.resume_timeout_s, 60);
  EXPECT_EQ(f.http_threads, 2);
  EXPECT_DOUBLE_EQ(f.http_idle_timeout_s, 60);
  EXPECT_EQ(f.max_message_bytes, 4 << 20);
  EXPECT_TRUE(f.prefix_caching);
}

TEST(ServerFlags, TheCommandLineBeatsTheEnvironmentWhichBeatsTheConfigFile) {
  const std::string config = testing::TempDir() + "/kraken_flags_test.toml";
  {
    std::ofstream out(config);
    out << "max-waiting = 11\nmax-batch-seqs = 12\nblock-size = 32\n";
  }
  ServerFlags f;
  ASSERT_EQ(Parse({"--config", config, "--max-waiting", "9"}, {"KRAKEN_MAX_WAITING=10", "KRAKEN_MAX_BATCH_SEQS=13"}, f),
            std::nullopt);
  EXPECT_EQ(f.max_waiting, 9);      // command line
  EXPECT_EQ(f.max_batch_seqs, 13);  // environment over the file
  EXPECT_EQ(f.block_size, 32);      // the file over the default
  std::remove(config.c_str());
}

TEST(ServerFlags, BadSettingsExitTwo) {
  ServerFlags a, b, c, d;
  EXPECT_EQ(Parse({}, {"KRAKEN_MAX_WAITNG=3"}, a), 2);  // misspelt: refused, not ignored
  EXPECT_EQ(Parse({"--max-batch-seqs", "0"}, {}, b), 2);
  EXPECT_EQ(Parse({"--tls-cert", "c.pem"}, {}, c), 2);  // without --tls-key
  EXPECT_EQ(Parse({"--port", "70000"}, {}, d), 2);
}

TEST(ServerFlags, TheAutomaticQueueCapacityFollowsMemoryWithinItsBounds) {
  constexpr int64_t kGiB = int64_t{1} << 30;
  // 1/32 of 8 GiB over (4 KiB + 8 B x 1024 tokens) = 268435456 / 12288 = 21845: the ceiling.
  EXPECT_EQ(AutoMaxWaiting(8 * kGiB, 1024), kMaxAutoWaiting);
  // 1/32 of 8 GiB over (4 KiB + 8 B x 32768 tokens) = 268435456 / 266240 = 1008: the floor.
  EXPECT_EQ(AutoMaxWaiting(8 * kGiB, 32768), kMinAutoWaiting);
  // Between: 1/32 of 16 GiB over 266240 bytes = 2016.
  EXPECT_EQ(AutoMaxWaiting(16 * kGiB, 32768), 2016);
  EXPECT_EQ(AutoMaxWaiting(0, 256), kMinAutoWaiting) << "an unreadable host still queues a burst";
  EXPECT_GE(kMinAutoWaiting, 512) << "guidellm's sweep opens 512 requests at once";
}

}  // namespace
}  // namespace kraken::server
