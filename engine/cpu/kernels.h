// CPU kernels behind CpuBackend (one family per file: elementwise.cc, attention.cc,
// gemm_kernels.cc). Each row of every kernel is computed in a fixed order that does not depend on
// the other rows, the batch size or the thread count, so results are bitwise reproducible and
// batch invariant. Multi-threaded with OpenMP over rows / (sequence, head, query tile) items.
//
// The kernel files are built once per x86 instruction-set level (AVX2 + FMA + F16C, AVX-512
// F/BW/DQ/VL, AVX-512 with AVX512-BF16, and AVX-512 with AMX-BF16) and one level is chosen at start
// from CPUID, capped by the environment variable KRAKEN_CPU_ISA (avx2, avx512, avx512bf16, amx):
// one binary runs at its best on any
// x86-64-v3 CPU. The avx2 and avx512 levels compute each element with the same operations in the
// same order (one FMA chain per GEMM output, the same exp polynomial), so their results are the
// same bits. The amx and avx512bf16 levels, chosen only when KRAKEN_CPU_ISA names them, multiply
// BF16 weights by BF16-rounded activations (gemm_kernels.cc): batch-invariant too, but other bits.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "base/status.h"

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

/// One instruction-set level's kernels (isa_kernels.h); the free functions above call the
/// active level's.
struct KernelTable {
  const char* isa;  // "amx", "avx512bf16", "avx512", "avx2" or "generic"
  bool bf16_pairs;  // this level's GEMM reads BF16 weights pair-interleaved (PackedMatrix)
  size_t (*gemm_scratch_floats)(int m, int k);
  void (*gemm)(const float* x, int m, int64_t lda, const PackedMatrix& w, const float* bias, float* y, int64_t ldc,
               bool accumulate, float* packed_a);
  void (*embed)(const int32_t* tokens, const int32_t* positions, const PackedMatrix& wte, const float* wpe, Mat out);
  void (*layer_norm)(Mat x, const float* w, const float* b, float eps, Mat y);
  void (*gelu_tanh)(Mat x);
  void (*add)(Mat a, Mat b, Mat out);
  void (*copy)(Mat src, Mat dst);
  void (*gather_rows)(Mat src, const int32_t* rows, Mat dst);
  void (*write_kv)(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch);
  void (*attention)(Mat q, const KvSlot& slot, const AttentionBatch& batch, float scale, Mat out,
                    AttentionScratch* scratch);
};

/// What decides the bits the active level computes, for comparing processes (the nodes of a
/// multi-node group): "f32" for every level whose products are the F32 levels' (avx2, avx512,
/// generic: the same bits on any CPU), else the level and the CPU it runs on, e.g. "avx512bf16 on
/// AuthenticAMD family 26 model 2": the BF16 dot-product instructions round as each CPU design
/// does (docs/engine.md "CPU kernels").
std::string KernelNumerics();

/// The levels this binary holds kernels for, best first ({"amx", "avx512bf16", "avx512", "avx2"} on x86-64,
/// {"generic"} elsewhere).
std::vector<std::string> BuiltCpuIsas();

/// Whether this CPU has `feature` (a __builtin_cpu_supports name among those the levels need:
/// avx512f, avx512bw, avx512dq, avx512vl, avx512cd, avx2, fma, f16c, bmi2; "avx512bf16" (CPUID 7.1
/// EAX bit 5); or "amx": AMX-BF16 tiles and AVX512-BF16, which the OS enables and grants this
/// process); true off x86.
bool CpuHasFeature(const char* feature);

/// The best built level that `has_feature` (a CpuHasFeature name -> bool) allows, no higher than
/// `cap` (nullptr or "" for no cap; otherwise one of BuiltCpuIsas()). Without a cap the amx and
/// avx512bf16 levels are passed over: they round the activations of BF16-weight GEMMs to BF16, a
/// different product from the other levels', so only a KRAKEN_CPU_ISA naming one chooses it (amx
/// on a CPU without AMX: avx512bf16 where the CPU has it).
/// INVALID_ARGUMENT naming KRAKEN_CPU_ISA when `cap` is not a built level, or when the CPU lacks
/// every level up to the cap (the start-up CPU check normally refuses such a CPU first).
StatusOr<const KernelTable*> SelectKernels(const char* cap, bool (*has_feature)(const char* feature));

/// The active level, chosen on first use from this CPU and $KRAKEN_CPU_ISA; a bad
/// KRAKEN_CPU_ISA ends the process with a message naming the variable and the levels built.
const KernelTable& Kernels();

}  // namespace kraken::engine::cpu
