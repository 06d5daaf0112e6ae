// CUDA kernels behind CudaBackend (engine/cuda/cuda_backend.cc), declared as plain C++ launchers
// so the backend itself compiles with the host compiler. Every launcher enqueues on `stream` and
// returns at once; errors surface at the next CUDA call on that stream (the backend checks
// cudaGetLastError after each launch and at Synchronize).
//
// Matrices are row-major F32 with a row stride in elements, as engine::Mat. All pointers are
// device pointers unless a name says otherwise.
#pragma once

#ifdef KRAKEN_CUDA_EMULATION
using cudaStream_t = struct CUstream_st*;  // engine/cuda/emulation.h: launches ignore streams
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <vector>

#ifndef __CUDACC__  // nvcc builds kernels.cu as C++17; engine/batch.h needs C++20 (std::span)
#include "engine/batch.h"
#include "engine/dtype.h"
#endif

// The emulated build (engine/cuda/emulation.h) puts the same functions in an inline namespace of
// their own, so a test binary can hold them beside the real ones.
#ifdef KRAKEN_CUDA_EMULATION
#define KRAKEN_CUDA_NAMESPACE_BEGIN \
  namespace kraken::engine::cuda {  \
  inline namespace emulated {
#define KRAKEN_CUDA_NAMESPACE_END \
  }                               \
  }
#else
#define KRAKEN_CUDA_NAMESPACE_BEGIN namespace kraken::engine::cuda {
#define KRAKEN_CUDA_NAMESPACE_END }
#endif

KRAKEN_CUDA_NAMESPACE_BEGIN

/// Element type of a matrix the kernels read in its stored form (a weight, or the KV cache).
enum class Storage : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

/// Per query row of a step, what the attention kernel needs: its sequence's block table (an
/// offset into the flattened tables of the step) and its absolute position (it sees keys
/// 0 .. position).
struct AttentionRow {
  int32_t row = 0;  // row of the step's activations (AttentionSeq::token_begin + i)
  int32_t position = 0;
  int32_t table_offset = 0;
  int32_t slot = 0;  // physical KV token slot: block * block_size + offset
};

/// Up to kQueryTile consecutive new tokens of one sequence: rows row0 .. row0 + count - 1 at
/// positions position0 .. position0 + count - 1, sharing a block table.
struct AttentionTile {
  int32_t row0 = 0;
  int32_t position0 = 0;
  int32_t table_offset = 0;
  int32_t count = 0;
};
inline constexpr int kQueryTile = 16;  // query rows per tile
inline constexpr int kKeyTile = 16;    // keys loaded to shared memory at a time

/// Shared memory the tiled attention kernel needs for `head_dim`, in bytes.
constexpr size_t TiledAttentionSharedBytes(int head_dim) {
  // q and the accumulators [tile][head_dim], K [keys][head_dim + 1] (padded against bank
  // conflicts), V [keys][head_dim], probabilities [tile][keys], per-row correction and sum.
  return (static_cast<size_t>(2 * kQueryTile + 2 * kKeyTile) * head_dim + kKeyTile + kQueryTile * kKeyTile +
          2 * kQueryTile) *
         sizeof(float);
}
/// Largest head_dim the tiled kernel takes within the 48 KB of shared memory every GPU allows
/// without opting in; larger heads use the per-row kernel.
inline constexpr int kMaxTiledHeadDim = 184;
static_assert(TiledAttentionSharedBytes(kMaxTiledHeadDim) <= 48 * 1024);

#ifndef __CUDACC__
/// The Storage of an F32, BF16 or F16 tensor (anything else reads as F32: callers pass only those).
inline Storage StorageOf(DType t) {
  return t == DType::kBF16 ? Storage::kBF16 : t == DType::kF16 ? Storage::kF16 : Storage::kF32;
}

/// The host arrays the KV-write and attention kernels read for `batch`: one AttentionRow per new
/// token, in batch order, and the used part of every sequence's block table, concatenated.
/// Returns the largest activation row named (-1 for none).
inline int BuildAttentionRows(const AttentionBatch& batch, std::vector<AttentionRow>* rows,
                              std::vector<int32_t>* tables) {
  rows->clear();
  tables->clear();
  int max_row = -1;
  const int bs = batch.block_size;
  for (const AttentionSeq& s : batch.seqs) {
    const int32_t offset = static_cast<int32_t>(tables->size());
    const int32_t used = (s.start_pos + s.num_tokens + bs - 1) / bs;
    tables->insert(tables->end(), s.block_table, s.block_table + used);
    for (int32_t i = 0; i < s.num_tokens; ++i) {
      const int32_t pos = s.start_pos + i;
      rows->push_back({s.token_begin + i, pos, offset, s.block_table[pos / bs] * bs + pos % bs});
      if (s.token_begin + i > max_row) max_row = s.token_begin + i;
    }
  }
  return max_row;
}

/// Splits `rows` (BuildAttentionRows' order: each sequence's tokens consecutive) into tiles of up
/// to kQueryTile consecutive tokens of one sequence for the tiled kernel, and single rows
/// (decode tokens, and sequences adding one token) for the per-row kernel.
inline void BuildAttentionTiles(const std::vector<AttentionRow>& rows, std::vector<AttentionTile>* tiles,
                                std::vector<AttentionRow>* singles) {
  tiles->clear();
  singles->clear();
  size_t i = 0;
  while (i < rows.size()) {
    size_t n = 1;
    while (i + n < rows.size() && n < static_cast<size_t>(kQueryTile) &&
           rows[i + n].table_offset == rows[i].table_offset &&
           rows[i + n].row == rows[i].row + static_cast<int32_t>(n) &&
           rows[i + n].position == rows[i].position + static_cast<int32_t>(n)) {
      ++n;
    }
    if (n == 1) {
      singles->push_back(rows[i]);
    } else {
      tiles->push_back({rows[i].row, rows[i].position, rows[i].table_offset, static_cast<int32_t>(n)});
    }
    i += n;
  }
}
#endif

/// out[t, :] = wte[tokens[t], :] + wpe[positions[t], :]  for t < rows; wte [V, cols] row-major
/// in `wte_type` (widened exactly to F32), wpe [P, cols] F32.
void LaunchEmbed(const int32_t* tokens, const int32_t* positions, const void* wte, Storage wte_type, const float* wpe,
                 float* out, int rows, int cols, int64_t out_stride, cudaStream_t stream);

/// y = (x - mean) / sqrt(var + eps) * w (+ b) per row, two-pass mean and biased variance (the CPU
/// backend's definition). One thread block per row; y may alias x. b may be null.
void LaunchLayerNorm(const float* x, int64_t x_stride, const float* w, const float* b, float eps, float* y,
                     int64_t y_stride, int rows, int cols, cudaStream_t stream);

/// x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in place.
void LaunchGeluTanh(float* x, int64_t stride, int rows, int cols, cudaStream_t stream);

/// out = a + b (out may alias a or b).
void LaunchAdd(const float* a, int64_t a_stride, const float* b, int64_t b_stride, float* out, int64_t out_stride,
               int rows, int cols, cudaStream_t stream);

/// dst[i, :] = src[rows[i], :] for i < n (rows: device array).
void LaunchGatherRows(const float* src, int64_t src_stride, const int32_t* rows, float* dst, int64_t dst_stride, int n,
                      int cols, cudaStream_t stream);

/// y[r, :] = bias (assign) or y[r, :] += bias (accumulate), for every row r < rows.
void LaunchBiasRows(const float* bias, float* y, int64_t y_stride, int rows, int cols, bool accumulate,
                    cudaStream_t stream);

/// Converts x [rows, cols] (row stride x_stride) to a contiguous [rows, cols] matrix of bf16
/// (when `bf16`) or IEEE half at `out`, rounding to nearest even.
void LaunchToHalf(const float* x, int64_t x_stride, int rows, int cols, void* out, bool bf16, cudaStream_t stream);

/// For each of the n entries: stores row rows[i].row of k and v ([*, heads * head_dim], head-major
/// columns) at physical token slot rows[i].slot of the paged cache: K blocks are
/// [heads][head_dim][block_size], V blocks [heads][block_size][head_dim], elements of `kv_type`
/// (16-bit: rounded to nearest even).
void LaunchWriteKv(const float* k, int64_t k_stride, const float* v, int64_t v_stride, void* k_cache, void* v_cache,
                   Storage kv_type, const AttentionRow* rows, int n, int heads, int head_dim, int block_size,
                   cudaStream_t stream);

/// Causal attention for tiles of query rows (prefill and chunked prefill): one thread block per
/// (tile, head) loads kKeyTile keys and values at a time into shared memory and applies them to
/// all of the tile's rows, with the same online softmax as LaunchAttention, so K and V are read
/// once per tile instead of once per row. head_dim <= kMaxTiledHeadDim. Cache entries of
/// `kv_type` are widened exactly to F32 as they are loaded.
void LaunchTiledAttention(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache, Storage kv_type,
                          const AttentionTile* tiles, const int32_t* tables, int n, int heads, int head_dim,
                          int block_size, float scale, float* out, int64_t out_stride, cudaStream_t stream);

/// Causal attention over the paged cache, for each of the n entries: query row rows[i].row and
/// head h attend to keys 0 .. rows[i].position through the block table at
/// tables + rows[i].table_offset; rows no entry names are left untouched. One thread
/// block per (row, head) walks the keys in tiles of 128 with the online-softmax rescaling of
/// FlashAttention (Dao et al. 2022, Alg. 1), so any head size works and no [T, L] score matrix
/// exists. q, out: [T, heads * head_dim]; cache entries of `kv_type` are widened exactly to F32.
void LaunchAttention(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache, Storage kv_type,
                     const AttentionRow* rows, const int32_t* tables, int n, int heads, int head_dim, int block_size,
                     float scale, float* out, int64_t out_stride, cudaStream_t stream);

KRAKEN_CUDA_NAMESPACE_END
