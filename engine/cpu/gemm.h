// CPU matrix multiply Y[M, N] = X[M, K] · W^T (+ bias) for weights packed once at load time.
//
//   KRAKEN_ASSIGN_OR_RETURN(PackedMatrix w, PackedMatrix::Pack(source));  // W: [N out, K in]
//   Gemm(x, M, /*lda=*/K, w, bias, y, /*ldc=*/N, /*accumulate=*/false, &scratch);
//
// Batch invariance: every output element is one fused multiply-add chain over k = 0..K-1 in order,
// whatever M is and wherever the row sits in the batch, so a sequence's result never depends on
// its batch mates (docs/engine.md "Batch invariance"). OpenBLAS 0.3.21 and oneDNN 2.6 do not
// give this: the same row changes in the last bits as M changes (measured for 66-69 of
// M = 2..70 at K = 504/1008).
// Weights stay in their stored type (BF16 halves the bytes a decode step streams) and are
// widened exactly to F32 in registers; arithmetic is F32.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "base/status.h"
#include "engine/dtype.h"

namespace kraken::engine::cpu {

/// Output features per packed panel (two 16-lane vectors).
inline constexpr int kPanelWidth = 32;

/// Where to read a weight matrix from: element (o, i) of the logical [out, in] matrix is at
/// `data + (rows[o] * out_stride + (in_begin + i) * in_stride) * DTypeSize(dtype)`.
/// A PyTorch Linear weight [out, in] has out_stride = in_total, in_stride = 1; a Hugging Face
/// Conv1D weight [in, out] has out_stride = 1, in_stride = out_total. `rows` selects (and orders)
/// the source output features, which is how a tensor-parallel shard takes its slice.
struct MatrixSource {
  const uint8_t* data = nullptr;
  DType dtype = DType::kF32;
  int64_t out_stride = 0;
  int64_t in_stride = 0;
  int in_begin = 0;
  int in = 0;             // K
  std::vector<int> rows;  // N source rows
};

/// k per block of the pair-interleaved layout (one AMX tile row: 16 pairs of BF16).
inline constexpr int kPairBlock = 32;

/// W [N, K] in panels of kPanelWidth output features, zero-padded to a whole panel, in one of two
/// layouts:
/// - k-major (every level's F32 and F16, and BF16 on the F32 levels): element (n, k) at panel n / 32,
///   element offset k * 32 + n % 32;
/// - pair-interleaved (`pairs()`, BF16 on the amx and avx512bf16 levels; K zero-padded to a multiple of 32): per
///   k block b = k / 32 two 16 x 64-byte tiles, the one of outputs 16j..16j+15 (j = (n % 32) / 16)
///   at byte (2b + j) * 1024, whose row q holds (n, 32b + 2q), (n, 32b + 2q + 1) for each n: the
///   operand TDPBF16PS reads (Intel SDM, "TDPBF16PS"), and row q alone the 16-output operand of
///   VDPBF16PS for k pair 16b + q.
class PackedMatrix {
 public:
  /// Packs `src` in the layout the active kernel level reads. The dtype must be F32, BF16 or F16
  /// (INVALID_ARGUMENT otherwise); RESOURCE_EXHAUSTED when the memory cannot be had.
  static StatusOr<PackedMatrix> Pack(const MatrixSource& src);
  /// The same, pair-interleaving BF16 weights when `bf16_pairs` (for a given level's table).
  static StatusOr<PackedMatrix> Pack(const MatrixSource& src, bool bf16_pairs);

  int in() const { return in_; }
  int out() const { return out_; }
  int panels() const { return panels_; }
  DType dtype() const { return dtype_; }
  /// Whether the layout is pair-interleaved (above).
  bool pairs() const { return pairs_; }
  /// Bytes held by the packed copy.
  size_t bytes() const { return bytes_; }
  const uint8_t* panel(int p) const { return data_.get() + static_cast<size_t>(p) * panel_bytes_; }
  /// Byte offset of element (n, k) inside panel n / 32, lane = n % 32, in this matrix's layout.
  /// Always inlined: the per-level kernel copies call it, and an out-of-line copy compiled for one
  /// level could be the one the linker keeps for all (engine/cpu/isa_kernels.h).
  [[gnu::always_inline]] size_t OffsetInPanel(int lane, int k) const {
    const size_t es = DTypeSize(dtype_);
    if (!pairs_) return (static_cast<size_t>(k) * kPanelWidth + lane) * es;
    return static_cast<size_t>(2 * (k / kPairBlock) + lane / 16) * 1024 + static_cast<size_t>(k % kPairBlock / 2) * 64 +
           static_cast<size_t>((lane % 16) * 2 + k % 2) * es;
  }

 private:
  struct Free {
    void operator()(uint8_t* p) const;
  };
  int in_ = 0, out_ = 0, panels_ = 0;
  DType dtype_ = DType::kF32;
  bool pairs_ = false;
  size_t panel_bytes_ = 0, bytes_ = 0;
  std::unique_ptr<uint8_t, Free> data_;
};

/// Reusable packing space for the activations; grows to the largest M·K seen (warm-up), then
/// never allocates again.
struct GemmScratch {
  std::vector<float> packed_a;
};

/// Y = X · W^T + bias, or Y += X · W^T + bias when `accumulate` (the addend is formed first, then
/// added to Y, in that order for every element).
/// X: [M, K] row stride lda; Y: [M, N] row stride ldc; bias: [N] or nullptr. X and Y must not
/// overlap. Uses the OpenMP threads of the caller's team size.
void Gemm(const float* x, int m, int64_t lda, const PackedMatrix& w, const float* bias, float* y, int64_t ldc,
          bool accumulate, GemmScratch* scratch);

/// Floats of GemmScratch::packed_a a Gemm of an [m, k] input needs on the active kernel level
/// (row tiles of 6 on AVX2, 12 on AVX-512; on avx512bf16 and amx also the BF16 copy of the
/// activations, k padded to 32, which is no larger for k >= 32): what a memory budget reserves up
/// front.
size_t GemmScratchFloats(int m, int k);

}  // namespace kraken::engine::cpu
