// The narrow interface the models are written against: memory, weight preparation and the ops a
// GPT-style transformer needs. The CPU backend is always built; the CUDA backend
// (engine/cuda/cuda_backend.cc) only with KRAKEN_ENABLE_CUDA (otherwise "cuda:*" devices get
// UNIMPLEMENTED "built without CUDA"). Ops on a CUDA backend are asynchronous: they are queued on
// its stream, and Synchronize reports the first device error.
//
//   KRAKEN_ASSIGN_OR_RETURN(auto backend, CreateBackend({.device = Device::Cpu(), .threads = 2}));
//   KRAKEN_ASSIGN_OR_RETURN(Buffer x, backend->Allocate(tokens * d));
//   backend->LayerNorm(Mat(x.data(), tokens, d), ln.weight, ln.bias, 1e-5f, Mat(y.data(), tokens, d));
//
// Activations are F32 matrices (`Mat`) in the backend's memory. Ops check shapes with KRAKEN_CHECK:
// a mismatch is a programmer error, since models validate their inputs before calling ops.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "engine/batch.h"
#include "engine/device.h"
#include "engine/dtype.h"
#include "engine/safetensors.h"

namespace kraken::engine {

/// A row-major F32 matrix view [rows, cols] with row stride `stride` (elements).
struct Mat {
  float* data = nullptr;
  int rows = 0;
  int cols = 0;
  int64_t stride = 0;

  Mat() = default;
  Mat(float* d, int r, int c) : data(d), rows(r), cols(c), stride(c) {}
  Mat(float* d, int r, int c, int64_t s) : data(d), rows(r), cols(c), stride(s) {}
  /// Rows [r0, r0 + n).
  Mat RowRange(int r0, int n) const { return Mat(data + r0 * stride, n, cols, stride); }
  /// Columns [c0, c0 + n) (same stride).
  Mat ColRange(int c0, int n) const { return Mat(data + c0, rows, n, stride); }
  float* Row(int r) const { return data + r * stride; }
};

/// Device memory owned by a backend; freed when destroyed.
class Buffer {
 public:
  Buffer() = default;
  Buffer(float* data, int64_t size, void (*free_fn)(float*)) : data_(data), size_(size), free_(free_fn) {}
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(free_, o.free_);
    return *this;
  }
  ~Buffer() {
    if (data_ != nullptr && free_ != nullptr) free_(data_);
  }
  float* data() const { return data_; }
  /// Size in floats.
  int64_t size() const { return size_; }

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
  void (*free_)(float*) = nullptr;
};

/// How a weight matrix is read from a checkpoint tensor as the logical matrix W [out, in] that
/// a Linear computes y = x W^T with. `out_ranges` picks output features (a tensor-parallel shard
/// takes several ranges, e.g. its heads of q, k and v); `in_begin`/`in_count` pick input features.
struct LinearSource {
  const TensorInfo* tensor = nullptr;
  bool in_major = false;  // false: tensor is [out, in] (PyTorch Linear); true: [in, out] (HF Conv1D)
  std::vector<std::pair<int, int>> out_ranges;  // [begin, begin + count) pairs; empty = all
  int in_begin = 0;
  int in_count = -1;  // -1 = all
};

/// A weight matrix prepared by a backend for its Linear op (packed, stored dtype kept).
class LinearWeight {
 public:
  virtual ~LinearWeight() = default;
  int in_features() const { return in_; }
  int out_features() const { return out_; }
  virtual size_t bytes() const = 0;

 protected:
  int in_ = 0, out_ = 0;
};

/// One slot of the paged KV cache (one attention block: a layer, or a layer's sub-layer).
/// Per physical block, K is stored transposed [heads][head_dim][block_size] and V as
/// [heads][block_size][head_dim]; `block_elems` = heads * head_dim * block_size elements of
/// `dtype` (F32, BF16 or F16; 16-bit entries are rounded to nearest even when written and widened
/// exactly when read, so attention still computes in F32).
struct KvSlot {
  void* k = nullptr;
  void* v = nullptr;
  DType dtype = DType::kF32;
  int heads = 0;
  int head_dim = 0;
  int block_size = 16;
  int num_blocks = 0;
  int64_t block_elems() const { return static_cast<int64_t>(heads) * head_dim * block_size; }
};

/// Largest work a model will hand the backend in one step, so scratch space can be reserved at
/// load and a step allocates nothing.
struct ScratchHint {
  int max_tokens = 0;  // rows of any activation
  int max_seqs = 0;    // sequences per step
  int max_heads = 0;   // attention heads per slot
  int max_head_dim = 0;
  int max_gemm_k = 0;  // widest GEMM input (columns of x)
};

/// Memory of a backend's device, in bytes.
struct DeviceMemory {
  int64_t total = 0;  // the device's capacity
  int64_t free = 0;   // not allocated by any process now
};

/// Backend construction options.
struct BackendOptions {
  Device device;    // the CPU, or a CUDA device
  int threads = 0;  // CPU compute threads; 0 = all available cores
};

class Backend {
 public:
  virtual ~Backend() = default;
  /// "cpu" or "cuda:0", for logs.
  virtual std::string name() const = 0;
  /// True when device memory is host memory (results can be read without Download).
  virtual bool is_host() const = 0;
  /// The stream this backend enqueues work on (a cudaStream_t for CUDA), so a communicator can
  /// order its collectives after the compute that produced their input; nullptr for the CPU.
  virtual void* native_stream() const { return nullptr; }

  /// The device's memory now (CUDA: cudaMemGetInfo). UNIMPLEMENTED for the CPU, whose memory the
  /// host's processes share: the caller decides each worker's share (runtime/memory.h).
  virtual StatusOr<DeviceMemory> MemoryInfo() const;
  /// Bytes this backend holds for its own ops (GEMM packing, attention tiles, staging buffers),
  /// beyond what Allocate handed out.
  virtual int64_t scratch_bytes() const = 0;

  /// Allocates `floats` zeroed floats of device memory. RESOURCE_EXHAUSTED when it cannot.
  virtual StatusOr<Buffer> Allocate(int64_t floats) = 0;
  /// Copies `n` floats host -> device / device -> host.
  virtual void Upload(const float* host, float* device, int64_t n) = 0;
  virtual void Download(const float* device, float* host, int64_t n) = 0;

  /// Prepares a weight matrix. INVALID_ARGUMENT if the dtype cannot be multiplied or a range is
  /// out of the tensor's bounds.
  virtual StatusOr<std::unique_ptr<LinearWeight>> PrepareLinear(const LinearSource& src) = 0;
  /// Copies elements [begin, begin + count) of each range of a 1-D or 2-D tensor (flattened),
  /// converted to F32, into device memory (Allocate + Upload; the same for every backend).
  /// INVALID_ARGUMENT for a dtype other than F32/F16/BF16 or a range outside the tensor.
  StatusOr<Buffer> PrepareVector(const TensorInfo& t, const std::vector<std::pair<int64_t, int64_t>>& ranges);

  // ---- Ops ---------------------------------------------------------------------------------
  /// out[t] = wte[tokens[t]] + wpe[positions[t]]; tokens/positions are host arrays of out.rows
  /// entries, already validated; wte is the prepared [V, cols] matrix (the same one the tied LM
  /// head multiplies with, read in its stored dtype and widened exactly to F32), wpe [P, cols] in
  /// device memory.
  virtual void Embed(const int32_t* tokens, const int32_t* positions, const LinearWeight& wte, const float* wpe,
                     Mat out) = 0;
  /// y = (x - mean) / sqrt(var + eps) * w (+ b) per row (biased variance). y may alias x.
  virtual void LayerNorm(Mat x, const float* w, const float* b, float eps, Mat y) = 0;
  /// y = x W^T (+ bias), or y += x W^T (+ bias) when accumulate. x and y must not overlap.
  virtual void Linear(Mat x, const LinearWeight& w, const float* bias, Mat y, bool accumulate) = 0;
  /// x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in place (GPT-2's "gelu_new").
  virtual void GeluTanh(Mat x) = 0;
  /// out = a + b elementwise (out may alias a or b).
  virtual void Add(Mat a, Mat b, Mat out) = 0;
  /// dst = src (same shape; must not overlap).
  virtual void Copy(Mat src, Mat dst) = 0;
  /// dst row i = src row rows[i] (rows: host array of dst.rows indices); dst must not overlap src.
  virtual void GatherRows(Mat src, const int32_t* rows, Mat dst) = 0;
  /// Stores k and v rows ([T, heads * head_dim], head-major columns) of every sequence into its
  /// KV blocks at positions start_pos + i, in the slot's dtype (rounded to nearest even).
  virtual void WriteKv(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch) = 0;
  /// Causal attention: query row i of a sequence attends to its cached keys 0 .. start_pos + i.
  /// q, out: [T, heads * head_dim]; scores are scaled by `scale` before the softmax.
  virtual void Attention(Mat q, const KvSlot& slot, const AttentionBatch& batch, float scale, Mat out) = 0;
  /// Reserves scratch for steps up to `hint` (attention buffers assume KV blocks of at most 16
  /// tokens; larger blocks grow them once, on the first step). RESOURCE_EXHAUSTED on failure.
  virtual Status ReserveScratch(const ScratchHint& hint) = 0;
  /// Waits for queued work; reports asynchronous device errors.
  virtual Status Synchronize() = 0;
};

/// A LinearSource checked against its tensor, for a backend's PrepareLinear: the logical matrix
/// W [out_total, in_total] of the whole tensor and the part selected.
struct LinearSelection {
  int64_t out_total = 0, in_total = 0;
  int64_t in_begin = 0, in = 0;  // input features [in_begin, in_begin + in)
  std::vector<int> rows;         // selected output features, in order
};

/// Validates `src`: a 2-D F32/F16/BF16 tensor, ranges inside it, 1 .. 2^30 rows and columns
/// selected. INVALID_ARGUMENT naming the tensor otherwise.
StatusOr<LinearSelection> SelectLinear(const LinearSource& src);

/// Creates the backend for `options.device`'s kind (engine/backend_factory.cc). A CUDA device
/// returns UNIMPLEMENTED ("built without CUDA") unless KRAKEN_ENABLE_CUDA was on, and the CUDA
/// backend's errors (no such device, out of memory) otherwise; a negative thread count gives
/// INVALID_ARGUMENT.
StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options);

/// Each kind's own factory, which CreateBackend chooses from (engine/cpu/cpu_backend.cc,
/// engine/cuda/cuda_backend.cc or its stub).
StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const BackendOptions& options);
StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options);

}  // namespace kraken::engine
