// The KernelTable of one instruction-set level (compiled once per level, like the kernels).
#include "engine/cpu/isa_kernels.h"

#define KRAKEN_STRINGIFY_(x) #x
#define KRAKEN_STRINGIFY(x) KRAKEN_STRINGIFY_(x)

namespace kraken::engine::cpu::KRAKEN_CPU_ISA {

const KernelTable kKernels = {
    .isa = KRAKEN_STRINGIFY(KRAKEN_CPU_ISA),
#if KRAKEN_CPU_AMX || KRAKEN_CPU_BF16DOT
    .bf16_pairs = true,
#else
    .bf16_pairs = false,
#endif
    .gemm_scratch_floats = &GemmScratchFloats,
    .gemm = &Gemm,
    .embed = &Embed,
    .layer_norm = &LayerNorm,
    .gelu_tanh = &GeluTanh,
    .add = &Add,
    .copy = &Copy,
    .gather_rows = &GatherRows,
    .write_kv = &WriteKv,
    .attention = &Attention,
};

}  // namespace kraken::engine::cpu::KRAKEN_CPU_ISA
