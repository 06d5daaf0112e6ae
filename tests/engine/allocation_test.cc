// After the first step, a forward pass allocates no heap memory (CONVENTIONS: "a decode step
// allocates nothing"), whatever the mix of prefill chunks and decode tokens within the limits
// the model was loaded with. Counts every operator new in this process.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <numeric>

#include "engine/model.h"
#include "tests/engine/test_util.h"

namespace {
std::atomic<long> g_allocations{0};
}  // namespace

// Replacing the global allocation functions with counting ones over malloc/free is the
// standard technique; GCC cannot see that they pair up and warns after inlining.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}

namespace kraken::engine {
namespace {

TEST(Allocation, StepsAfterTheFirstAllocateNothing) {
  for (const char* name : {"kraken-n4-bf16", "gpt2-f32", "parallel-block-f16-sharded"}) {
    SCOPED_TRACE(name);
    auto backend = CreateBackend({.device = Device::Cpu()});
    ASSERT_TRUE(backend.ok());
    auto model =
        LoadModel(testing::TestModelDir(name), backend->get(), {.max_tokens = 48, .max_seqs = 4, .max_logit_rows = 48});
    ASSERT_TRUE(model.ok()) << model.status();
    auto kv = KvCache::Create(**backend, (*model)->kv_layout(), {.num_blocks = 32});
    ASSERT_TRUE(kv.ok());
    LocalCommunicator comm;
    std::vector<std::vector<int32_t>> tables(4, std::vector<int32_t>(8));
    for (int s = 0; s < 4; ++s) std::iota(tables[s].begin(), tables[s].end(), 8 * s);
    const std::vector<int32_t> prompt(40, 7), one = {3};
    long during = 0;  // allocations inside Forward only (building the inputs here allocates)
    auto step = [&](std::vector<SequenceInput> seqs) {
      const long before = g_allocations.load();
      auto r = (*model)->Forward({.seqs = seqs}, *kv, comm);
      during += g_allocations.load() - before;
      ASSERT_TRUE(r.ok()) << r.status();
    };
    step({{.tokens = {prompt.data(), 4}, .start_pos = 0, .block_table = tables[0]}});  // first step
    during = 0;
    step({{.tokens = prompt, .start_pos = 0, .block_table = tables[1], .all_logits = true}});
    step({{.tokens = one, .start_pos = 40, .block_table = tables[1]},
          {.tokens = {prompt.data(), 8}, .start_pos = 0, .block_table = tables[2]},
          {.tokens = one, .start_pos = 4, .block_table = tables[0]},
          {.tokens = {prompt.data(), 5}, .start_pos = 0, .block_table = tables[3]}});
    for (int i = 0; i < 5; ++i) {
      step({{.tokens = one, .start_pos = 41 + i, .block_table = tables[1]},
            {.tokens = one, .start_pos = 8 + i, .block_table = tables[2]}});
    }
    EXPECT_EQ(during, 0) << "heap allocations inside Forward";
  }
}

}  // namespace
}  // namespace kraken::engine
