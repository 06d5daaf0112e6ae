// The CPU kernels of one instruction-set level, declared inside that level's namespace
// (KRAKEN_CPU_ISA: avx2, avx512, avx512bf16, amx or generic). Each kernel file is compiled once per level with
// that level's -march; dispatch.cc picks one level at start (kernels.h) and calls through its
// KernelTable. Nothing outside these namespaces may be defined by those compilations: a shared
// inline or template symbol built for AVX-512 could be the copy the linker keeps for everyone
// (tests/engine/isa_symbols_test.cmake checks the objects).
#pragma once

#include "engine/cpu/kernels.h"

#ifndef KRAKEN_CPU_ISA
#define KRAKEN_CPU_ISA native
#endif

namespace kraken::engine::cpu::KRAKEN_CPU_ISA {

/// Floats of packed-activation space Gemm needs for an [m, k] input (row tiles of this level).
size_t GemmScratchFloats(int m, int k);
/// cpu::Gemm on this level; `packed_a` holds at least GemmScratchFloats(m, w.in()) floats.
void Gemm(const float* x, int m, int64_t lda, const PackedMatrix& w, const float* bias, float* y, int64_t ldc,
          bool accumulate, float* packed_a);
void Embed(const int32_t* tokens, const int32_t* positions, const PackedMatrix& wte, const float* wpe, Mat out);
void LayerNorm(Mat x, const float* w, const float* b, float eps, Mat y);
void GeluTanh(Mat x);
void Add(Mat a, Mat b, Mat out);
void Copy(Mat src, Mat dst);
void GatherRows(Mat src, const int32_t* rows, Mat dst);
void WriteKv(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch);
void Attention(Mat q, const KvSlot& slot, const AttentionBatch& batch, float scale, Mat out, AttentionScratch* scratch);

/// This level's table.
extern const KernelTable kKernels;

}  // namespace kraken::engine::cpu::KRAKEN_CPU_ISA
