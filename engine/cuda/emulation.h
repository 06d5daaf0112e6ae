// A host-side emulation of the small part of CUDA that engine/cuda/kernels.cu uses, so the very
// same kernel source compiles with the host compiler and runs on the CPU in tests
// (tests/engine/cuda_kernels_emulated_test.cc) on machines without a GPU, under AddressSanitizer
// too. Defined when KRAKEN_CUDA_EMULATION is set; never part of a real build.
//
// Model: a launch runs its thread blocks one after another; the blockDim.x threads of a block are
// OS threads. __syncthreads is a barrier over the block, __shfl_xor_sync exchanges values through
// a per-warp slot array between two warp barriers, __shared__ variables are function statics
// (one block at a time uses them) and dynamic shared memory is a per-launch buffer. Only 1-D
// thread blocks and 2-D grids are supported: what the kernels use.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace kraken::engine::cuda::emu {

struct BlockState {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> shuffle;          // one slot per thread
  std::vector<unsigned char> dynamic;  // dynamic shared memory
};

inline thread_local dim3 tl_thread_idx, tl_block_idx, tl_block_dim, tl_grid_dim;
inline thread_local BlockState* tl_block = nullptr;

/// Runs kernel(args...) over `grid` x `block` threads (block.y = block.z = 1).
template <typename Kernel, typename... Args>
void Launch(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  const unsigned threads = block.x;
  BlockState state;
  state.block_barrier = std::make_unique<std::barrier<>>(threads);
  for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
    const unsigned in_warp = std::min(32u, threads - 32 * w);
    state.warp_barriers.push_back(std::make_unique<std::barrier<>>(in_warp));
  }
  state.shuffle.resize(threads);
  state.dynamic.resize(shared_bytes + 16);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      tl_block = &state;
      tl_thread_idx = dim3(t);
      tl_block_dim = block;
      tl_grid_dim = grid;
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          tl_block_idx = dim3(bx, by);
          kernel(args...);
          state.block_barrier->arrive_and_wait();  // the next block reuses shared memory
        }
      }
    });
  }
  for (auto& th : pool) th.join();
}

inline void SyncThreads() {
  tl_block->block_barrier->arrive_and_wait();
}

inline float ShflXor(float v, int lane_mask) {
  BlockState& b = *tl_block;
  const unsigned t = tl_thread_idx.x, warp = t / 32;
  b.shuffle[t] = v;
  b.warp_barriers[warp]->arrive_and_wait();
  const float other = b.shuffle[warp * 32 + ((t % 32) ^ static_cast<unsigned>(lane_mask))];
  b.warp_barriers[warp]->arrive_and_wait();  // slots may be rewritten by the next exchange
  return other;
}

template <typename T>
T* DynamicShared() {
  return reinterpret_cast<T*>(tl_block->dynamic.data());
}

}  // namespace kraken::engine::cuda::emu

#define threadIdx (::kraken::engine::cuda::emu::tl_thread_idx)
#define blockIdx (::kraken::engine::cuda::emu::tl_block_idx)
#define blockDim (::kraken::engine::cuda::emu::tl_block_dim)
#define gridDim (::kraken::engine::cuda::emu::tl_grid_dim)
#define __global__
#define __device__
#define __syncthreads() ::kraken::engine::cuda::emu::SyncThreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::kraken::engine::cuda::emu::ShflXor((v), (lane_mask))
// Static shared arrays: one block runs at a time, and every thread must see the same array.
#define KRAKEN_SHARED static
#define KRAKEN_DYNAMIC_SHARED(type, name) type* name = ::kraken::engine::cuda::emu::DynamicShared<type>()
#define KRAKEN_LAUNCH(kernel, grid, block, shared, stream, ...) \
  ::kraken::engine::cuda::emu::Launch(kernel, dim3(grid), dim3(block), (shared), __VA_ARGS__)

using std::min;
inline float fmaxf(float a, float b) {
  return std::fmax(a, b);
}

// 16-bit floats: storage types and round-to-nearest-even conversions, as cuda_bf16.h/cuda_fp16.h.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  _Float16 value;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fff};  // CUDA's canonical NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline __half __float2half_rn(float f) {
  if (std::isnan(f)) {  // CUDA's canonical NaN, 0x7fff
    const uint16_t bits = 0x7fff;
    __half h;
    std::memcpy(&h.value, &bits, 2);
    return h;
  }
  return {static_cast<_Float16>(f)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __half2float(__half h) {
  return static_cast<float>(h.value);
}
