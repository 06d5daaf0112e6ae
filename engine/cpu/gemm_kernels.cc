// The GEMM kernels and their threaded driver, compiled once per instruction-set level
// (KRAKEN_CPU_ISA); gemm.cc packs the weights and dispatches here.
#include "engine/cpu/gemm.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "engine/cpu/isa_kernels.h"
#include "engine/cpu/simd.h"

namespace kraken::engine::cpu::KRAKEN_CPU_ISA {
namespace {

// A kernel computes an MR-row tile of Y against one group of whole weight panels.
// `a` is the packed tile [K][MR]; `w` the group's first panel, `panel_bytes` apart; `n_valid` the
// columns of Y left from the group's first column (the group may run past the matrix).
// Every output element is a single FMA chain over k in order, then + bias, then added to Y:
// the batch-invariance contract, and the reason every ISA path gives the same bits.
using KernelFn = void (*)(int, const float*, const uint8_t*, size_t, float*, int64_t, int, const float*, bool);

#if KRAKEN_SIMD_AVX2
// AVX2 + FMA: 16 ymm registers. A 6 x 16 tile keeps 12 accumulators, 2 weight vectors and one
// broadcast live (BLIS's Haswell shape); smaller tiles widen to 32 or 64 columns so that at least
// 8 independent FMA chains cover the FMA latency.
constexpr int kMr = 6;
constexpr int kTilesPerChunk = 16;  // 96 rows of packed activations stay in L2 across panels

template <DType T>
inline __m256 LoadW8(const uint8_t* p) {
  if constexpr (T == DType::kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (T == DType::kBF16) {
    return LoadBf16x8(reinterpret_cast<const uint16_t*>(p));
  } else {
    return LoadF16x8(reinterpret_cast<const uint16_t*>(p));
  }
}

// Weight rows a block prefetches ahead of the one it reads.
constexpr int kPrefetchAhead = 16;

// MR rows x NV * 8 columns starting at column `c0` of the panel `w` (c0 = 0 or 16); the columns
// continue into the following panels.
template <DType T, int MR, int NV>
inline void Block(int k_dim, const float* a, const uint8_t* w, size_t panel_bytes, int c0, float* y, int64_t ldc,
                  int n_valid, const float* bias, bool accumulate) {
  constexpr size_t es = DTypeSize(T);
  constexpr size_t k_step = kPanelWidth * es;
  const uint8_t* src[NV];
  for (int v = 0; v < NV; ++v) {
    const int c = c0 + 8 * v;
    src[v] = w + (c / kPanelWidth) * panel_bytes + (c % kPanelWidth) * es;
  }
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int k = 0; k < k_dim; ++k) {
    // Every line of the weight row kPrefetchAhead steps on: a half-panel block alone would touch
    // every other line, a stride the hardware prefetchers follow poorly.
    for (size_t line = 0; line < k_step; line += 64) Prefetch(src[0] + (k + kPrefetchAhead) * k_step + line);
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = LoadW8<T>(src[v] + k * k_step);
    const float* ak = a + static_cast<size_t>(k) * MR;
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ak + r);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, b[v], acc[r][v]);
    }
  }
  // Out of the registers once, with constant indices (a loop that may stop early would make the
  // compiler keep the accumulators in memory through the k loop).
  alignas(32) float tile[MR][NV * 8];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_store_ps(&tile[r][8 * v], acc[r][v]);
  }
  for (int v = 0; v < NV; ++v) {
    const int c = 8 * v;
    const int n = std::min(8, n_valid - c);
    if (n <= 0) break;
    const __m256i mask = _mm256_castps_si256(FirstLanesMask8(n));
    const __m256 bv = bias != nullptr ? _mm256_maskload_ps(bias + c, mask) : _mm256_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      float* yr = y + r * ldc + c;
      __m256 t = _mm256_load_ps(&tile[r][c]);
      if (bias != nullptr) t = _mm256_add_ps(t, bv);
      if (accumulate) t = _mm256_add_ps(_mm256_maskload_ps(yr, mask), t);
      _mm256_maskstore_ps(yr, mask, t);
    }
  }
}

// Columns per block for an MR-row tile: 16 when 12 accumulators fill the registers, wider when
// fewer rows leave room.
constexpr int BlockVectors(int mr) {
  return mr >= 4 ? 2 : (mr >= 2 ? 4 : 8);
}

// Panels a group holds for the first tile's row count (a decode step's single row takes two).
constexpr int PanelsPerCall(int mr) {
  return mr == 1 ? 2 : 1;
}

// MR rows x NP whole panels (NP * 32 columns, of which the first n_valid are stored).
template <DType T, int MR, int NP>
void Kernel(int k_dim, const float* a, const uint8_t* w, size_t panel_bytes, float* y, int64_t ldc, int n_valid,
            const float* bias, bool accumulate) {
  constexpr int nv = std::min(BlockVectors(MR), NP * 4);
  const int cols = std::min(n_valid, NP * kPanelWidth);
  // Blocks may run into the zero padding of the last panel; only valid columns are stored.
  for (int c = 0; c < cols; c += nv * 8) {
    Block<T, MR, nv>(k_dim, a, w, panel_bytes, c, y + c, ldc, n_valid - c, bias ? bias + c : nullptr, accumulate);
  }
}
#else
constexpr int kMr = 12;            // rows per register tile (12 x 32 outputs = 24 accumulators)
constexpr int kTilesPerChunk = 8;  // 96 rows of packed activations stay in L2 across panels

template <DType T>
inline F32x16 LoadW(const uint8_t* p) {
  if constexpr (T == DType::kF32) {
    return F32x16::Load(reinterpret_cast<const float*>(p));
  } else if constexpr (T == DType::kBF16) {
    return F32x16::LoadBf16(reinterpret_cast<const uint16_t*>(p));
  } else {
    return F32x16::LoadF16(reinterpret_cast<const uint16_t*>(p));
  }
}

// A register tile's MR rows x 2 * NP accumulators into Y: (acc + bias), then added to Y when
// accumulating; columns past n_valid dropped. Inlined, so the accumulators stay in registers.
template <int MR, int NP>
[[gnu::always_inline]] inline void StoreTile(const F32x16 (&acc)[MR][2 * NP], float* y, int64_t ldc, int n_valid,
                                             const float* bias, bool accumulate) {
  for (int r = 0; r < MR; ++r) {
    float* yr = y + r * ldc;
    for (int j = 0; j < 2 * NP; ++j) {
      const int c0 = j * 16;
      const int n = std::min(16, n_valid - c0);
      if (n <= 0) break;
      F32x16 t = acc[r][j];
      if (bias != nullptr) t = t + F32x16::LoadPartial(bias + c0, n);
      if (accumulate) t = F32x16::LoadPartial(yr + c0, n) + t;
      t.StorePartial(yr + c0, n);
    }
  }
}

// MR rows x NP panels. `a` is the packed tile [K][MR]; `w` the first panel, `panel_bytes` apart.
// Every accumulator is a single FMA chain over k in order: this is the batch-invariance contract.
template <DType T, int MR, int NP>
void Kernel(int k_dim, const float* a, const uint8_t* w, size_t panel_bytes, float* y, int64_t ldc, int n_valid,
            const float* bias, bool accumulate) {
  constexpr size_t es = DTypeSize(T);
  F32x16 acc[MR][2 * NP];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2 * NP; ++j) acc[r][j] = F32x16::Zero();
  for (int k = 0; k < k_dim; ++k) {
    F32x16 b[2 * NP];
    for (int p = 0; p < NP; ++p) {
      const uint8_t* src = w + p * panel_bytes + static_cast<size_t>(k) * kPanelWidth * es;
      b[2 * p] = LoadW<T>(src);
      b[2 * p + 1] = LoadW<T>(src + 16 * es);
    }
    const float* ak = a + static_cast<size_t>(k) * MR;
    for (int r = 0; r < MR; ++r) {
      const F32x16 av = F32x16::Broadcast(ak[r]);
      for (int j = 0; j < 2 * NP; ++j) acc[r][j] = Fma(av, b[j], acc[r][j]);
    }
  }
  StoreTile<MR, NP>(acc, y, ldc, n_valid, bias, accumulate);
}

// Panels per kernel call for a tile of `mr` rows: small tiles take several panels so enough
// independent FMA chains are in flight; the per-element order is the same either way.
constexpr int PanelsPerCall(int mr) {
  return mr <= 2 ? 4 : (mr <= 4 ? 2 : 1);
}

#endif  // KRAKEN_SIMD_AVX2

template <DType T, int MR>
constexpr KernelFn Pick(int np) {
  if (np == PanelsPerCall(MR)) return &Kernel<T, MR, PanelsPerCall(MR)>;
  return &Kernel<T, MR, 1>;
}

// Kernel for an mr-row tile (1 <= mr <= kMr) and np panels (1 or PanelsPerCall(mr)).
template <DType T, int... I>
KernelFn SelectRows(int mr, int np, std::integer_sequence<int, I...>) {
  KernelFn f = nullptr;
  static_cast<void>(((mr == I + 1 ? (f = Pick<T, I + 1>(np), true) : false) || ...));
  return f;
}

KernelFn SelectKernel(DType t, int mr, int np) {
  constexpr auto rows = std::make_integer_sequence<int, kMr>();
  switch (t) {
    case DType::kBF16:
      return SelectRows<DType::kBF16>(mr, np, rows);
    case DType::kF16:
      return SelectRows<DType::kF16>(mr, np, rows);
    default:
      return SelectRows<DType::kF32>(mr, np, rows);
  }
}

#if KRAKEN_CPU_AMX
// AMX-BF16 for BF16 weights: Y = bf16(X) · W^T with F32 accumulation in tiles. X is rounded to
// BF16 (round to nearest even, as VCVTNEPS2BF16 does) into a [M16][K32] buffer, zero-padded to 16
// rows and 32 columns; the weights were packed pair-interleaved (gemm.h), so each k block of a
// panel is two B tiles as they lie. Every output element is the same TDPBF16PS sequence over k
// blocks in order whatever M is and whichever thread runs it: batch-invariant, but a different
// product from the F32 kernels above (BF16 activations), so the amx level is chosen only when
// asked for.
// Tiles: 0-3 accumulators C[i][j], 4-5 activations A[i], 6-7 weights B[j] (i, j in {0, 1}).
namespace amx_tiles {

constexpr int kTileRows = 16;  // rows of an A or C tile
constexpr int kTileBytes = 1024;
constexpr int kPrefetchBlocks = 4;  // k blocks (2 KiB of weights each) a one-tile-row pass prefetches ahead
constexpr int kChunkRows = 128;     // rows of a work item (four pairs of row tiles)

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline int RoundUp(int v, int to) {
  return (v + to - 1) / to * to;
}

// Every tile 16 rows x 64 bytes. In static storage, whole before any load: GCC 12's
// _tile_loadconfig tells the compiler it reads only the first 8 bytes, so stores to a local
// config's later fields could be dropped as dead.
constexpr TileConfig MakeTileConfig() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = kTileRows;
  }
  return c;
}
constinit const TileConfig kTileConfig = MakeTileConfig();

void ConfigureTiles() {
  _tile_loadconfig(&kTileConfig);
}

// Row tile t (rows 16t..16t+15) of X into the BF16 buffer, one contiguous 1 KiB A tile per k
// block: tile (t, b) at element (t * kp / 32 + b) * 512, its row r holding k = 32b..32b+31 of row
// 16t + r. Rows past m and columns past k are zero.
void ConvertTile(const float* x, int64_t lda, int k, int kp, int t, int m, uint16_t* a) {
  const int blocks = kp / kPairBlock;
  uint16_t* tiles = a + static_cast<size_t>(t) * blocks * (kTileBytes / 2);
  for (int rr = 0; rr < kTileRows; ++rr) {
    const int r = t * kTileRows + rr;
    const float* src = x + r * lda;
    for (int c = 0; c < kp; c += 16) {
      const int n = r < m ? std::max(0, std::min(16, k - c)) : 0;
      const __m512 v = _mm512_maskz_loadu_ps(FirstLanes(n), n > 0 ? src + c : nullptr);
      const __m256bh h = _mm512_cvtneps_pbh(v);
      std::memcpy(tiles + static_cast<size_t>(c / kPairBlock) * (kTileBytes / 2) + rr * kPairBlock + c % kPairBlock, &h,
                  sizeof(h));
    }
  }
}

// C tiles (MT row tiles x 2) of `rows` rows and the panel's 32 columns into Y: (acc + bias), then
// added to Y when accumulating; columns past n_valid dropped.
template <int MT>
void StoreTiles(float* y, int64_t ldc, int rows, int n_valid, const float* bias, bool accumulate) {
  alignas(64) float c[MT][2][kTileRows][16];
  _tile_stored(0, c[0][0], 64);
  _tile_stored(1, c[0][1], 64);
  if constexpr (MT == 2) {
    _tile_stored(2, c[1][0], 64);
    _tile_stored(3, c[1][1], 64);
  }
  for (int j = 0; j < 2; ++j) {
    const int n = std::min(16, n_valid - 16 * j);
    if (n <= 0) break;
    const __mmask16 mask = FirstLanes(n);
    const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      float* yr = y + r * ldc + 16 * j;
      __m512 t = _mm512_load_ps(c[r / kTileRows][j][r % kTileRows]);
      if (bias != nullptr) t = _mm512_add_ps(t, bv);
      if (accumulate) t = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, yr), t);
      _mm512_mask_storeu_ps(yr, mask, t);
    }
  }
}

// MT (1 or 2) row tiles of A (from its first row) against one panel, over all k blocks.
template <int MT>
void TileKernel(const uint16_t* a, int kp, const uint8_t* panel, float* y, int64_t ldc, int rows, int n_valid,
                const float* bias, bool accumulate) {
  const size_t next_tile = static_cast<size_t>(kp / kPairBlock) * (kTileBytes / 2);  // elements
  // GCC 12's _tile_loadd declares no memory read: the A tiles' stores must not move past it.
  asm volatile("" ::: "memory");
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (MT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int kb = 0; kb < kp / kPairBlock; ++kb) {
    const uint8_t* b = panel + static_cast<size_t>(kb) * 2 * kTileBytes;
    if constexpr (MT == 1) {
      // A decode step streams the weights once: ask for the block kPrefetchBlocks ahead.
      for (int line = 0; line < 2 * kTileBytes; line += 64) Prefetch(b + kPrefetchBlocks * 2 * kTileBytes + line);
    }
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + kTileBytes, 64);
    _tile_loadd(4, a + static_cast<size_t>(kb) * (kTileBytes / 2), 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) {
      _tile_loadd(5, a + next_tile + static_cast<size_t>(kb) * (kTileBytes / 2), 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  StoreTiles<MT>(y, ldc, rows, n_valid, bias, accumulate);
}

size_t ScratchFloats(int m, int k) {
  return static_cast<size_t>(RoundUp(m, kTileRows)) * RoundUp(k, kPairBlock) / 2;
}

void Gemm(const float* x, int m, int64_t lda, const PackedMatrix& w, const float* bias, float* y, int64_t ldc,
          bool accumulate, float* scratch) {
  const int k = w.in(), kp = RoundUp(k, kPairBlock), mp = RoundUp(m, kTileRows);
  uint16_t* a = reinterpret_cast<uint16_t*>(scratch);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int t = 0; t < mp / kTileRows; ++t) ConvertTile(x, lda, k, kp, t, m, a);
    ConfigureTiles();
    // Work items: one panel x one chunk of rows, panel-major, so a thread's share is a run of
    // whole panels (each weight panel read from memory once) when there are more panels than
    // threads, and many threads still find work on a narrow matrix.
    const int chunks = (m + kChunkRows - 1) / kChunkRows;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < static_cast<int64_t>(w.panels()) * chunks; ++item) {
      const int p = static_cast<int>(item / chunks), chunk = static_cast<int>(item % chunks);
      const int n_valid = w.out() - p * kPanelWidth;
      const float* bp = bias != nullptr ? bias + p * kPanelWidth : nullptr;
      for (int r0 = chunk * kChunkRows; r0 < std::min(m, (chunk + 1) * kChunkRows); r0 += 2 * kTileRows) {
        float* yp = y + r0 * ldc + p * kPanelWidth;
        const uint16_t* ap = a + static_cast<size_t>(r0) * kp;  // tile r0 / 16: r0 * kp elements in
        const int rows = std::min(2 * kTileRows, m - r0);
        if (rows > kTileRows) {
          TileKernel<2>(ap, kp, w.panel(p), yp, ldc, rows, n_valid, bp, accumulate);
        } else {
          TileKernel<1>(ap, kp, w.panel(p), yp, ldc, rows, n_valid, bp, accumulate);
        }
      }
    }
    _tile_release();
  }
}

}  // namespace amx_tiles
#endif  // KRAKEN_CPU_AMX

#if KRAKEN_CPU_BF16DOT
// AVX512-BF16 for BF16 weights: Y = bf16(X) · W^T with F32 accumulation, VDPBF16PS adding one k
// pair's two products to 16 outputs per instruction (Intel SDM, "VDPBF16PS"). X is rounded to
// BF16 (round to nearest even, VCVTNE2PS2BF16) into row tiles of kMr rows laid [K/2][kMr] pairs,
// K zero-padded to a multiple of 32; the weights are packed pair-interleaved (gemm.h), whose tile
// row q of k block b is exactly the operand VDPBF16PS reads for k pair 16b + q. Every output
// element is the same VDPBF16PS chain over the k pairs in order whatever M is and whichever thread
// runs it: batch-invariant, but a different product from the F32 kernels (BF16 activations), so
// the avx512bf16 level is chosen only when asked for.
namespace dot_bf16 {

constexpr int kPrefetchBlocks = 2;  // k blocks (2 KiB of a panel each) the kernel prefetches ahead

// K pairs of a row, K padded to a whole pair-interleaved block.
inline int PairsOf(int k) {
  return (k + kPairBlock - 1) / kPairBlock * (kPairBlock / 2);
}

// Rows r0 .. r0 + mr of X as [PairsOf(k)][mr] BF16 pairs (the low half the even k).
void PackTile(const float* x, int64_t lda, int k, int r0, int mr, uint32_t* dst) {
  const int pairs = PairsOf(k);
  for (int r = 0; r < mr; ++r) {
    const float* src = x + (r0 + r) * lda;
    for (int c = 0; c < 2 * pairs; c += 32) {
      const int lo = std::clamp(k - c, 0, 16), hi = std::clamp(k - c - 16, 0, 16);
      const __m512 vlo = _mm512_maskz_loadu_ps(FirstLanes(lo), lo > 0 ? src + c : src);
      const __m512 vhi = _mm512_maskz_loadu_ps(FirstLanes(hi), hi > 0 ? src + c + 16 : src);
      alignas(64) uint32_t p[16];
      _mm512_store_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(vhi, vlo)));
      for (int i = 0; i < 16; ++i) dst[static_cast<size_t>(c / 2 + i) * mr + r] = p[i];
    }
  }
}

// MR rows x NP panels over `pairs` k pairs; `a` is the tile's [pairs][MR] BF16 pairs (passed as
// floats through KernelFn).
template <int MR, int NP>
void Kernel(int pairs, const float* a_floats, const uint8_t* w, size_t panel_bytes, float* y, int64_t ldc, int n_valid,
            const float* bias, bool accumulate) {
  const uint32_t* a = reinterpret_cast<const uint32_t*>(a_floats);
  F32x16 acc[MR][2 * NP];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 2 * NP; ++j) acc[r][j] = F32x16::Zero();
  for (int kb = 0; kb < pairs / (kPairBlock / 2); ++kb) {
    const uint8_t* block = w + static_cast<size_t>(kb) * 2 * 1024;
    for (int q = 0; q < kPairBlock / 2; ++q) {
      __m512bh b[2 * NP];
      for (int p = 0; p < NP; ++p) {
        const uint8_t* src = block + p * panel_bytes + q * 64;
        // The two tiles of a block are two streams that jump 1 KiB at every block: the hardware
        // prefetchers lose them, so each step asks for its lines kPrefetchBlocks blocks ahead.
        Prefetch(src + kPrefetchBlocks * 2 * 1024);
        Prefetch(src + kPrefetchBlocks * 2 * 1024 + 1024);
        b[2 * p] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(src));
        b[2 * p + 1] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(src + 1024));
      }
      const uint32_t* ak = a + static_cast<size_t>(kb * (kPairBlock / 2) + q) * MR;
      for (int r = 0; r < MR; ++r) {
        const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(ak[r])));
        for (int j = 0; j < 2 * NP; ++j) acc[r][j].v = _mm512_dpbf16_ps(acc[r][j].v, av, b[j]);
      }
    }
  }
  StoreTile<MR, NP>(acc, y, ldc, n_valid, bias, accumulate);
}

template <int MR>
constexpr KernelFn Pick(int np) {
  if (np == PanelsPerCall(MR)) return &Kernel<MR, PanelsPerCall(MR)>;
  return &Kernel<MR, 1>;
}

template <int... I>
KernelFn SelectRows(int mr, int np, std::integer_sequence<int, I...>) {
  KernelFn f = nullptr;
  static_cast<void>(((mr == I + 1 ? (f = Pick<I + 1>(np), true) : false) || ...));
  return f;
}

}  // namespace dot_bf16
#endif  // KRAKEN_CPU_BF16DOT

// The threaded driver of the register-tile kernels: X in row tiles of kMr rows, each packed by
// `pack(r0, mr, dst)` into `tile_floats` floats, then every (panel group, row chunk) work item
// runs `kernel_for(mr, np)(k_arg, tile, ...)`.
template <class PackFn, class KernelFor>
void RunTiles(int m, int k_arg, size_t tile_floats, const PackedMatrix& w, const float* bias, float* y, int64_t ldc,
              bool accumulate, float* packed, PackFn pack, KernelFor kernel_for) {
  const int tiles = (m + kMr - 1) / kMr;
  const int chunks = (tiles + kTilesPerChunk - 1) / kTilesPerChunk;
  const int np = PanelsPerCall(std::min(m, kMr));
  const int groups = (w.panels() + np - 1) / np;
  const int64_t items = static_cast<int64_t>(chunks) * groups;
  const size_t panel_bytes = w.panels() > 1 ? static_cast<size_t>(w.panel(1) - w.panel(0)) : 0;

#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int t = 0; t < tiles; ++t) {
      const int r0 = t * kMr;
      pack(r0, std::min(kMr, m - r0), packed + static_cast<size_t>(t) * tile_floats);
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      // Panel-major: a thread's share is a run of whole panel groups with every row chunk, so
      // threads get equal work even when the last chunk is short, and each packed weight panel
      // is read once from memory.
      const int g = static_cast<int>(item / chunks), chunk = static_cast<int>(item % chunks);
      const int t_end = std::min(tiles, (chunk + 1) * kTilesPerChunk);
      for (int t = chunk * kTilesPerChunk; t < t_end; ++t) {
        const int r0 = t * kMr, mr = std::min(kMr, m - r0);
        const float* a = packed + static_cast<size_t>(t) * tile_floats;
        const int p0 = g * np, p_end = std::min(w.panels(), p0 + np);
        if (p_end - p0 == np) {
          kernel_for(mr, np)(k_arg, a, w.panel(p0), panel_bytes, y + r0 * ldc + p0 * kPanelWidth, ldc,
                             w.out() - p0 * kPanelWidth, bias ? bias + p0 * kPanelWidth : nullptr, accumulate);
        } else {
          for (int p = p0; p < p_end; ++p) {
            kernel_for(mr, 1)(k_arg, a, w.panel(p), panel_bytes, y + r0 * ldc + p * kPanelWidth, ldc,
                              w.out() - p * kPanelWidth, bias ? bias + p * kPanelWidth : nullptr, accumulate);
          }
        }
      }
    }
  }
}

}  // namespace

size_t GemmScratchFloats(int m, int k) {
  const size_t tiles = static_cast<size_t>((m + kMr - 1) / kMr);
  size_t floats = tiles * kMr * k;
#if KRAKEN_CPU_BF16DOT
  floats = std::max(floats, tiles * kMr * dot_bf16::PairsOf(k));
#endif
#if KRAKEN_CPU_AMX
  floats = std::max(floats, amx_tiles::ScratchFloats(m, k));
#endif
  return floats;
}

void Gemm(const float* x, int m, int64_t lda, const PackedMatrix& w, const float* bias, float* y, int64_t ldc,
          bool accumulate, float* packed) {
  if (m <= 0 || w.out() == 0) return;
#if KRAKEN_CPU_AMX
  if (w.pairs()) {
    amx_tiles::Gemm(x, m, lda, w, bias, y, ldc, accumulate, packed);
    return;
  }
#endif
  const int k_dim = w.in();
#if KRAKEN_CPU_BF16DOT
  if (w.pairs()) {
    const int pairs = dot_bf16::PairsOf(k_dim);
    RunTiles(
        m, pairs, static_cast<size_t>(kMr) * pairs, w, bias, y, ldc, accumulate, packed,
        [&](int r0, int mr, float* dst) {
          dot_bf16::PackTile(x, lda, k_dim, r0, mr, reinterpret_cast<uint32_t*>(dst));
        },
        [](int mr, int np) { return dot_bf16::SelectRows(mr, np, std::make_integer_sequence<int, kMr>()); });
    return;
  }
#endif
  // Tile t holds rows [12t, 12t + mr) as [K][mr].
  RunTiles(
      m, k_dim, static_cast<size_t>(kMr) * k_dim, w, bias, y, ldc, accumulate, packed,
      [&](int r0, int mr, float* dst) {
        for (int r = 0; r < mr; ++r) {
          const float* src = x + (r0 + r) * lda;
          for (int k = 0; k < k_dim; ++k) dst[static_cast<size_t>(k) * mr + r] = src[k];
        }
      },
      [&](int mr, int np) { return SelectKernel(w.dtype(), mr, np); });
}

}  // namespace kraken::engine::cpu::KRAKEN_CPU_ISA
