// The safetensors reader against well-formed, malformed and hostile inputs.
#include "engine/safetensors.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "tests/engine/test_util.h"

namespace kraken::engine {
namespace {

// Builds a file: 8-byte little-endian header length, header, data.
std::vector<uint8_t> Build(const std::string& header, size_t data_bytes, uint64_t declared = UINT64_MAX) {
  std::vector<uint8_t> out;
  out.reserve(8 + header.size() + data_bytes);
  const uint64_t n = declared == UINT64_MAX ? header.size() : declared;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
  for (char c : header) out.push_back(static_cast<uint8_t>(c));
  for (size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<uint8_t>(i));
  return out;
}

std::string ErrorOf(const std::vector<uint8_t>& bytes) {
  auto r = SafetensorsFile::Parse(bytes, "t.safetensors");
  return r.ok() ? "" : std::string(r.status().message());
}

TEST(Safetensors, ParsesTensorsAndMetadata) {
  const auto bytes = Build(
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},"s":{"dtype":"I64","shape":[],"data_offsets":[32,40]}})",
      40);
  auto f = SafetensorsFile::Parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  const TensorInfo* a = (*f)->Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kF32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->numel(), 6);
  EXPECT_EQ(a->nbytes, 24u);
  EXPECT_EQ(a->data, bytes.data() + 8 + (bytes.size() - 8 - 40));
  EXPECT_EQ((*f)->Find("b")->dtype, DType::kBF16);
  EXPECT_EQ((*f)->Find("s")->numel(), 1);  // scalar
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  EXPECT_EQ((*f)->Find("zzz"), nullptr);
}

TEST(Safetensors, EveryWholeByteDTypeParses) {
  for (const char* dt : {"F64", "F8_E4M3", "F8_E5M2", "BOOL", "U8", "I8", "I16", "U16", "U32", "U64"}) {
    const size_t es = DTypeSize(*ParseDType(dt));
    const std::string header = StrCat(R"({"b":{"dtype":")", dt, R"(","shape":[2],"data_offsets":[0,)", 2 * es, "]}}");
    auto f = SafetensorsFile::Parse(Build(header, 2 * es));
    ASSERT_TRUE(f.ok()) << dt << ": " << f.status();
    EXPECT_EQ(DTypeName((*f)->Find("b")->dtype), dt);
  }
}

TEST(Safetensors, ZeroSizedTensorsAreFine) {
  auto f = SafetensorsFile::Parse(Build(R"({"e":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]}})", 0));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->Find("e")->numel(), 0);
}

struct BadCase {
  const char* what;
  std::vector<uint8_t> bytes;
  const char* expect;  // substring of the error
};

TEST(Safetensors, RejectsMalformedAndHostileFiles) {
  const std::string ok_entry = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::vector<BadCase> cases = {
      {"shorter than header size", {1, 2, 3}, "shorter than the 8-byte header size"},
      {"header past end", Build("{}", 0, 1000), "runs past the end of the file"},
      {"header size huge", Build("{}", 0, 1ull << 40), "exceeds the limit"},
      {"header not JSON", Build("{nope", 0), "not valid JSON"},
      {"header not object", Build("[1,2]", 0), "must be a JSON object"},
      {"offsets past end", Build(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8), "past the end"},
      {"begin after end", Build(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8), "begin 8 > end 0"},
      {"shape vs bytes", Build(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes"},
      {"unknown dtype", Build(R"({"a":{"dtype":"X99","shape":[8],"data_offsets":[0,8]}})", 8),
       "not a safetensors dtype"},
      {"negative dim", Build(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-negative"},
      {"shape overflow",
       Build(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", 8),
       "overflows"},
      {"overlap", Build("{" + ok_entry + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "overlap"},
      {"hole", Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "belong to no tensor"},
      {"trailing bytes", Build("{" + ok_entry + "}", 12), "trailing bytes"},
      {"duplicate name", Build("{" + ok_entry + "," + ok_entry + "}", 8), "duplicate key 'a'"},
      {"missing dtype", Build(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), "missing string field 'dtype'"},
      {"extra field", Build(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8), "unknown field"},
      {"bad offsets", Build(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), "data_offsets"},
      {"metadata not strings", Build(R"({"__metadata__":{"k":3}})", 0), "not a string"},
      {"deep nesting", Build(R"({"__metadata__":{"k":[[[[[[1]]]]]]}})", 0), "nests deeper"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string err = ErrorOf(c.bytes);
    EXPECT_NE(err, "") << "accepted";
    EXPECT_NE(err.find(c.expect), std::string::npos) << "error was: " << err;
    EXPECT_NE(err.find("t.safetensors"), std::string::npos) << "error does not name the file: " << err;
  }
}

TEST(Safetensors, TruncationAtEveryLengthNeverCrashes) {
  const auto good = Build(R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", 16);
  for (size_t n = 0; n < good.size(); ++n) {
    std::vector<uint8_t> cut(good.begin(), good.begin() + n);
    EXPECT_FALSE(SafetensorsFile::Parse(cut).ok()) << "accepted a file cut to " << n << " bytes";
  }
  EXPECT_TRUE(SafetensorsFile::Parse(good).ok());
}

class ShardedCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("kraken_ckpt_" + std::to_string(::getpid()) + "_" +
                                                     ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void Write(const std::string& name, const std::vector<uint8_t>& bytes) {
    std::ofstream(dir_ / name, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  void WriteText(const std::string& name, const std::string& text) { std::ofstream(dir_ / name) << text; }
  std::filesystem::path dir_;
};

TEST_F(ShardedCheckpoint, LoadsShardsThroughTheIndex) {
  Write("s1.safetensors", Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4));
  Write("s2.safetensors", Build(R"({"b":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", 4));
  WriteText("model.safetensors.index.json", R"({"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}})");
  auto c = Checkpoint::Open(dir_.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_NE((*c)->Find("a"), nullptr);
  EXPECT_EQ((*c)->Find("b")->dtype, DType::kF16);
  EXPECT_EQ((*c)->Names(), (std::vector<std::string>{"a", "b"}));
}

TEST_F(ShardedCheckpoint, RejectsInconsistentIndexes) {
  Write("s1.safetensors", Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4));
  Write("s2.safetensors", Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4));
  struct Case {
    std::string index, expect;
  } cases[] = {
      {R"({"weight_map":{"a":"s1.safetensors","x":"s1.safetensors"}})", "'x' is listed in shard"},
      {R"({"weight_map":{}})", ""},  // empty map: nothing to load is fine
      {R"({"weight_map":{"a":"../s1.safetensors"}})", "not a plain file name"},
      {R"({"weight_map":{"a":"s2.safetensors","q":"s1.safetensors"}})", "'q' is listed in shard"},
      {R"({"nope":1})", "missing object field 'weight_map'"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.index);
    WriteText("model.safetensors.index.json", c.index);
    auto r = Checkpoint::Open(dir_.string());
    if (c.expect.empty()) {
      EXPECT_TRUE(r.ok()) << r.status();
    } else {
      ASSERT_FALSE(r.ok());
      EXPECT_NE(std::string(r.status().message()).find(c.expect), std::string::npos) << r.status();
    }
  }
  // A shard holding a tensor the index does not list.
  Write("s3.safetensors", Build(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                8));
  WriteText("model.safetensors.index.json", R"({"weight_map":{"a":"s3.safetensors"}})");
  auto r = Checkpoint::Open(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("'b' is not listed"), std::string::npos) << r.status();
  // A second shard that repeats a name listed for the first.
  WriteText("model.safetensors.index.json", R"({"weight_map":{"a":"s1.safetensors","b":"s3.safetensors"}})");
  r = Checkpoint::Open(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find("'a' is not listed"), std::string::npos) << r.status();
}

TEST_F(ShardedCheckpoint, MissingFilesAreNotFound) {
  auto r = Checkpoint::Open(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  WriteText("model.safetensors.index.json", R"({"weight_map":{"a":"absent.safetensors"}})");
  r = Checkpoint::Open(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
}

TEST(Safetensors, ReadsTheCommittedTestModels) {
  for (const char* name : {"kraken-n4-bf16", "parallel-block-f16-sharded", "gpt2-f32"}) {
    auto c = Checkpoint::Open(testing::TestModelDir(name));
    ASSERT_TRUE(c.ok()) << name << ": " << c.status();
    EXPECT_GT((*c)->Names().size(), 10u) << name;
  }
}

}  // namespace
}  // namespace kraken::engine
