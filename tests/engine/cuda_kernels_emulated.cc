// The CUDA kernels compiled for the CPU through engine/cuda/emulation.h (this target defines
// KRAKEN_CUDA_EMULATION), for cuda_kernels_emulated_test.cc.
#include "engine/cuda/kernels.cu"
