// safetensors reader: memory-mapped, validated before any tensor byte is touched.
//
// Format (https://huggingface.co/docs/safetensors, "Format"): 8-byte little-endian header size N,
// N bytes of UTF-8 JSON mapping tensor names to {"dtype", "shape", "data_offsets": [begin, end)}
// (offsets relative to the byte buffer after the header) plus an optional "__metadata__" map of
// strings, then the byte buffer. Like the reference implementation we require the buffer to be
// covered exactly: no overlaps, no holes, nothing past the end.
//
//   KRAKEN_ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open("models/kraken-4way"));
//   const TensorInfo* wte = ckpt->Find("transformer.wte.weight");   // nullptr if absent
//
// A sharded checkpoint (model.safetensors.index.json with a "weight_map") opens the same way.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "engine/dtype.h"

namespace kraken::engine {

/// One tensor inside a mapped file. `data` points into the mapping (not necessarily aligned);
/// it stays valid while the owning SafetensorsFile / Checkpoint lives.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // row-major; empty = scalar
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  /// Number of elements (product of `shape`; 1 for a scalar).
  int64_t numel() const;
  /// "[3, 4]" for messages.
  std::string ShapeString() const;
};

/// Largest JSON header accepted, in bytes (the reference implementation's MAX_HEADER_SIZE).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

/// A parsed safetensors file: either memory-mapped from disk (Open) or a view over caller-owned
/// bytes (Parse, used by tests and the fuzzer).
class SafetensorsFile {
 public:
  /// Maps `path` read-only and validates it. Errors: NOT_FOUND (cannot open), INVALID_ARGUMENT
  /// (every malformation, message naming the file, the tensor, the field and the value).
  static StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  /// Validates `bytes` (which must outlive the result). `label` names the source in errors.
  static StatusOr<std::unique_ptr<SafetensorsFile>> Parse(std::span<const uint8_t> bytes,
                                                          std::string label = "<memory>");
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  /// The tensor called `name`, or nullptr.
  const TensorInfo* Find(std::string_view name) const;
  /// All tensors, sorted by name.
  const std::map<std::string, TensorInfo, std::less<>>& tensors() const { return tensors_; }
  /// The "__metadata__" map (empty if absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& label() const { return label_; }

 private:
  SafetensorsFile() = default;
  Status ParseBytes(std::span<const uint8_t> bytes);

  std::string label_;
  void* map_ = nullptr;  // mmap base when opened from a file
  size_t map_size_ = 0;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// The weights of a model directory: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`. Tensor names are unique across shards.
class Checkpoint {
 public:
  /// Opens `dir`. Errors: NOT_FOUND when neither file exists; INVALID_ARGUMENT for a malformed
  /// index (shard names must be plain file names in `dir`), a tensor listed in the index but absent
  /// from its shard, a tensor present in a shard but not in the index, or a name in two shards.
  static StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);
  /// Wraps one already-parsed file (tests).
  static std::unique_ptr<Checkpoint> FromFile(std::unique_ptr<SafetensorsFile> file);

  /// The tensor called `name`, or nullptr.
  const TensorInfo* Find(std::string_view name) const;
  /// Every tensor name, sorted.
  std::vector<std::string> Names() const;
  /// The names that start with `prefix`, sorted (a range lookup, not a scan).
  std::vector<std::string> NamesWithPrefix(std::string_view prefix) const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*, std::less<>> index_;
};

}  // namespace kraken::engine
