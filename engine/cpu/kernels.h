// CPU kernels behind CpuBackend (one family per file: elementwise.cc, attention.cc, gemm.cc).
// Each row of every kernel is computed in a fixed order that does not depend on the other rows,
// the batch size or the thread count, so results are bitwise reproducible and batch invariant.
// Multi-threaded with OpenMP over rows / (sequence, head, query tile) work items.
#pragma once

#include <vector>

#include "engine/backend.h"
#include "engine/cpu/gemm.h"

namespace kraken::engine::cpu {

/// See Backend::Embed. wte: the packed [V, d] matrix (gemm.h layout), wpe: [P, d] F32.
void Embed(const int32_t* tokens, const int32_t* positions, const PackedMatrix& wte, const float* wpe, Mat out);
/// See Backend::LayerNorm. Two-pass mean and biased variance, 1 / sqrt(var + eps).
void LayerNorm(Mat x, const float* w, const float* b, float eps, Mat y);
/// See Backend::GeluTanh.
void GeluTanh(Mat x);
/// See Backend::Add.
void Add(Mat a, Mat b, Mat out);
/// See Backend::Copy.
void Copy(Mat src, Mat dst);
/// See Backend::GatherRows.
void GatherRows(Mat src, const int32_t* rows, Mat dst);
/// See Backend::WriteKv.
void WriteKv(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch);
/// Query rows of one sequence that share each K/V load in Attention.
inline constexpr int kQueryTile = 16;

/// One attention work item: a sequence's head and a tile of up to kQueryTile query rows.
struct AttentionTile {
  const AttentionSeq* seq;
  int head;
  int row0;  // first query row within the sequence's new tokens
  int rows;  // 1 .. kQueryTile
};

/// Work list and per-thread buffers reused across calls (grown at warm-up, then stable).
struct AttentionScratch {
  std::vector<AttentionTile> tiles;
  std::vector<float> buffers;
};

/// See Backend::Attention. Online softmax over the sequence's KV blocks in logical order
/// (FlashAttention's rescaling, Dao et al. 2022, Alg. 1), one query-row state per row, so a
/// row's output is identical whether its sequence is prefilled at once, in chunks, or decoded.
void Attention(Mat q, const KvSlot& slot, const AttentionBatch& batch, float scale, Mat out, AttentionScratch* scratch);

}  // namespace kraken::engine::cpu
