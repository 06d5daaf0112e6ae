// Helpers shared by the engine tests: locating test data, reading golden files, comparing.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/dtype.h"
#include "engine/safetensors.h"

namespace kraken::engine::testing {

/// Repository root (KRAKEN_SOURCE_DIR, set by ctest), or the current directory.
inline std::string SourceDir() {
  const char* s = std::getenv("KRAKEN_SOURCE_DIR");
  return s != nullptr ? s : ".";
}

inline std::string TestModelDir(const std::string& name) {
  return SourceDir() + "/tests/data/models/" + name;
}

/// Every committed test model (tests/data/models), for value-parameterized tests:
///   INSTANTIATE_TEST_SUITE_P(TestModels, Suite, ::testing::ValuesIn(kTestModels), TestModelParamName);
inline const std::vector<std::string> kTestModels = {"kraken-n2-h113-f32", "kraken-n4-bias-f32",
                                                     "kraken-n4-bf16",     "gpt2-f32",
                                                     "gpt2-bf16",          "parallel-block-f16-sharded"};

/// A gtest parameter name for a model name ('-' is not allowed there).
inline std::string TestModelParamName(const ::testing::TestParamInfo<std::string>& info) {
  std::string s = info.param;
  std::replace(s.begin(), s.end(), '-', '_');
  return s;
}

/// A golden file written by tools/make_test_models.py (magic + version checked).
class Golden {
 public:
  explicit Golden(const std::string& model_dir) {
    auto f = SafetensorsFile::Open(model_dir + "/golden.safetensors");
    EXPECT_TRUE(f.ok()) << f.status();
    if (!f.ok()) return;
    file_ = std::move(f).value();
    const auto& meta = file_->metadata();
    auto magic = meta.find("magic");
    auto version = meta.find("version");
    EXPECT_TRUE(magic != meta.end() && magic->second == "KRAKEN-GOLDEN") << "not a golden file";
    EXPECT_TRUE(version != meta.end() && version->second == "1")
        << "golden version mismatch; regenerate with: .venv/bin/python tools/make_test_models.py";
  }
  bool ok() const { return file_ != nullptr; }
  bool Has(const std::string& name) const { return file_ && file_->Find(name) != nullptr; }
  /// Tensor `name` as float (F32 stored), with its shape.
  std::vector<float> Floats(const std::string& name, std::vector<int64_t>* shape = nullptr) const {
    const TensorInfo* t = file_->Find(name);
    EXPECT_NE(t, nullptr) << "golden lacks " << name;
    if (t == nullptr) return {};
    if (shape) *shape = t->shape;
    std::vector<float> v(t->numel());
    ConvertToF32(t->dtype, t->data, v.data(), v.size());
    return v;
  }
  std::vector<int32_t> Ints(const std::string& name) const {
    const TensorInfo* t = file_->Find(name);
    EXPECT_NE(t, nullptr) << "golden lacks " << name;
    if (t == nullptr || t->dtype != DType::kI32) return {};
    std::vector<int32_t> v(t->numel());
    std::memcpy(v.data(), t->data, t->nbytes);
    return v;
  }
  const SafetensorsFile& file() const { return *file_; }

 private:
  std::unique_ptr<SafetensorsFile> file_;
};

/// Largest |a - b| and largest |b|.
struct Diff {
  double max_abs = 0.0;
  double max_ref = 0.0;
};
inline Diff Compare(const float* a, const float* b, size_t n);

/// Expects max |got - want| <= rel * max(1, max |want|) over the whole vector.
inline void ExpectWithinRel(const std::vector<float>& got, const std::vector<float>& want, double rel,
                            const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const Diff d = Compare(got.data(), want.data(), want.size());
  EXPECT_LE(d.max_abs, rel * std::max(1.0, d.max_ref)) << what << ": max |got - want| " << d.max_abs;
}

inline Diff Compare(const float* a, const float* b, size_t n) {
  Diff d;
  for (size_t i = 0; i < n; ++i) {
    d.max_abs = std::max(d.max_abs, std::fabs(static_cast<double>(a[i]) - b[i]));
    d.max_ref = std::max(d.max_ref, std::fabs(static_cast<double>(b[i])));
  }
  return d;
}

/// Seed for randomized tests: KRAKEN_TEST_SEED if set, else a fixed default; printed on failure
/// through the returned value's use in SCOPED_TRACE.
inline uint32_t TestSeed() {
  const char* s = std::getenv("KRAKEN_TEST_SEED");
  return s != nullptr ? static_cast<uint32_t>(std::strtoul(s, nullptr, 10)) : 20241130u;
}

}  // namespace kraken::engine::testing
