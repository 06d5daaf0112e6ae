// Paged causal attention on the CPU: KV writes and the attention itself, for prefill chunks and
// decode tokens alike, any head size (113, 209, ...), any block size, with an F32, BF16 or F16
// KV cache (16-bit entries are widened exactly on load; scores, softmax and sums stay F32).
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "engine/cpu/isa_kernels.h"
#include "engine/cpu/simd.h"

namespace kraken::engine::cpu::KRAKEN_CPU_ISA {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// How each KV dtype is read and written: loads widen exactly to F32, stores round to nearest even.
struct KvF32 {
  using T = float;
  static F32x16 Load(const T* p) { return F32x16::Load(p); }
  static F32x16 LoadPartial(const T* p, int n) { return F32x16::LoadPartial(p, n); }
  static T From(float x) { return x; }
};
template <bool kBf16>
struct Kv16 {
  using T = uint16_t;
  static F32x16 Load(const T* p) { return kBf16 ? F32x16::LoadBf16(p) : F32x16::LoadF16(p); }
  /// The first `n` entries, zero (in either format) elsewhere; never reads past p + n.
  static F32x16 LoadPartial(const T* p, int n) {
    if (n >= kLanes) return Load(p);
    T lanes[kLanes] = {};
    std::memcpy(lanes, p, sizeof(T) * static_cast<size_t>(n));
    return Load(lanes);
  }
  static T From(float x) { return kBf16 ? F32ToBf16(x) : F32ToF16(x); }
};
using KvBf16 = Kv16<true>;
using KvF16 = Kv16<false>;

// Calls f(Kv{}) with the Kv of `dtype` (F32, BF16 or F16: the dispatcher in dispatch.cc has
// checked it).
template <typename F>
void WithKv(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBF16:
      return f(KvBf16{});
    case DType::kF16:
      return f(KvF16{});
    default:
      return f(KvF32{});
  }
}

// Attention for one (sequence, head, query tile). Each row keeps its own running max `m`, sum `l`
// and output accumulator, and visits blocks 0 .. pos / bs in order; a block wholly after the
// row's position is skipped, so the row computes exactly what it would compute alone.
// acc[r] = sum_e qt[e][r] * k[e][0..lanes) for one block's keys (k: [dh][stride] transposed),
// one FMA chain per (row, key) in e order. Its own function so that the accumulators live in
// registers. With kPrefetch (block size 16: a head's K or V block is dh cache lines of F32, dh / 2
// of a 16-bit cache, whose lines are then each prefetched twice), each step
// also prefetches one line of `v_pf` and of `k_pf`.
template <int rows, int r0, int n, bool kPrefetch, typename Kv>
[[gnu::noinline]] void Scores(const float* qt, const typename Kv::T* k, int dh, int stride, int lanes,
                              const typename Kv::T* v_pf, const typename Kv::T* k_pf, F32x16* out) {
  F32x16 acc[n];
  for (F32x16& a : acc) a = F32x16::Zero();
  for (int e = 0; e < dh; ++e) {
    if constexpr (kPrefetch && r0 == 0) {
      Prefetch(v_pf + e * kLanes);
      if (k_pf != nullptr) Prefetch(k_pf + e * kLanes);
    }
    const F32x16 kv =
        kPrefetch ? Kv::Load(k + e * kLanes) : Kv::LoadPartial(k + static_cast<int64_t>(e) * stride, lanes);
    const float* qe = qt + e * rows + r0;
    for (int r = 0; r < n; ++r) acc[r] = Fma(F32x16::Broadcast(qe[r]), kv, acc[r]);
  }
  for (int r = 0; r < n; ++r) out[r0 + r] = acc[r];
}

// Rows of a tile whose accumulators are kept in registers at once: all 16 in AVX-512's 32
// registers; 6 (12 registers) in AVX2's 16, where more would spill to memory on every step.
// Each row's arithmetic is the same either way.
#if KRAKEN_SIMD_AVX2
inline constexpr int kRowGroup = 6;
#else
inline constexpr int kRowGroup = kQueryTile;
#endif

// Calls f.template operator()<r0, n>() for consecutive row groups [r0, r0 + n) covering 0..rows.
template <int rows, int r0 = 0, typename F>
inline void ForRowGroups(F&& f) {
  if constexpr (r0 < rows) {
    constexpr int n = std::min(kRowGroup, rows - r0);
    f.template operator()<r0, n>();
    ForRowGroups<rows, r0 + n>(f);
  }
}

// Step 2 of AttendTile for one key block: each row's online softmax update (its new maximum
// `m`, the rescale factor `corr` of what it accumulated so far, the probabilities in place of
// the scores in `p`, the running sum `l`). A row that sees no key of the block is left alone.
template <int rows>
[[gnu::always_inline]] inline void SoftmaxUpdate(float* p, int padded_bs, int chunks, const int* visible, float* m,
                                                 float* l, float* corr) {
  for (int r = 0; r < rows; ++r) {
    if (visible[r] == 0) continue;
    float* pr = p + r * padded_bs;
    F32x16 mx = F32x16::Load(pr);
    for (int c = 1; c < chunks; ++c) mx = Max(mx, F32x16::Load(pr + c * kLanes));
    const float m_new = std::max(m[r], mx.ReduceMax());
    corr[r] = std::exp(m[r] - m_new);
    const F32x16 vm = F32x16::Broadcast(m_new);
    F32x16 sum = F32x16::Zero();
    for (int c = 0; c < chunks; ++c) {
      const F32x16 e = Exp(F32x16::Load(pr + c * kLanes) - vm);
      e.Store(pr + c * kLanes);
      sum = sum + e;
    }
    l[r] = l[r] * corr[r] + sum.ReduceAdd();
    m[r] = m_new;
  }
}

// Step 3 for n rows and one slice of 16 output columns: o_i = o_i * corr_i + sum_j p_ij v_j over
// the keys row i sees, j in order (`v`: the slice's first column in the block's V, row stride dh;
// `p`, `visible`, `corr`, `o`: the group's first row). Its own function so that the p_ij broadcasts
// are made in the FMAs: inlined, the compiler hoists all n x bs of them out of the slice loop and
// parks them on the stack. kPadded: the score-row stride when fixed (16 for the default block
// size, so that one base register addresses every row's scores), 0 when `padded_bs` gives it.
template <int n, int kPadded, typename Kv>
[[gnu::noinline]] void AccumulateSlice(const typename Kv::T* v, const float* p, int padded_bs_runtime, int dh, int bs,
                                       int lanes, const int* visible, const float* corr, float* o) {
  const int padded_bs = kPadded != 0 ? kPadded : padded_bs_runtime;
  F32x16 acc[n];
#pragma GCC unroll 16
  for (int i = 0; i < n; ++i) {
    acc[i] = visible[i] == 0 ? F32x16::Zero() : F32x16::LoadPartial(o + i * dh, lanes) * F32x16::Broadcast(corr[i]);
  }
  if (visible[0] == bs) {
    for (int j = 0; j < bs; ++j) {
      const F32x16 vv = Kv::LoadPartial(v + static_cast<int64_t>(j) * dh, lanes);
#pragma GCC unroll 16
      for (int i = 0; i < n; ++i) acc[i] = Fma(F32x16::Broadcast(p[i * padded_bs + j]), vv, acc[i]);
    }
  } else {
    for (int j = 0; j < visible[n - 1]; ++j) {
      const F32x16 vv = Kv::LoadPartial(v + static_cast<int64_t>(j) * dh, lanes);
#pragma GCC unroll 16
      for (int i = 0; i < n; ++i) {
        if (j < visible[i]) acc[i] = Fma(F32x16::Broadcast(p[i * padded_bs + j]), vv, acc[i]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < n; ++i) {
    if (visible[i] != 0) acc[i].StorePartial(o + i * dh, lanes);
  }
}

// Step 3 of AttendTile for one key block: o_r = o_r * corr_r + sum_j p_rj v_j over the keys row r
// sees, j in order (`vb`: the block's V, [bs][dh]). Row 0 has the earliest position, so when it
// sees the whole block every row does (the common case, without per-key masks).
template <int rows, int kPadded, typename Kv>
[[gnu::always_inline]] inline void AccumulateValues(const typename Kv::T* vb, const float* p, int padded_bs, int dh,
                                                    int bs, const int* visible, const float* corr, float* o) {
  for (int e0 = 0; e0 < dh; e0 += kLanes) {
    const int lanes = std::min(kLanes, dh - e0);
    ForRowGroups<rows>([&]<int r0, int n>() {
      AccumulateSlice<n, kPadded, Kv>(vb + e0, p + r0 * padded_bs, padded_bs, dh, bs, lanes, visible + r0, corr + r0,
                                      o + r0 * dh + e0);
    });
  }
}

// `o`: kQueryTile x head_dim scratch; `p`: kQueryTile x padded block scratch. The row count is a
// template parameter so the per-row accumulators stay in registers; every row executes the same
// operations whatever the count, which keeps results independent of the tiling.
// `qt`: head_dim x kQueryTile scratch for the queries, transposed so that one base register
// addresses every row's element. kBlock16 fixes the score-row stride at 16 for the default block
// size, for the same reason.
template <int rows, bool kBlock16, typename Kv>
void AttendTile(Mat q, const KvSlot& slot, const AttentionTile& t, float scale, Mat out, float* o, float* p, float* qt,
                int padded_bs_runtime) {
  const int padded_bs = kBlock16 ? kLanes : padded_bs_runtime;
  const int dh = slot.head_dim, bs = slot.block_size;
  using T = typename Kv::T;
  const int64_t bf = slot.block_elems();
  const T* const k_pool = static_cast<const T*>(slot.k);
  const T* const v_pool = static_cast<const T*>(slot.v);
  const AttentionSeq& s = *t.seq;
  const int col0 = t.head * dh;
  int pos[rows] = {};
  float m[rows] = {}, l[rows] = {};
  for (int r = 0; r < rows; ++r) {
    const float* qr = q.Row(s.token_begin + t.row0 + r) + col0;
    for (int e = 0; e < dh; ++e) qt[e * rows + r] = qr[e];
    pos[r] = s.start_pos + t.row0 + r;
    m[r] = kNegInf;
    l[r] = 0.f;
    std::fill(o + r * dh, o + (r + 1) * dh, 0.f);
  }
  const int chunks = padded_bs / kLanes;
  const int num_blocks = pos[rows - 1] / bs + 1;

  const int64_t block_head_elems = static_cast<int64_t>(dh) * bs;  // one head's K (or V) in a block
  const int64_t head_offset = static_cast<int64_t>(t.head) * block_head_elems;
  for (int b = 0; b < num_blocks; ++b) {
    const int64_t phys = s.block_table[b];
    const T* kt = k_pool + phys * bf + head_offset;  // [dh][bs]
    const T* vb = v_pool + phys * bf + head_offset;  // [bs][dh]
    const int key0 = b * bs;
    int visible[rows] = {};
    for (int r = 0; r < rows; ++r) visible[r] = std::clamp(pos[r] - key0 + 1, 0, bs);

    // 1. Scores, one FMA chain over the head dimension per (row, key); hidden keys -> -inf.
    for (int c = 0; c < chunks; ++c) {
      F32x16 acc[rows];
      if (kBlock16) {
        // While the scores are computed, prefetch this block's V (read next, with a stride the
        // hardware prefetcher misses) and the next block's K.
        const T* k_next =
            b + 1 < num_blocks ? k_pool + static_cast<int64_t>(s.block_table[b + 1]) * bf + head_offset : nullptr;
        ForRowGroups<rows>(
            [&]<int r0, int n>() { Scores<rows, r0, n, true, Kv>(qt, kt, dh, kLanes, kLanes, vb, k_next, acc); });
      } else {
        ForRowGroups<rows>([&]<int r0, int n>() {
          Scores<rows, r0, n, false, Kv>(qt, kt + c * kLanes, dh, bs, std::min(kLanes, bs - c * kLanes), nullptr,
                                         nullptr, acc);
        });
      }
      for (int r = 0; r < rows; ++r) {
        const int vis = std::clamp(visible[r] - c * kLanes, 0, kLanes);
        Select(FirstLanes(vis), acc[r] * F32x16::Broadcast(scale), F32x16::Broadcast(kNegInf))
            .Store(p + r * padded_bs + c * kLanes);
      }
    }

    // 2. Online softmax update per row: new max, rescale factor, probabilities, running sum.
    float corr[rows] = {};
    SoftmaxUpdate<rows>(p, padded_bs, chunks, visible, m, l, corr);
    // 3. o_r = o_r * corr_r + sum_j p_rj v_j over the visible keys, j in order.
    AccumulateValues<rows, kBlock16 ? kLanes : 0, Kv>(vb, p, padded_bs, dh, bs, visible, corr, o);
  }

  for (int r = 0; r < rows; ++r) {
    float* dst = out.Row(s.token_begin + t.row0 + r) + col0;
    for (int e = 0; e < dh; ++e) dst[e] = o[r * dh + e] / l[r];
  }
}

using TileFn = void (*)(Mat, const KvSlot&, const AttentionTile&, float, Mat, float*, float*, float*, int);

template <bool kBlock16, typename Kv, int... R>
constexpr std::array<TileFn, sizeof...(R)> MakeTileTable(std::integer_sequence<int, R...>) {
  return {&AttendTile<R + 1, kBlock16, Kv>...};
}
// Per KV dtype: the tile functions for any block size, and for blocks of 16 tokens.
template <typename Kv>
struct TileTables {
  static constexpr auto kAny = MakeTileTable<false, Kv>(std::make_integer_sequence<int, kQueryTile>{});
  static constexpr auto k16 = MakeTileTable<true, Kv>(std::make_integer_sequence<int, kQueryTile>{});
};

template <typename Kv>
void WriteKvAs(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch) {
  using T = typename Kv::T;
  const int dh = slot.head_dim, bs = slot.block_size, heads = slot.heads;
  const int64_t bf = slot.block_elems();
  T* const k_pool = static_cast<T*>(slot.k);
  T* const v_pool = static_cast<T*>(slot.v);
  for (const AttentionSeq& s : batch.seqs) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < s.num_tokens; ++i) {
      const int pos = s.start_pos + i;
      const int64_t phys = s.block_table[pos / bs];
      const int off = pos % bs;
      const float* kr = k.Row(s.token_begin + i);
      const float* vr = v.Row(s.token_begin + i);
      for (int h = 0; h < heads; ++h) {
        T* kt = k_pool + phys * bf + static_cast<int64_t>(h) * dh * bs;
        T* vb = v_pool + phys * bf + static_cast<int64_t>(h) * bs * dh + static_cast<int64_t>(off) * dh;
        for (int e = 0; e < dh; ++e) {
          kt[static_cast<int64_t>(e) * bs + off] = Kv::From(kr[h * dh + e]);
          vb[e] = Kv::From(vr[h * dh + e]);
        }
      }
    }
  }
}

template <typename Kv>
const TileFn* TileFns(int block_size) {
  return block_size == kLanes ? TileTables<Kv>::k16.data() : TileTables<Kv>::kAny.data();
}

}  // namespace

void WriteKv(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch) {
  WithKv(slot.dtype, [&](auto kv) { WriteKvAs<decltype(kv)>(k, v, slot, batch); });
}

void Attention(Mat q, const KvSlot& slot, const AttentionBatch& batch, float scale, Mat out,
               AttentionScratch* scratch) {
  // Work list: (sequence, head, tile); longest tiles (latest positions) first for load balance.
  // The order only affects scheduling: each tile's result is independent of it.
  std::vector<AttentionTile>& tiles = scratch->tiles;
  tiles.clear();
  for (const AttentionSeq& s : batch.seqs) {
    for (int r0 = 0; r0 < s.num_tokens; r0 += kQueryTile) {
      for (int h = 0; h < slot.heads; ++h) tiles.push_back({&s, h, r0, std::min(kQueryTile, s.num_tokens - r0)});
    }
  }
  std::sort(tiles.begin(), tiles.end(), [](const AttentionTile& a, const AttentionTile& b) {
    return a.seq->start_pos + a.row0 > b.seq->start_pos + b.row0;
  });
  const int padded_bs = (slot.block_size + kLanes - 1) / kLanes * kLanes;
  const int64_t n = static_cast<int64_t>(tiles.size());
  const size_t o_size = static_cast<size_t>(kQueryTile) * slot.head_dim;
  const size_t per_thread = 2 * o_size + static_cast<size_t>(kQueryTile) * padded_bs;
  const TileFn* fns = nullptr;
  WithKv(slot.dtype, [&](auto kv) { fns = TileFns<decltype(kv)>(slot.block_size); });
  const size_t need = per_thread * omp_get_max_threads();  // the team size the backend set
  if (scratch->buffers.size() < need) scratch->buffers.resize(need);
#pragma omp parallel
  {
    float* o = scratch->buffers.data() + per_thread * omp_get_thread_num();
    float* qt = o + o_size;
    float* p = qt + o_size;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      fns[tiles[i].rows - 1](q, slot, tiles[i], scale, out, o, p, qt, padded_bs);
    }
  }
}

}  // namespace kraken::engine::cpu::KRAKEN_CPU_ISA
