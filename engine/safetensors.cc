#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "base/json_util.h"

namespace kraken::engine {
namespace {

using json = nlohmann::json;

// A safetensors header is {name: {dtype, shape: [...], data_offsets: [...]}, __metadata__: {...}}.
constexpr int kMaxJsonDepth = 3;

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorInfo::ShapeString() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) StrAppend(&s, i ? ", " : "", shape[i]);
  return s + "]";
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NotFound("cannot open safetensors file '", path, "'");
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return InvalidArgument("'", path, "' is not a regular file");
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->label_ = path;
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return InvalidArgument(path, ": file is ", size, " bytes, shorter than the 8-byte header size");
  }
  void* m = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) return Internal("mmap of '", path, "' failed");
  f->map_ = m;
  f->map_size_ = size;
  KRAKEN_RETURN_IF_ERROR(f->ParseBytes({static_cast<const uint8_t*>(m), size}));
  return f;
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(std::span<const uint8_t> bytes, std::string label) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->label_ = std::move(label);
  KRAKEN_RETURN_IF_ERROR(f->ParseBytes(bytes));
  return f;
}

namespace {

// One tensor's header entry: its dtype, shape and data offsets, checked against each other and
// against the data buffer (`buffer`, `buffer_size` bytes). INVALID_ARGUMENT naming the tensor and
// the field otherwise.
StatusOr<TensorInfo> ReadTensorEntry(const std::string& L, const std::string& name, const json& v,
                                     const uint8_t* buffer, uint64_t buffer_size) {
  if (!v.is_object()) return InvalidArgument(L, ": tensor '", name, "': entry is not an object");
  for (auto f = v.begin(); f != v.end(); ++f) {
    if (f.key() != "dtype" && f.key() != "shape" && f.key() != "data_offsets") {
      return InvalidArgument(L, ": tensor '", name, "': unknown field '", f.key(), "'");
    }
  }
  TensorInfo t;
  t.name = name;
  auto dt = v.find("dtype");
  if (dt == v.end() || !dt->is_string()) {
    return InvalidArgument(L, ": tensor '", name, "': missing string field 'dtype'");
  }
  const std::string dtype_name = dt->get<std::string>();
  std::optional<DType> dtype = ParseDType(dtype_name);
  if (!dtype) {
    return InvalidArgument(L, ": tensor '", name, "': dtype '", dtype_name,
                           "' is not a safetensors dtype of whole bytes");
  }
  t.dtype = *dtype;
  auto sh = v.find("shape");
  if (sh == v.end() || !sh->is_array()) {
    return InvalidArgument(L, ": tensor '", name, "': missing array field 'shape'");
  }
  if (sh->size() > 8) {
    return InvalidArgument(L, ": tensor '", name, "': shape has ", sh->size(), " dimensions (max 8)");
  }
  uint64_t numel = 1;
  for (const json& d : *sh) {
    if (!d.is_number_unsigned()) {
      return InvalidArgument(L, ": tensor '", name, "': shape entries must be non-negative integers, got ",
                             DescribeJson(d));
    }
    const uint64_t dim = d.get<uint64_t>();
    if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) || MulOverflows(numel, dim, &numel)) {
      return InvalidArgument(L, ": tensor '", name, "': shape ", DescribeJson(*sh), " overflows");
    }
    t.shape.push_back(static_cast<int64_t>(dim));
  }
  auto off = v.find("data_offsets");
  if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned()) {
    return InvalidArgument(L, ": tensor '", name, "': 'data_offsets' must be two non-negative integers [begin, end]");
  }
  const uint64_t begin = (*off)[0].get<uint64_t>();
  const uint64_t end = (*off)[1].get<uint64_t>();
  if (begin > end) {
    return InvalidArgument(L, ": tensor '", name, "': data_offsets begin ", begin, " > end ", end);
  }
  if (end > buffer_size) {
    return InvalidArgument(L, ": tensor '", name, "': data_offsets end ", end, " is past the end of the data buffer (",
                           buffer_size, " bytes)");
  }
  uint64_t expected = 0;
  if (MulOverflows(numel, DTypeSize(t.dtype), &expected) || expected != end - begin) {
    return InvalidArgument(L, ": tensor '", name, "': shape ", DescribeJson(*sh), " of ", dtype_name, " needs ",
                           numel * DTypeSize(t.dtype), " bytes but data_offsets span ", end - begin);
  }
  t.data = buffer + begin;
  t.nbytes = end - begin;
  return t;
}

}  // namespace

Status SafetensorsFile::ParseBytes(std::span<const uint8_t> bytes) {
  const std::string& L = label_;
  if (bytes.size() < 8) {
    return InvalidArgument(L, ": file is ", bytes.size(), " bytes, shorter than the 8-byte header size");
  }
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = header_size << 8 | bytes[i];
  if (header_size > kMaxSafetensorsHeaderBytes) {
    return InvalidArgument(L, ": header size ", header_size, " exceeds the limit of ", kMaxSafetensorsHeaderBytes,
                           " bytes");
  }
  if (header_size > bytes.size() - 8) {
    return InvalidArgument(L, ": header size ", header_size, " runs past the end of the file (", bytes.size(),
                           " bytes)");
  }
  const std::string_view header(reinterpret_cast<const char*>(bytes.data() + 8), header_size);
  if (header.empty() || header.front() != '{') {
    return InvalidArgument(L, ": header must be a JSON object starting with '{'");
  }
  KRAKEN_ASSIGN_OR_RETURN(json j, ParseJsonStrict(header, L, kMaxJsonDepth));
  if (!j.is_object()) return InvalidArgument(L, ": header is not a JSON object");

  const uint8_t* buffer = bytes.data() + 8 + header_size;
  const uint64_t buffer_size = bytes.size() - 8 - header_size;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [begin, end)

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return InvalidArgument(L, ": '__metadata__' must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          return InvalidArgument(L, ": '__metadata__' value for '", m.key(), "' is not a string");
        }
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    KRAKEN_ASSIGN_OR_RETURN(TensorInfo t, ReadTensorEntry(L, name, v, buffer, buffer_size));
    const uint64_t begin = static_cast<uint64_t>(t.data - buffer);
    ranges.emplace_back(begin, begin + t.nbytes);
    tensors_.emplace(name, std::move(t));
  }

  std::sort(ranges.begin(), ranges.end());
  uint64_t cursor = 0;
  for (const auto& [b, e] : ranges) {
    if (b < cursor) return InvalidArgument(L, ": tensor data ranges overlap at byte offset ", b);
    if (b > cursor) {
      return InvalidArgument(L, ": bytes ", cursor, "..", b, " of the data buffer belong to no tensor");
    }
    cursor = e;
  }
  if (cursor != buffer_size) {
    return InvalidArgument(L, ": data buffer has ", buffer_size - cursor, " trailing bytes that belong to no tensor");
  }
  return absl::OkStatus();
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::unique_ptr<Checkpoint> Checkpoint::FromFile(std::unique_ptr<SafetensorsFile> file) {
  auto c = std::make_unique<Checkpoint>();
  for (const auto& [name, info] : file->tensors()) c->index_.emplace(name, &info);
  c->files_.push_back(std::move(file));
  return c;
}

StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  std::error_code ec;
  if (fs::exists(single, ec)) {
    KRAKEN_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single.string()));
    return FromFile(std::move(file));
  }
  if (!fs::exists(index_path, ec)) {
    return NotFound("no model.safetensors or model.safetensors.index.json in '", dir, "'");
  }
  std::ifstream in(index_path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string L = index_path.string();
  KRAKEN_ASSIGN_OR_RETURN(json j, ParseJsonStrict(text, L, kMaxJsonDepth));
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    return InvalidArgument(L, ": missing object field 'weight_map'");
  }
  std::map<std::string, std::vector<std::string>> by_shard;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) {
      return InvalidArgument(L, ": weight_map entry for '", it.key(), "' is not a string");
    }
    const std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      return InvalidArgument(L, ": weight_map entry for '", it.key(), "' names '", shard,
                             "', which is not a plain file name in the model directory");
    }
    by_shard[shard].push_back(it.key());
  }
  auto c = std::make_unique<Checkpoint>();
  for (const auto& [shard, names] : by_shard) {
    KRAKEN_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((fs::path(dir) / shard).string()));
    std::set<std::string, std::less<>> listed(names.begin(), names.end());
    for (const std::string& n : names) {
      if (file->Find(n) == nullptr) {
        return InvalidArgument(L, ": tensor '", n, "' is listed in shard '", shard, "' but absent from it");
      }
    }
    for (const auto& [name, info] : file->tensors()) {
      if (!listed.contains(name)) {
        return InvalidArgument(shard, ": tensor '", name, "' is not listed in the index's weight_map");
      }
      if (!c->index_.emplace(name, &info).second) {
        return InvalidArgument(L, ": tensor '", name, "' appears in two shards");
      }
    }
    c->files_.push_back(std::move(file));
  }
  return c;
}

const TensorInfo* Checkpoint::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

std::vector<std::string> Checkpoint::NamesWithPrefix(std::string_view prefix) const {
  std::vector<std::string> names;
  for (auto it = index_.lower_bound(prefix); it != index_.end() && it->first.compare(0, prefix.size(), prefix) == 0;
       ++it) {
    names.push_back(it->first);
  }
  return names;
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [n, _] : index_) names.push_back(n);
  return names;
}

}  // namespace kraken::engine
