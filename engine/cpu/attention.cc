// Paged causal attention on the CPU: KV writes and the attention itself, for prefill chunks and
// decode tokens alike, any head size (113, 209, ...), any block size.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "engine/cpu/kernels.h"
#include "engine/cpu/simd.h"

namespace kraken::engine::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Attention for one (sequence, head, query tile). Each row keeps its own running max `m`, sum `l`
// and output accumulator, and visits blocks 0 .. pos / bs in order; a block wholly after the
// row's position is skipped, so the row computes exactly what it would compute alone.
// `o`: kQueryTile x head_dim scratch; `p`: kQueryTile x padded block scratch.
void AttendTile(Mat q, const KvSlot& slot, const AttentionTile& t, float scale, Mat out, float* o, float* p,
                int padded_bs) {
  const int dh = slot.head_dim, bs = slot.block_size;
  const int64_t bf = slot.block_floats();
  const AttentionSeq& s = *t.seq;
  const int rows = t.rows;
  const int col0 = t.head * dh;
  const float* qr[kQueryTile] = {};
  int pos[kQueryTile] = {};
  float m[kQueryTile] = {}, l[kQueryTile] = {};
  for (int r = 0; r < rows; ++r) {
    qr[r] = q.Row(s.token_begin + t.row0 + r) + col0;
    pos[r] = s.start_pos + t.row0 + r;
    m[r] = kNegInf;
    l[r] = 0.f;
    std::fill(o + r * dh, o + (r + 1) * dh, 0.f);
  }
  const int chunks = padded_bs / kLanes;
  const int num_blocks = pos[rows - 1] / bs + 1;

  for (int b = 0; b < num_blocks; ++b) {
    const int64_t phys = s.block_table[b];
    const float* kt = slot.k + phys * bf + static_cast<int64_t>(t.head) * dh * bs;  // [dh][bs]
    const float* vb = slot.v + phys * bf + static_cast<int64_t>(t.head) * bs * dh;  // [bs][dh]
    const int key0 = b * bs;
    int visible[kQueryTile] = {};
    for (int r = 0; r < rows; ++r) visible[r] = std::clamp(pos[r] - key0 + 1, 0, bs);

    // 1. Scores, one FMA chain over the head dimension per (row, key); hidden keys -> -inf.
    for (int c = 0; c < chunks; ++c) {
      const int lanes = std::min(kLanes, bs - c * kLanes);
      F32x16 acc[kQueryTile];
      for (F32x16& a : acc) a = F32x16::Zero();
      for (int e = 0; e < dh; ++e) {
        const F32x16 kv = F32x16::LoadPartial(kt + static_cast<int64_t>(e) * bs + c * kLanes, lanes);
        for (int r = 0; r < rows; ++r) acc[r] = Fma(F32x16::Broadcast(qr[r][e]), kv, acc[r]);
      }
      for (int r = 0; r < rows; ++r) {
        const int vis = std::clamp(visible[r] - c * kLanes, 0, kLanes);
        Select(FirstLanes(vis), acc[r] * F32x16::Broadcast(scale), F32x16::Broadcast(kNegInf))
            .Store(p + r * padded_bs + c * kLanes);
      }
    }

    // 2. Online softmax update per row: new max, rescale factor, probabilities, running sum.
    float corr[kQueryTile] = {};
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

    // 3. o_r = o_r * corr_r + sum_j p_rj v_j over the visible keys, j in order.
    for (int e0 = 0; e0 < dh; e0 += kLanes) {
      const int lanes = std::min(kLanes, dh - e0);
      F32x16 acc[kQueryTile];
      for (F32x16& a : acc) a = F32x16::Zero();
      int max_vis = 0;
      for (int r = 0; r < rows; ++r) {
        if (visible[r] == 0) continue;
        acc[r] = F32x16::LoadPartial(o + r * dh + e0, lanes) * F32x16::Broadcast(corr[r]);
        max_vis = std::max(max_vis, visible[r]);
      }
      for (int j = 0; j < max_vis; ++j) {
        const F32x16 vv = F32x16::LoadPartial(vb + static_cast<int64_t>(j) * dh + e0, lanes);
        for (int r = 0; r < rows; ++r) {
          if (j < visible[r]) acc[r] = Fma(F32x16::Broadcast(p[r * padded_bs + j]), vv, acc[r]);
        }
      }
      for (int r = 0; r < rows; ++r) {
        if (visible[r] != 0) acc[r].StorePartial(o + r * dh + e0, lanes);
      }
    }
  }

  for (int r = 0; r < rows; ++r) {
    float* dst = out.Row(s.token_begin + t.row0 + r) + col0;
    for (int e = 0; e < dh; ++e) dst[e] = o[r * dh + e] / l[r];
  }
}

}  // namespace

void WriteKv(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch) {
  const int dh = slot.head_dim, bs = slot.block_size, heads = slot.heads;
  const int64_t bf = slot.block_floats();
  for (const AttentionSeq& s : batch.seqs) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < s.num_tokens; ++i) {
      const int pos = s.start_pos + i;
      const int64_t phys = s.block_table[pos / bs];
      const int off = pos % bs;
      const float* kr = k.Row(s.token_begin + i);
      const float* vr = v.Row(s.token_begin + i);
      for (int h = 0; h < heads; ++h) {
        float* kt = slot.k + phys * bf + static_cast<int64_t>(h) * dh * bs;
        float* vb = slot.v + phys * bf + static_cast<int64_t>(h) * bs * dh + static_cast<int64_t>(off) * dh;
        for (int e = 0; e < dh; ++e) {
          kt[static_cast<int64_t>(e) * bs + off] = kr[h * dh + e];
          vb[e] = vr[h * dh + e];
        }
      }
    }
  }
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
  const size_t per_thread = o_size + static_cast<size_t>(kQueryTile) * padded_bs;
  const size_t need = per_thread * omp_get_max_threads();
  if (scratch->buffers.size() < need) scratch->buffers.resize(need);
#pragma omp parallel
  {
    float* o = scratch->buffers.data() + per_thread * omp_get_thread_num();
    float* p = o + o_size;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) AttendTile(q, slot, tiles[i], scale, out, o, p, padded_bs);
  }
}

}  // namespace kraken::engine::cpu
