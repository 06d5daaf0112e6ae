// Chooses the CPU kernels' instruction-set level once (kernels.h) and forwards the kernel calls.
#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_join.h"
#include "engine/cpu/kernels.h"

namespace kraken::engine::cpu {

#if KRAKEN_CPU_HAS_X86_ISAS
namespace amx {
extern const KernelTable kKernels;
}
namespace avx512bf16 {
extern const KernelTable kKernels;
}
namespace avx512 {
extern const KernelTable kKernels;
}
namespace avx2 {
extern const KernelTable kKernels;
}
#else
namespace generic {
extern const KernelTable kKernels;
}
#endif

namespace {

struct Level {
  const KernelTable* table;
  const char* const* features;  // CpuHasFeature names, NULL-terminated
  // Chosen only when KRAKEN_CPU_ISA names it (or a level above it): its results differ from the
  // levels below (amx and avx512bf16 round the activations of BF16-weight GEMMs to BF16).
  bool opt_in = false;
};

#if KRAKEN_CPU_HAS_X86_ISAS
// What -march=x86-64-v4 and x86-64-v3 let the compiler use in the kernels (the rest of v3 -
// BMI1, LZCNT, MOVBE - the start-up check of the KRAKEN_CPU_ARCH=x86-64-v3 build covers).
const char* const kAvx512Features[] = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd",
                                       "avx2",    "fma",      "f16c",     "bmi2",     nullptr};
const char* const kAvx2Features[] = {"avx2", "fma", "f16c", "bmi2", nullptr};
const char* const kAvx512Bf16Features[] = {"avx512f", "avx512bw", "avx512dq", "avx512vl",   "avx512cd", "avx2",
                                           "fma",     "f16c",     "bmi2",     "avx512bf16", nullptr};
const char* const kAmxFeatures[] = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2",
                                    "fma",     "f16c",     "bmi2",     "amx",      nullptr};
const Level kLevels[] = {{&amx::kKernels, kAmxFeatures, /*opt_in=*/true},
                         {&avx512bf16::kKernels, kAvx512Bf16Features, /*opt_in=*/true},
                         {&avx512::kKernels, kAvx512Features},
                         {&avx2::kKernels, kAvx2Features}};

// Whether the CPU has AVX512-BF16 (CPUID 7.1 EAX bit 5). AVX-512's register state, which it also
// needs, comes with the avx512f check (the compiler's CPU model tests XCR0).
bool Avx512Bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) != 0 && ((a >> 5) & 1u) != 0;
}

// Why this process cannot use AMX-BF16 tiles and AVX512-BF16, or nullptr when it can: the CPU
// must have them (CPUID 7.0 EDX bits 22 and 24, 7.1 EAX bit 5), the OS must enable the tile state
// (XCR0 bits 17-18, read with XGETBV once CPUID 1 ECX bit 27 says the OS allows it) and grant it
// to this process (Linux arch_prctl ARCH_REQ_XCOMP_PERM, kernel 5.16+; the grant covers every
// thread). Asked once.
const char* AmxUnusableReason() {
  static const char* const reason = []() -> const char* {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return "the CPU reports no CPUID leaf 7";
    const bool tile = (d >> 24) & 1u, amx_bf16 = (d >> 22) & 1u;
    if (!tile || !amx_bf16) return "the CPU has no AMX-BF16 tiles";
    if (!Avx512Bf16()) return "the CPU has no AVX512-BF16";
    if (__get_cpuid(1, &a, &b, &c, &d) == 0 || ((c >> 27) & 1u) == 0) return "the OS does not enable XSAVE";
    unsigned xcr0 = 0, xcr0_hi = 0;
    __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0 & (3u << 17)) != (3u << 17)) return "the OS does not enable the AMX tile state (XCR0)";
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
      return "the kernel refused the AMX tile state to this process (arch_prctl ARCH_REQ_XCOMP_PERM)";
    }
    return nullptr;
  }();
  return reason;
}
#else
const char* const kNoFeatures[] = {nullptr};
const Level kLevels[] = {{&generic::kKernels, kNoFeatures}};
#endif

}  // namespace

bool CpuHasFeature(const char* f) {
#if KRAKEN_CPU_HAS_X86_ISAS
  // __builtin_cpu_supports takes only literals.
  __builtin_cpu_init();
  if (std::strcmp(f, "avx512f") == 0) return __builtin_cpu_supports("avx512f");
  if (std::strcmp(f, "avx512bw") == 0) return __builtin_cpu_supports("avx512bw");
  if (std::strcmp(f, "avx512dq") == 0) return __builtin_cpu_supports("avx512dq");
  if (std::strcmp(f, "avx512vl") == 0) return __builtin_cpu_supports("avx512vl");
  if (std::strcmp(f, "avx512cd") == 0) return __builtin_cpu_supports("avx512cd");
  if (std::strcmp(f, "avx2") == 0) return __builtin_cpu_supports("avx2");
  if (std::strcmp(f, "fma") == 0) return __builtin_cpu_supports("fma");
  if (std::strcmp(f, "f16c") == 0) {  // clang's __builtin_cpu_supports does not know this name
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
  }
  if (std::strcmp(f, "bmi2") == 0) return __builtin_cpu_supports("bmi2");
  if (std::strcmp(f, "avx512bf16") == 0) return Avx512Bf16();
  if (std::strcmp(f, "amx") == 0) return AmxUnusableReason() == nullptr;
  return false;
#else
  return true;
#endif
}

std::vector<std::string> BuiltCpuIsas() {
  std::vector<std::string> names;
  for (const Level& l : kLevels) names.emplace_back(l.table->isa);
  return names;
}

StatusOr<const KernelTable*> SelectKernels(const char* cap, bool (*has_feature)(const char* feature)) {
  size_t first = 0;
  while (first + 1 < std::size(kLevels) && kLevels[first].opt_in) ++first;
  const size_t best_default = first;
  if (cap != nullptr && cap[0] != '\0') {
    first = std::size(kLevels);
    for (size_t i = 0; i < std::size(kLevels); ++i) {
      if (std::strcmp(cap, kLevels[i].table->isa) == 0) first = i;
    }
    if (first == std::size(kLevels)) {
      return InvalidArgument("KRAKEN_CPU_ISA must be one of the levels this binary holds (",
                             absl::StrJoin(BuiltCpuIsas(), ", "), "), got '", cap, "'");
    }
  }
  for (size_t i = first; i < std::size(kLevels); ++i) {
    bool ok = true;
    for (const char* const* f = kLevels[i].features; *f != nullptr; ++f) ok = ok && has_feature(*f);
    if (ok) return kLevels[i].table;
  }
  return InvalidArgument("this CPU has none of the kernel levels up to KRAKEN_CPU_ISA='",
                         cap != nullptr && cap[0] != '\0' ? cap : kLevels[best_default].table->isa,
                         "' (built: ", absl::StrJoin(BuiltCpuIsas(), ", "), ")");
}

const KernelTable& Kernels() {
  static const KernelTable* const active = [] {
    const char* cap = std::getenv("KRAKEN_CPU_ISA");
    StatusOr<const KernelTable*> t = SelectKernels(cap, &CpuHasFeature);
    if (!t.ok()) {
      std::fprintf(stderr, "%s\n", std::string(t.status().message()).c_str());
      std::exit(2);
    }
#if KRAKEN_CPU_HAS_X86_ISAS
    if (cap != nullptr && std::strcmp(cap, "amx") == 0 && std::strcmp((*t)->isa, "amx") != 0) {
      std::fprintf(stderr, "KRAKEN_CPU_ISA=amx: %s; running the %s kernels\n", AmxUnusableReason(), (*t)->isa);
    } else if (cap != nullptr && std::strcmp(cap, "avx512bf16") == 0 && std::strcmp((*t)->isa, "avx512bf16") != 0) {
      std::fprintf(stderr, "KRAKEN_CPU_ISA=avx512bf16: the CPU has no %s; running the %s kernels\n",
                   CpuHasFeature("avx512f") ? "AVX512-BF16" : "AVX-512", (*t)->isa);
    }
#endif
    return *t;
  }();
  return *active;
}

std::string KernelNumerics() {
  const KernelTable& kt = Kernels();
  if (!kt.bf16_pairs) return "f32";
  std::string id = kt.isa;
#if KRAKEN_CPU_HAS_X86_ISAS
  // CPUID 0: the vendor string in EBX, EDX, ECX; CPUID 1 EAX: family and model with their
  // extensions (Intel SDM Vol. 2A, "CPUID": the display family and model).
  unsigned a = 0, b = 0, c = 0, d = 0;
  char vendor[13] = {};
  if (__get_cpuid(0, &a, &b, &c, &d) != 0) {
    std::memcpy(vendor, &b, 4);
    std::memcpy(vendor + 4, &d, 4);
    std::memcpy(vendor + 8, &c, 4);
  }
  if (__get_cpuid(1, &a, &b, &c, &d) != 0) {
    const unsigned base_family = (a >> 8) & 0xf, base_model = (a >> 4) & 0xf;
    const unsigned family = base_family == 0xf ? base_family + ((a >> 20) & 0xff) : base_family;
    const unsigned model =
        base_family == 0x6 || base_family == 0xf ? base_model + (((a >> 16) & 0xf) << 4) : base_model;
    id += " on " + std::string(vendor) + " family " + std::to_string(family) + " model " + std::to_string(model);
  }
#endif
  return id;
}

void Embed(const int32_t* tokens, const int32_t* positions, const PackedMatrix& wte, const float* wpe, Mat out) {
  Kernels().embed(tokens, positions, wte, wpe, out);
}
void LayerNorm(Mat x, const float* w, const float* b, float eps, Mat y) {
  Kernels().layer_norm(x, w, b, eps, y);
}
void GeluTanh(Mat x) {
  Kernels().gelu_tanh(x);
}
void Add(Mat a, Mat b, Mat out) {
  Kernels().add(a, b, out);
}
void Copy(Mat src, Mat dst) {
  Kernels().copy(src, dst);
}
void GatherRows(Mat src, const int32_t* rows, Mat dst) {
  Kernels().gather_rows(src, rows, dst);
}
void WriteKv(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch) {
  KRAKEN_CHECK(IsComputeFloat(slot.dtype), "KV cache dtype must be F32, BF16 or F16");
  Kernels().write_kv(k, v, slot, batch);
}
void Attention(Mat q, const KvSlot& slot, const AttentionBatch& batch, float scale, Mat out,
               AttentionScratch* scratch) {
  KRAKEN_CHECK(IsComputeFloat(slot.dtype), "KV cache dtype must be F32, BF16 or F16");
  Kernels().attention(q, slot, batch, scale, out, scratch);
}

}  // namespace kraken::engine::cpu
