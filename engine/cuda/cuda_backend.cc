// The CUDA backend: device memory, cuBLAS GEMMs, the kernels of engine/cuda/kernels.cu, all on
// one non-blocking compute stream per backend. Built only with KRAKEN_ENABLE_CUDA=ON.
//
// GEMMs (y = x W^T, cuBLAS column-major view: y^T [out, T] = W [out, in] · x^T [in, T], so
// cublasGemmEx(OP_T, OP_N, m = out, n = T, k = in)):
//   F32 weights       : F32 x F32 -> F32, CUBLAS_COMPUTE_32F (no TF32; same math as the CPU).
//   BF16 / F16 weights: the activations are rounded to the weights' type in a scratch buffer, then
//                       16-bit x 16-bit -> F32 with CUBLAS_COMPUTE_32F (tensor cores, F32
//                       accumulation). cuBLAS docs, "cublasGemmEx", supported type combinations.
// A bias is written (or added) into y first and the GEMM then runs with beta = 1, which also fuses
// the residual add when the model accumulates into its residual stream.
//
// The ops take per-step host arrays (token ids, positions, block tables). They are copied through
// pinned staging buffers with cudaMemcpyAsync on the compute stream; metadata that is the same
// for every attention slot of a step is uploaded once and reused.
//
// Errors: ops have no return value; the first error is kept and returned by the next Synchronize.
// A CUDA or cuBLAS error is UNAVAILABLE and stays (a device fault leaves the CUDA context
// unusable, so the worker must be restarted); a failed scratch allocation is RESOURCE_EXHAUSTED
// and fails only that step.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/kernels.h"

namespace kraken::engine {

namespace {

void FreeDevice(float* p) {
  cudaFree(p);
}

std::string CudaMessage(cudaError_t e) {
  return StrCat(cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

/// A weight matrix in device memory, [out, in] row-major in its stored dtype (F32, F16 or BF16).
class CudaLinear final : public LinearWeight {
 public:
  CudaLinear(void* data, DType dtype, int out, int in) : data_(data), dtype_(dtype) {
    out_ = out;
    in_ = in;
  }
  ~CudaLinear() override { cudaFree(data_); }
  size_t bytes() const override { return static_cast<size_t>(out_) * in_ * DTypeSize(dtype_); }
  const void* data() const { return data_; }
  DType dtype() const { return dtype_; }

 private:
  void* data_;
  DType dtype_;
};

/// A host array copied to device memory through a pinned staging buffer on a stream. The staging
/// buffer is reused only after the previous copy out of it has finished (an event guards it).
class StagedArray {
 public:
  StagedArray() = default;
  StagedArray(const StagedArray&) = delete;
  StagedArray& operator=(const StagedArray&) = delete;
  ~StagedArray() { Release(); }

  /// Copies `bytes` from host memory `src` to the device buffer (grown when needed); returns it.
  StatusOr<void*> Upload(const void* src, size_t bytes, cudaStream_t stream) {
    if (done_ == nullptr) {
      if (cudaError_t e = cudaEventCreateWithFlags(&done_, cudaEventDisableTiming); e != cudaSuccess) {
        return absl::UnavailableError(StrCat("cudaEventCreate: ", CudaMessage(e)));
      }
    }
    if (cudaError_t e = cudaEventSynchronize(done_); e != cudaSuccess) {
      return absl::UnavailableError(StrCat("cudaEventSynchronize: ", CudaMessage(e)));
    }
    if (bytes > capacity_ || device_ == nullptr) {  // (an empty array still gets a valid pointer)
      // Device buffers may still be read by queued kernels: cudaFree waits for the device.
      Release();
      if (cudaEventCreateWithFlags(&done_, cudaEventDisableTiming) != cudaSuccess) {
        return absl::UnavailableError("cudaEventCreate failed");
      }
      const size_t cap = std::max<size_t>(bytes + bytes / 2, 4096);  // grow geometrically: block tables lengthen
      if (cudaError_t e = cudaMallocHost(&pinned_, cap); e != cudaSuccess) {
        cudaGetLastError();  // not sticky: leave no error for the next launch check to blame
        pinned_ = nullptr;
        return ResourceExhausted("cannot allocate ", cap, " bytes of pinned host memory: ", CudaMessage(e));
      }
      if (cudaError_t e = cudaMalloc(&device_, cap); e != cudaSuccess) {
        cudaGetLastError();
        device_ = nullptr;
        return ResourceExhausted("cannot allocate ", cap, " bytes of device memory: ", CudaMessage(e));
      }
      capacity_ = cap;
    }
    if (bytes == 0) return device_;
    std::memcpy(pinned_, src, bytes);
    if (cudaError_t e = cudaMemcpyAsync(device_, pinned_, bytes, cudaMemcpyHostToDevice, stream); e != cudaSuccess) {
      return absl::UnavailableError(StrCat("cudaMemcpyAsync: ", CudaMessage(e)));
    }
    if (cudaError_t e = cudaEventRecord(done_, stream); e != cudaSuccess) {
      return absl::UnavailableError(StrCat("cudaEventRecord: ", CudaMessage(e)));
    }
    return device_;
  }

  /// Bytes of device memory held (the pinned host copy is as large).
  size_t capacity() const { return capacity_; }

 private:
  void Release() {
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (device_ != nullptr) cudaFree(device_);
    done_ = nullptr;
    pinned_ = nullptr;
    device_ = nullptr;
    capacity_ = 0;
  }

  cudaEvent_t done_ = nullptr;
  void* pinned_ = nullptr;
  void* device_ = nullptr;
  size_t capacity_ = 0;
};

/// The per-step attention metadata derived from an AttentionBatch (host copies kept to tell
/// whether the device copies are current).
struct AttentionMeta {
  std::vector<AttentionSeq> seqs;        // the batch it was built from (block_table pointers unused)
  std::vector<cuda::AttentionRow> rows;  // per new token: its activation row, position, table, KV slot
  std::vector<int32_t> tables;           // the sequences' used block tables, concatenated
  int block_size = 0;
  int max_row = -1;                         // largest activation row named
  std::vector<cuda::AttentionTile> tiles;   // prefill runs of up to kQueryTile rows (tiled kernel)
  std::vector<cuda::AttentionRow> singles;  // the other rows (per-row kernel)

  void Build(const AttentionBatch& batch) {
    seqs.assign(batch.seqs.begin(), batch.seqs.end());
    block_size = batch.block_size;
    max_row = cuda::BuildAttentionRows(batch, &rows, &tables);
    cuda::BuildAttentionTiles(rows, &tiles, &singles);
  }
  // Whether this was built from a batch equal to `b`: the same sequences and block-table contents
  // (every slot of a step passes the same batch; this costs O(sequences + blocks), not O(tokens)).
  bool Describes(const AttentionBatch& b) const {
    if (b.block_size != block_size || b.seqs.size() != seqs.size()) return false;
    size_t at = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const AttentionSeq &x = b.seqs[i], &y = seqs[i];
      if (x.token_begin != y.token_begin || x.num_tokens != y.num_tokens || x.start_pos != y.start_pos) return false;
      const size_t used = static_cast<size_t>((x.start_pos + x.num_tokens + block_size - 1) / block_size);
      if (!std::equal(x.block_table, x.block_table + used, tables.begin() + at)) return false;
      at += used;
    }
    return true;
  }
};

constexpr int kMaxHeadDim = 4096;  // attention keeps 2 * head_dim floats per thread block in shared memory

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, cudaStream_t stream, cublasHandle_t cublas)
      : device_(device), stream_(stream), cublas_(cublas) {}
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    if (half_x_ != nullptr) cudaFree(half_x_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return StrCat("cuda:", device_); }
  bool is_host() const override { return false; }
  void* native_stream() const override { return stream_; }

  StatusOr<Buffer> Allocate(int64_t floats) override {
    if (floats < 0 || floats > (int64_t{1} << 40)) {
      return ResourceExhausted("cannot allocate ", floats, " floats of device memory on ", name());
    }
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(floats, 1)) * sizeof(float);
    void* p = nullptr;
    if (cudaError_t e = cudaMalloc(&p, bytes); e != cudaSuccess) {
      cudaGetLastError();  // an out-of-memory error is not sticky; clear it
      return ResourceExhausted("cannot allocate ", bytes, " bytes of device memory on ", name(), ": ", CudaMessage(e));
    }
    if (cudaError_t e = cudaMemsetAsync(p, 0, bytes, stream_); e != cudaSuccess) {
      cudaFree(p);
      return absl::UnavailableError(StrCat("cudaMemsetAsync on ", name(), ": ", CudaMessage(e)));
    }
    return Buffer(static_cast<float*>(p), floats, &FreeDevice);
  }
  void Upload(const float* host, float* device, int64_t n) override {
    Record(cudaMemcpyAsync(device, host, n * sizeof(float), cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    Record(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // `host` may be pageable and short-lived
  }
  void Download(const float* device, float* host, int64_t n) override {
    Record(cudaMemcpyAsync(host, device, n * sizeof(float), cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
    Record(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  StatusOr<std::unique_ptr<LinearWeight>> PrepareLinear(const LinearSource& src) override {
    KRAKEN_ASSIGN_OR_RETURN(const LinearSelection sel, SelectLinear(src));
    const TensorInfo& t = *src.tensor;
    // Gather the selected [out, in] block on the host in the stored dtype, then copy it once.
    const size_t es = DTypeSize(t.dtype);
    const int64_t in = sel.in, out = static_cast<int64_t>(sel.rows.size());
    std::vector<uint8_t> host(static_cast<size_t>(out) * in * es);
    for (int64_t row = 0; row < out; ++row) {
      const int64_t r = sel.rows[row];
      uint8_t* dst = host.data() + row * in * es;
      if (!src.in_major) {
        std::memcpy(dst, t.data + (r * sel.in_total + sel.in_begin) * es, in * es);
      } else {
        for (int64_t c = 0; c < in; ++c) {
          std::memcpy(dst + c * es, t.data + ((sel.in_begin + c) * sel.out_total + r) * es, es);
        }
      }
    }
    void* d = nullptr;
    if (cudaError_t e = cudaMalloc(&d, host.size()); e != cudaSuccess) {
      cudaGetLastError();
      return ResourceExhausted("cannot allocate ", host.size(), " bytes for tensor '", t.name, "' on ", name(), ": ",
                               CudaMessage(e));
    }
    if (cudaError_t e = cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice); e != cudaSuccess) {
      cudaFree(d);
      return absl::UnavailableError(StrCat("copying tensor '", t.name, "' to ", name(), ": ", CudaMessage(e)));
    }
    return std::unique_ptr<LinearWeight>(new CudaLinear(d, t.dtype, static_cast<int>(out), static_cast<int>(in)));
  }

  void Embed(const int32_t* tokens, const int32_t* positions, const LinearWeight& wte, const float* wpe,
             Mat out) override {
    KRAKEN_CHECK(wte.in_features() == out.cols, "Embed width mismatch");
    const auto& table = static_cast<const CudaLinear&>(wte);
    const size_t bytes = static_cast<size_t>(out.rows) * sizeof(int32_t);
    auto t = Stage(tokens_, tokens, bytes);
    auto p = Stage(positions_, positions, bytes);
    if (t == nullptr || p == nullptr) return;
    cuda::LaunchEmbed(static_cast<const int32_t*>(t), static_cast<const int32_t*>(p), table.data(),
                      cuda::StorageOf(table.dtype()), wpe, out.data, out.rows, out.cols, out.stride, stream_);
    RecordLaunch("Embed");
  }
  void LayerNorm(Mat x, const float* w, const float* b, float eps, Mat y) override {
    KRAKEN_CHECK(x.rows == y.rows && x.cols == y.cols);
    cuda::LaunchLayerNorm(x.data, x.stride, w, b, eps, y.data, y.stride, x.rows, x.cols, stream_);
    RecordLaunch("LayerNorm");
  }
  void Linear(Mat x, const LinearWeight& w, const float* bias, Mat y, bool accumulate) override {
    KRAKEN_CHECK(x.cols == w.in_features() && y.cols == w.out_features() && x.rows == y.rows, "Linear shape mismatch");
    if (x.rows == 0) return;
    const auto& lw = static_cast<const CudaLinear&>(w);
    const float alpha = 1.f;
    float beta = accumulate ? 1.f : 0.f;
    if (bias != nullptr) {
      cuda::LaunchBiasRows(bias, y.data, y.stride, y.rows, y.cols, accumulate, stream_);
      RecordLaunch("bias");
      beta = 1.f;
    }
    const int m = y.cols, n = x.rows, k = x.cols;
    cublasStatus_t s;
    if (lw.dtype() == DType::kF32) {
      s = cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, lw.data(), CUDA_R_32F, k, x.data, CUDA_R_32F,
                       static_cast<int>(x.stride), &beta, y.data, CUDA_R_32F, static_cast<int>(y.stride),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    } else {
      const bool bf16 = lw.dtype() == DType::kBF16;
      const cudaDataType_t type = bf16 ? CUDA_R_16BF : CUDA_R_16F;
      if (!GrowHalf(static_cast<size_t>(n) * k)) return;
      cuda::LaunchToHalf(x.data, x.stride, n, k, half_x_, bf16, stream_);
      RecordLaunch("ToHalf");
      s = cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, lw.data(), type, k, half_x_, type, k, &beta,
                       y.data, CUDA_R_32F, static_cast<int>(y.stride), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    if (s != CUBLAS_STATUS_SUCCESS && error_.ok()) {
      error_ = absl::UnavailableError(StrCat("cublasGemmEx on ", name(), " (", m, " x ", n, " x ", k,
                                             "): ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ")"));
    }
  }
  void GeluTanh(Mat x) override {
    cuda::LaunchGeluTanh(x.data, x.stride, x.rows, x.cols, stream_);
    RecordLaunch("GeluTanh");
  }
  void Add(Mat a, Mat b, Mat out) override {
    KRAKEN_CHECK(a.rows == out.rows && b.rows == out.rows && a.cols == out.cols && b.cols == out.cols);
    cuda::LaunchAdd(a.data, a.stride, b.data, b.stride, out.data, out.stride, out.rows, out.cols, stream_);
    RecordLaunch("Add");
  }
  void Copy(Mat src, Mat dst) override {
    KRAKEN_CHECK(src.rows == dst.rows && src.cols == dst.cols);
    if (src.rows == 0) return;
    Record(cudaMemcpy2DAsync(dst.data, dst.stride * sizeof(float), src.data, src.stride * sizeof(float),
                             src.cols * sizeof(float), src.rows, cudaMemcpyDeviceToDevice, stream_),
           "cudaMemcpy2DAsync");
  }
  void GatherRows(Mat src, const int32_t* rows, Mat dst) override {
    KRAKEN_CHECK(src.cols == dst.cols);
    auto r = Stage(gather_rows_, rows, static_cast<size_t>(dst.rows) * sizeof(int32_t));
    if (r == nullptr) return;
    cuda::LaunchGatherRows(src.data, src.stride, static_cast<const int32_t*>(r), dst.data, dst.stride, dst.rows,
                           dst.cols, stream_);
    RecordLaunch("GatherRows");
  }
  void WriteKv(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch) override {
    KRAKEN_CHECK(k.cols == slot.heads * slot.head_dim && v.cols == k.cols && slot.block_size == batch.block_size);
    if (!StageAttention(batch)) return;
    KRAKEN_CHECK(meta_.max_row < k.rows && meta_.max_row < v.rows, "attention batch names rows beyond k/v");
    cuda::LaunchWriteKv(k.data, k.stride, v.data, v.stride, slot.k, slot.v, cuda::StorageOf(slot.dtype), rows_dev_,
                        static_cast<int>(meta_.rows.size()), slot.heads, slot.head_dim, slot.block_size, stream_);
    RecordLaunch("WriteKv");
  }
  void Attention(Mat q, const KvSlot& slot, const AttentionBatch& batch, float scale, Mat out) override {
    KRAKEN_CHECK(q.cols == slot.heads * slot.head_dim && out.cols == q.cols && slot.block_size == batch.block_size);
    KRAKEN_CHECK(slot.head_dim <= kMaxHeadDim, "head_dim above the CUDA attention kernel's limit");
    if (!StageAttention(batch)) return;
    KRAKEN_CHECK(meta_.max_row < q.rows && meta_.max_row < out.rows, "attention batch names rows beyond q/out");
    const cuda::Storage kv_type = cuda::StorageOf(slot.dtype);
    if (slot.head_dim <= cuda::kMaxTiledHeadDim) {
      // Prefill runs share each K/V load across up to kQueryTile rows; decode rows go one by one.
      cuda::LaunchTiledAttention(q.data, q.stride, slot.k, slot.v, kv_type, tiles_dev_, tables_dev_,
                                 static_cast<int>(meta_.tiles.size()), slot.heads, slot.head_dim, slot.block_size,
                                 scale, out.data, out.stride, stream_);
      RecordLaunch("TiledAttention");
      cuda::LaunchAttention(q.data, q.stride, slot.k, slot.v, kv_type, singles_dev_, tables_dev_,
                            static_cast<int>(meta_.singles.size()), slot.heads, slot.head_dim, slot.block_size, scale,
                            out.data, out.stride, stream_);
    } else {
      cuda::LaunchAttention(q.data, q.stride, slot.k, slot.v, kv_type, rows_dev_, tables_dev_,
                            static_cast<int>(meta_.rows.size()), slot.heads, slot.head_dim, slot.block_size, scale,
                            out.data, out.stride, stream_);
    }
    RecordLaunch("Attention");
  }
  Status ReserveScratch(const ScratchHint& h) override {
    if (h.max_head_dim > kMaxHeadDim) {
      return InvalidArgument("head_dim ", h.max_head_dim, " exceeds the CUDA attention kernel's limit of ",
                             kMaxHeadDim);
    }
    if (!GrowHalf(static_cast<size_t>(h.max_tokens) * h.max_gemm_k)) return error_;
    return absl::OkStatus();
  }
  StatusOr<DeviceMemory> MemoryInfo() const override {
    size_t free = 0, total = 0;
    if (cudaError_t e = cudaMemGetInfo(&free, &total); e != cudaSuccess) {
      return absl::UnavailableError(StrCat("cudaMemGetInfo on ", name(), ": ", CudaMessage(e)));
    }
    return DeviceMemory{.total = static_cast<int64_t>(total), .free = static_cast<int64_t>(free)};
  }
  int64_t scratch_bytes() const override {
    size_t staged = 0;
    for (const StagedArray* a : {&tokens_, &positions_, &gather_rows_, &rows_, &tables_, &tiles_, &singles_}) {
      staged += a->capacity();
    }
    return static_cast<int64_t>(half_capacity_ * 2 + staged);
  }
  Status Synchronize() override {
    Record(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    Status s = error_;
    // An allocation that failed (RESOURCE_EXHAUSTED) failed this step only; a device fault
    // (UNAVAILABLE) leaves the context unusable and stays.
    if (s.code() == absl::StatusCode::kResourceExhausted) error_ = absl::OkStatus();
    return s;
  }

 private:
  // Keeps the first error.
  void Record(cudaError_t e, const char* what) {
    if (e != cudaSuccess && error_.ok()) {
      error_ = absl::UnavailableError(StrCat(what, " on ", name(), ": ", CudaMessage(e)));
    }
  }
  void RecordLaunch(const char* kernel) { Record(cudaGetLastError(), kernel); }

  // Uploads a host array; nullptr (error kept) on failure.
  void* Stage(StagedArray& a, const void* src, size_t bytes) {
    StatusOr<void*> p = a.Upload(src, bytes, stream_);
    if (!p.ok()) {
      if (error_.ok()) error_ = p.status();
      return nullptr;
    }
    return *p;
  }

  // Makes the device copies of the step's attention metadata current; false on error.
  bool StageAttention(const AttentionBatch& batch) {
    if (meta_valid_ && meta_.Describes(batch)) return true;
    meta_.Build(batch);
    meta_valid_ = false;
    void* r = Stage(rows_, meta_.rows.data(), meta_.rows.size() * sizeof(cuda::AttentionRow));
    void* t = Stage(tables_, meta_.tables.data(), meta_.tables.size() * sizeof(int32_t));
    void* ti = Stage(tiles_, meta_.tiles.data(), meta_.tiles.size() * sizeof(cuda::AttentionTile));
    void* si = Stage(singles_, meta_.singles.data(), meta_.singles.size() * sizeof(cuda::AttentionRow));
    if (r == nullptr || t == nullptr || ti == nullptr || si == nullptr) return false;
    tiles_dev_ = static_cast<const cuda::AttentionTile*>(ti);
    singles_dev_ = static_cast<const cuda::AttentionRow*>(si);
    rows_dev_ = static_cast<const cuda::AttentionRow*>(r);
    tables_dev_ = static_cast<const int32_t*>(t);
    meta_valid_ = true;
    return true;
  }

  // Ensures the 16-bit activation scratch holds `elements`; false (error kept) on failure.
  bool GrowHalf(size_t elements) {
    if (elements <= half_capacity_) return true;
    if (half_x_ != nullptr) {
      Record(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      cudaFree(half_x_);
      half_x_ = nullptr;
      half_capacity_ = 0;
    }
    if (cudaError_t e = cudaMalloc(&half_x_, elements * 2); e != cudaSuccess) {
      cudaGetLastError();
      half_x_ = nullptr;
      if (error_.ok()) {
        error_ = ResourceExhausted("cannot allocate ", elements * 2, " bytes of GEMM scratch on ", name(), ": ",
                                   CudaMessage(e));
      }
      return false;
    }
    half_capacity_ = elements;
    return true;
  }

  int device_;
  cudaStream_t stream_;
  cublasHandle_t cublas_;
  Status error_;
  void* half_x_ = nullptr;
  size_t half_capacity_ = 0;
  StagedArray tokens_, positions_, gather_rows_, rows_, tables_, tiles_, singles_;
  AttentionMeta meta_;
  bool meta_valid_ = false;
  const cuda::AttentionRow* rows_dev_ = nullptr;
  const cuda::AttentionTile* tiles_dev_ = nullptr;
  const cuda::AttentionRow* singles_dev_ = nullptr;
  const int32_t* tables_dev_ = nullptr;
};

}  // namespace

StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options) {
  const int index = options.device.index;
  const std::string dev = options.device.ToString();
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess || count == 0) {
    return FailedPrecondition("device '", dev, "': no usable CUDA device (",
                              e != cudaSuccess ? CudaMessage(e) : std::string("0 devices"), ")");
  }
  if (index >= count) {
    return InvalidArgument("device '", dev, "': index ", index, " is not below the ", count,
                           " CUDA devices this process can see");
  }
  if (cudaError_t e = cudaSetDevice(index); e != cudaSuccess) {
    return FailedPrecondition("cudaSetDevice(", index, "): ", CudaMessage(e));
  }
  cudaStream_t stream = nullptr;
  if (cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess) {
    return FailedPrecondition("cudaStreamCreate on ", dev, ": ", CudaMessage(e));
  }
  cublasHandle_t handle = nullptr;
  if (cublasStatus_t s = cublasCreate(&handle); s != CUBLAS_STATUS_SUCCESS) {
    cudaStreamDestroy(stream);
    return FailedPrecondition("cublasCreate on ", dev, ": ", cublasGetStatusString(s));
  }
  cublasSetStream(handle, stream);
  cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH);
  return std::unique_ptr<Backend>(new CudaBackend(index, stream, handle));
}

}  // namespace kraken::engine
