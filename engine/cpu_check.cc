#include "engine/cpu_check.h"

#include <unistd.h>

#include <cerrno>  // program_invocation_short_name (glibc)
#include <cstdlib>
#include <cstring>

#ifndef KRAKEN_CPU_ARCH_NAME
#define KRAKEN_CPU_ARCH_NAME "unknown"
#endif

// Everything here runs before the CPU is known to have the build's features, so it is compiled
// for the x86-64 baseline (and kept to plain loops and write(2)), whatever -march the rest uses.
#if defined(__x86_64__) && defined(__GNUC__)
#define KRAKEN_BASELINE __attribute__((target("arch=x86-64")))
#else
#define KRAKEN_BASELINE
#endif

namespace kraken::engine {
namespace {

// Each feature the build may use, by the compiler's macro; names as __builtin_cpu_supports takes them.
const char* const kFeatures[] = {
#ifdef __SSE3__
    "sse3",
#endif
#ifdef __SSSE3__
    "ssse3",
#endif
#ifdef __SSE4_1__
    "sse4.1",
#endif
#ifdef __SSE4_2__
    "sse4.2",
#endif
#ifdef __POPCNT__
    "popcnt",
#endif
#ifdef __AVX__
    "avx",
#endif
#ifdef __AVX2__
    "avx2",
#endif
#ifdef __FMA__
    "fma",
#endif
#ifdef __BMI__
    "bmi",
#endif
#ifdef __BMI2__
    "bmi2",
#endif
#ifdef __AVX512F__
    "avx512f",
#endif
#ifdef __AVX512CD__
    "avx512cd",
#endif
#ifdef __AVX512BW__
    "avx512bw",
#endif
#ifdef __AVX512DQ__
    "avx512dq",
#endif
#ifdef __AVX512VL__
    "avx512vl",
#endif
#ifdef __AVX512VNNI__
    "avx512vnni",
#endif
#ifdef __AVX512BF16__
    "avx512bf16",
#endif
    nullptr};

KRAKEN_BASELINE void Append(char* buf, size_t size, size_t* at, const char* s) {
  for (; *s != '\0' && *at + 1 < size; ++s) buf[(*at)++] = *s;
  buf[*at] = '\0';
}

#if defined(__x86_64__) && defined(__GNUC__)
// __builtin_cpu_supports needs a literal: one branch per name of kFeatures.
KRAKEN_BASELINE bool CpuHas(const char* f) {
  __builtin_cpu_init();
#define is(name) (std::strcmp(f, name) == 0)
  if (is("sse3")) return __builtin_cpu_supports("sse3");
  if (is("ssse3")) return __builtin_cpu_supports("ssse3");
  if (is("sse4.1")) return __builtin_cpu_supports("sse4.1");
  if (is("sse4.2")) return __builtin_cpu_supports("sse4.2");
  if (is("popcnt")) return __builtin_cpu_supports("popcnt");
  if (is("avx")) return __builtin_cpu_supports("avx");
  if (is("avx2")) return __builtin_cpu_supports("avx2");
  if (is("fma")) return __builtin_cpu_supports("fma");
  if (is("bmi")) return __builtin_cpu_supports("bmi");
  if (is("bmi2")) return __builtin_cpu_supports("bmi2");
  if (is("avx512f")) return __builtin_cpu_supports("avx512f");
  if (is("avx512cd")) return __builtin_cpu_supports("avx512cd");
  if (is("avx512bw")) return __builtin_cpu_supports("avx512bw");
  if (is("avx512dq")) return __builtin_cpu_supports("avx512dq");
  if (is("avx512vl")) return __builtin_cpu_supports("avx512vl");
  if (is("avx512vnni")) return __builtin_cpu_supports("avx512vnni");
  if (is("avx512bf16")) return __builtin_cpu_supports("avx512bf16");
#undef is
  return false;
}

// Before the executable's own static initializers (priority 101 runs first among them).
__attribute__((constructor(101))) KRAKEN_BASELINE void CheckCpuAtStart() {
  char line[512];
  if (DescribeMissingCpuFeatures(&CpuHas, line, sizeof line) == 0) return;
  const char* name = program_invocation_short_name;
  if (write(2, name, std::strlen(name)) < 0 || write(2, ": ", 2) < 0) {
  }
  size_t n = std::strlen(line);
  if (n + 1 < sizeof line) line[n++] = '\n';
  if (write(2, line, n) < 0) {
  }
  _exit(1);
}
#endif

}  // namespace

const char* const* CompiledCpuFeatures() {
  return kFeatures;
}

const char* CompiledCpuArch() {
  return KRAKEN_CPU_ARCH_NAME;
}

KRAKEN_BASELINE int DescribeMissingCpuFeatures(bool (*has)(const char* feature), char* buf, size_t size) {
  if (size == 0) return 0;
  buf[0] = '\0';
  int missing = 0;
  size_t at = 0;
  for (const char* const* f = kFeatures; *f != nullptr; ++f) {
    if (has(*f)) continue;
    if (missing++ == 0) {
      Append(buf, size, &at, "this binary was built for ");
      Append(buf, size, &at, KRAKEN_CPU_ARCH_NAME);
      Append(buf, size, &at, " (-march), but this CPU lacks:");
    }
    Append(buf, size, &at, " ");
    Append(buf, size, &at, *f);
  }
  if (missing > 0) {
    Append(buf, size, &at, "; run it on a CPU with those features or rebuild with -DKRAKEN_CPU_ARCH=");
    Append(buf, size, &at, "x86-64-v3 (AVX2) or native (see docs/deploy.md)");
  }
  return missing;
}

}  // namespace kraken::engine
