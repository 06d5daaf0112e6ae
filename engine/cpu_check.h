// The CPU features this build was compiled for (-march=KRAKEN_CPU_ARCH), checked against the CPU
// it runs on before anything else runs. A binary built for x86-64-v4 (AVX-512) that lands on an
// older node would otherwise die of SIGILL somewhere in a kernel; with this check it prints one
// line naming the build's architecture and the missing features, and exits 1.
//
// Linking the kraken_cpu_check object library into an executable is enough: a constructor runs
// the check before the executable's own static initializers and main.
#pragma once

#include <cstddef>

namespace kraken::engine {

/// The features the compiler was allowed to use in this build, as __builtin_cpu_supports names
/// ("avx2", "avx512f", ...); a NULL-terminated array. Empty on non-x86 builds.
const char* const* CompiledCpuFeatures();

/// The -march value of this build (KRAKEN_CPU_ARCH, e.g. "x86-64-v4" or "native").
const char* CompiledCpuArch();

/// Writes into `buf` (of `size` bytes, NUL-terminated, truncated if short) one line naming the
/// build's architecture and each compiled feature for which `has(name)` is false, and returns
/// the number of missing features (0: nothing written). `has` is __builtin_cpu_supports in the
/// real check and a stand-in in tests.
int DescribeMissingCpuFeatures(bool (*has)(const char* feature), char* buf, size_t size);

}  // namespace kraken::engine
