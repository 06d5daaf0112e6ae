// The CUDA kernels (engine/cuda/kernels.cu), run on the CPU by engine/cuda/emulation.h, against
// the CPU backend: indexing, the paged layouts, block reductions and the online softmax are
// checked on every machine and under AddressSanitizer, without a GPU. (Real-device behaviour,
// cuBLAS and streams are covered by the gpu-labelled cuda_backend_test.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "engine/backend.h"
#include "engine/cuda/kernels.h"
#include "engine/kv_cache.h"
#include "tests/engine/test_util.h"

namespace kraken::engine {
namespace {

std::unique_ptr<Backend> Cpu() {
  return std::move(CreateBackend({.device = Device::Cpu(), .threads = 1})).value();
}

std::vector<float> Random(size_t n, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

TEST(CudaKernelsEmulated, RowKernelsMatchTheCpuBackend) {
  auto cpu = Cpu();
  std::mt19937 rng(testing::TestSeed());
  for (int cols : {1, 31, 33, 160, 300}) {
    SCOPED_TRACE(cols);
    const int rows = 3;
    const int64_t xs = cols + 3;
    std::vector<float> x = Random(rows * xs, rng, 2.f), w = Random(cols, rng), b = Random(cols, rng);
    std::vector<float> y_cpu(rows * cols), y_emu(rows * cols);
    cpu->LayerNorm(Mat(x.data(), rows, cols, xs), w.data(), b.data(), 1e-5f, Mat(y_cpu.data(), rows, cols));
    cuda::LaunchLayerNorm(x.data(), xs, w.data(), b.data(), 1e-5f, y_emu.data(), cols, rows, cols, nullptr);
    testing::ExpectWithinRel(y_emu, y_cpu, 2e-6, "LayerNorm");
    cpu->LayerNorm(Mat(x.data(), rows, cols, xs), w.data(), nullptr, 1e-5f, Mat(y_cpu.data(), rows, cols));
    cuda::LaunchLayerNorm(x.data(), xs, w.data(), nullptr, 1e-5f, y_emu.data(), cols, rows, cols, nullptr);
    testing::ExpectWithinRel(y_emu, y_cpu, 2e-6, "LayerNorm without bias");

    std::vector<float> g_cpu = y_cpu, g_emu = y_cpu;
    cpu->GeluTanh(Mat(g_cpu.data(), rows, cols));
    cuda::LaunchGeluTanh(g_emu.data(), cols, rows, cols, nullptr);
    testing::ExpectWithinRel(g_emu, g_cpu, 2e-6, "GeluTanh");

    std::vector<float> a_cpu(rows * cols), a_emu(rows * cols);
    cpu->Add(Mat(x.data(), rows, cols, xs), Mat(g_cpu.data(), rows, cols), Mat(a_cpu.data(), rows, cols));
    cuda::LaunchAdd(x.data(), xs, g_cpu.data(), cols, a_emu.data(), cols, rows, cols, nullptr);
    EXPECT_EQ(a_emu, a_cpu) << "Add";

    const int32_t idx[] = {2, 0, 2};
    std::vector<float> r_cpu(3 * cols), r_emu(3 * cols);
    cpu->GatherRows(Mat(x.data(), rows, cols, xs), idx, Mat(r_cpu.data(), 3, cols));
    cuda::LaunchGatherRows(x.data(), xs, idx, r_emu.data(), cols, 3, cols, nullptr);
    EXPECT_EQ(r_emu, r_cpu) << "GatherRows";

    std::vector<float> bias_add = y_cpu, bias_set(rows * cols, 7.f);
    cuda::LaunchBiasRows(b.data(), bias_add.data(), cols, rows, cols, true, nullptr);
    cuda::LaunchBiasRows(b.data(), bias_set.data(), cols, rows, cols, false, nullptr);
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < cols; ++c) {
        ASSERT_EQ(bias_add[r * cols + c], y_cpu[r * cols + c] + b[c]);
        ASSERT_EQ(bias_set[r * cols + c], b[c]);
      }
    }

    std::vector<uint16_t> h(rows * cols);
    cuda::LaunchToHalf(x.data(), xs, rows, cols, h.data(), /*bf16=*/true, nullptr);
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < cols; ++c) {
        const float v = x[r * xs + c], back = Bf16ToF32(h[r * cols + c]);
        ASSERT_LE(std::fabs(back - v), std::ldexp(std::fabs(v), -8)) << "BF16 rounding of " << v;
      }
    }
  }
  // Embed reads the table in its stored dtype (the tied LM head's matrix), widened exactly.
  const int V = 20, P = 16, d = 45;
  std::vector<float> wte = Random(V * d, rng), wpe = Random(P * d, rng);
  const int32_t tokens[] = {0, 19, 7, 7}, positions[] = {15, 0, 3, 4};
  std::vector<uint16_t> bf16(V * d), f16(V * d);
  for (int i = 0; i < V * d; ++i) {
    uint32_t u;
    std::memcpy(&u, &wte[i], 4);
    bf16[i] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest even
    const _Float16 h = static_cast<_Float16>(wte[i]);
    std::memcpy(&f16[i], &h, 2);
  }
  struct Table {
    DType dtype;
    const void* data;
    cuda::Storage storage;
  };
  for (const Table& t :
       {Table{DType::kF32, wte.data(), cuda::Storage::kF32}, Table{DType::kBF16, bf16.data(), cuda::Storage::kBF16},
        Table{DType::kF16, f16.data(), cuda::Storage::kF16}}) {
    SCOPED_TRACE(DTypeName(t.dtype));
    TensorInfo info{.name = "wte",
                    .dtype = t.dtype,
                    .shape = {V, d},
                    .data = static_cast<const uint8_t*>(t.data),
                    .nbytes = V * d * DTypeSize(t.dtype)};
    auto table = cpu->PrepareLinear({.tensor = &info});
    ASSERT_TRUE(table.ok()) << table.status();
    std::vector<float> e_cpu(4 * d), e_emu(4 * d), expect(4 * d);
    cpu->Embed(tokens, positions, **table, wpe.data(), Mat(e_cpu.data(), 4, d));
    cuda::LaunchEmbed(tokens, positions, t.data, t.storage, wpe.data(), e_emu.data(), 4, d, d, nullptr);
    EXPECT_EQ(e_emu, e_cpu) << "Embed";
    for (int r = 0; r < 4; ++r) {
      for (int c = 0; c < d; ++c) {
        const int i = tokens[r] * d + c;
        const float w = t.dtype == DType::kF32    ? wte[i]
                        : t.dtype == DType::kBF16 ? Bf16ToF32(bf16[i])
                                                  : F16ToF32(f16[i]);
        ASSERT_EQ(e_cpu[r * d + c], w + wpe[positions[r] * d + c]) << "row " << r << " col " << c;
      }
    }
  }
}

struct Case {
  int heads, head_dim, block_size;
};

// Runs one step on both: the CPU backend's WriteKv + Attention, and the kernels over
// BuildAttentionRows' arrays (what CudaBackend uploads).
void Step(Backend& cpu, const KvSlot& cpu_slot, const KvSlot& emu_slot, const AttentionBatch& batch, int T, int width,
          std::mt19937& rng) {
  std::vector<float> k = Random(T * 3 * width, rng), v = Random(T * 3 * width, rng), q = Random(T * width, rng);
  std::vector<float> out_cpu = Random(T * width, rng);
  std::vector<float> out_emu = out_cpu;
  cpu.WriteKv(Mat(k.data(), T, width, 3 * width), Mat(v.data(), T, width, 3 * width), cpu_slot, batch);
  const float scale = 1.f / std::sqrt(static_cast<float>(emu_slot.head_dim));
  cpu.Attention(Mat(q.data(), T, width), cpu_slot, batch, scale, Mat(out_cpu.data(), T, width));
  std::vector<cuda::AttentionRow> rows;
  std::vector<int32_t> tables;
  ASSERT_LT(cuda::BuildAttentionRows(batch, &rows, &tables), T);
  const int n = static_cast<int>(rows.size());
  const cuda::Storage kv_type = cuda::StorageOf(emu_slot.dtype);
  cuda::LaunchWriteKv(k.data(), 3 * width, v.data(), 3 * width, emu_slot.k, emu_slot.v, kv_type, rows.data(), n,
                      emu_slot.heads, emu_slot.head_dim, emu_slot.block_size, nullptr);
  std::vector<float> out_tiled = out_emu;
  cuda::LaunchAttention(q.data(), width, emu_slot.k, emu_slot.v, kv_type, rows.data(), tables.data(), n, emu_slot.heads,
                        emu_slot.head_dim, emu_slot.block_size, scale, out_emu.data(), width, nullptr);
  testing::ExpectWithinRel(out_emu, out_cpu, 2e-6, "Attention, every row by the per-row kernel");
  // What CudaBackend runs for head_dim <= kMaxTiledHeadDim: tiles of prefill rows + single rows.
  std::vector<cuda::AttentionTile> tiles;
  std::vector<cuda::AttentionRow> singles;
  cuda::BuildAttentionTiles(rows, &tiles, &singles);
  int covered = static_cast<int>(singles.size());
  for (const auto& t : tiles) {
    EXPECT_GE(t.count, 2);
    EXPECT_LE(t.count, cuda::kQueryTile);
    covered += t.count;
  }
  EXPECT_EQ(covered, n);
  cuda::LaunchTiledAttention(q.data(), width, emu_slot.k, emu_slot.v, kv_type, tiles.data(), tables.data(),
                             static_cast<int>(tiles.size()), emu_slot.heads, emu_slot.head_dim, emu_slot.block_size,
                             scale, out_tiled.data(), width, nullptr);
  cuda::LaunchAttention(q.data(), width, emu_slot.k, emu_slot.v, kv_type, singles.data(), tables.data(),
                        static_cast<int>(singles.size()), emu_slot.heads, emu_slot.head_dim, emu_slot.block_size, scale,
                        out_tiled.data(), width, nullptr);
  testing::ExpectWithinRel(out_tiled, out_cpu, 2e-6, "Attention, tiled prefill rows + per-row decode rows");
}

// With a 16-bit cache both round K and V to nearest even when writing (the caches must be
// byte-identical) and widen them exactly when reading, so the outputs agree as closely as with F32.
class CudaKernelsEmulatedKv : public ::testing::TestWithParam<DType> {};

TEST_P(CudaKernelsEmulatedKv, PagedWriteKvAndAttentionMatchTheCpuBackend) {
  auto cpu = Cpu();
  std::mt19937 rng(testing::TestSeed() + 2);
  const DType dtype = GetParam();
  for (const Case c : {Case{1, 1, 1}, Case{2, 3, 5}, Case{3, 17, 16}, Case{1, 113, 7}, Case{2, 64, 16}}) {
    SCOPED_TRACE(::testing::Message() << c.heads << " heads x " << c.head_dim << ", block " << c.block_size);
    const int width = c.heads * c.head_dim, bs = c.block_size;
    const KvLayout layout{.slots = 1, .heads = c.heads, .head_dim = c.head_dim};
    const int blocks = 3 * (170 / bs + 2);
    auto kv_cpu = KvCache::Create(*cpu, layout, {.num_blocks = blocks, .block_size = bs, .dtype = dtype});
    auto kv_emu = KvCache::Create(*cpu, layout, {.num_blocks = blocks, .block_size = bs, .dtype = dtype});
    ASSERT_TRUE(kv_cpu.ok() && kv_emu.ok());
    std::vector<int32_t> ids(blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    const int per = blocks / 3;
    const std::vector<std::vector<int32_t>> tables = {{ids.begin(), ids.begin() + per},
                                                      {ids.begin() + per, ids.begin() + 2 * per},
                                                      {ids.begin() + 2 * per, ids.begin() + 3 * per}};
    // Step 1: history (A none, B 9 tokens, C 150: more than one 128-key tile). Step 2: A prefills
    // 13, B adds a chunk of 4, C decodes 1; the sequences are listed C, A, B, with rows in a
    // different order and one row (the last) that no sequence names.
    const int hist[3] = {0, 9, 150}, add[3] = {13, 4, 1};
    std::vector<AttentionSeq> first;
    int T = 0;
    for (int s = 1; s < 3; ++s) {
      first.push_back({T, hist[s], 0, tables[s].data()});
      T += hist[s];
    }
    Step(*cpu, kv_cpu->slot(0), kv_emu->slot(0), {first, bs}, T, width, rng);
    const std::vector<AttentionSeq> second = {{17, add[2], hist[2], tables[2].data()},
                                              {0, add[0], hist[0], tables[0].data()},
                                              {13, add[1], hist[1], tables[1].data()}};
    Step(*cpu, kv_cpu->slot(0), kv_emu->slot(0), {second, bs}, 19, width, rng);
    const size_t bytes = kv_cpu->slot(0).block_elems() * blocks * DTypeSize(dtype);
    EXPECT_EQ(0, std::memcmp(kv_cpu->slot(0).k, kv_emu->slot(0).k, bytes)) << "K cache";
    EXPECT_EQ(0, std::memcmp(kv_cpu->slot(0).v, kv_emu->slot(0).v, bytes)) << "V cache";
  }
}

INSTANTIATE_TEST_SUITE_P(KvDTypes, CudaKernelsEmulatedKv, ::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                         [](const auto& p) { return std::string(DTypeName(p.param)); });

}  // namespace
}  // namespace kraken::engine
