// The start-up CPU check: a CPU that lacks any feature the build was compiled for is named, with
// the build's -march, in one line; one that has them all passes. The real check runs before main
// in this very binary (it links kraken_cpu_check), so reaching the tests shows it passes here.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "engine/cpu_check.h"

namespace kraken::engine {
namespace {

const char* g_missing = nullptr;  // the one feature the stand-in CPU lacks
bool HasAllBut(const char* feature) {
  return g_missing == nullptr || std::strcmp(feature, g_missing) != 0;
}
bool HasNone(const char*) {
  return false;
}

int Count(const char* const* features) {
  int n = 0;
  while (features[n] != nullptr) ++n;
  return n;
}

TEST(CpuCheck, ACpuWithEveryCompiledFeaturePasses) {
  char line[512] = "untouched";
  g_missing = nullptr;
  EXPECT_EQ(DescribeMissingCpuFeatures(&HasAllBut, line, sizeof line), 0);
  EXPECT_STREQ(line, "");
}

TEST(CpuCheck, EachMissingFeatureIsNamedWithTheBuildsArchitecture) {
#if defined(__AVX2__)
  // x86-64-v3 and up: SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, AVX, AVX2, FMA, BMI and BMI2 at least
  // (an AVX2 machine without AVX-512 has exactly these ten).
  ASSERT_GE(Count(CompiledCpuFeatures()), 10) << "compiled for " << CompiledCpuArch();
#endif
  for (const char* const* f = CompiledCpuFeatures(); *f != nullptr; ++f) {
    g_missing = *f;
    char line[512];
    ASSERT_EQ(DescribeMissingCpuFeatures(&HasAllBut, line, sizeof line), 1) << *f;
    const std::string want = std::string("this binary was built for ") + CompiledCpuArch() +
                             " (-march), but this CPU lacks: " + *f + "; run it on a CPU with those features";
    EXPECT_EQ(std::string(line).substr(0, want.size()), want);
  }
  g_missing = nullptr;
}

TEST(CpuCheck, ACpuWithNoneGetsEveryFeatureInOneTruncatedLine) {
  const int n = Count(CompiledCpuFeatures());
  char line[512];
  EXPECT_EQ(DescribeMissingCpuFeatures(&HasNone, line, sizeof line), n);
  EXPECT_EQ(std::strchr(line, '\n'), nullptr);
  char tiny[16];
  if (n > 0) {
    EXPECT_EQ(DescribeMissingCpuFeatures(&HasNone, tiny, sizeof tiny), n);
    EXPECT_EQ(std::strlen(tiny), sizeof tiny - 1);  // cut, and terminated
  }
}

}  // namespace
}  // namespace kraken::engine
