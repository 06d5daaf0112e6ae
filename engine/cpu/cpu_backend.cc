// The CPU backend: host memory, packed-weight GEMM, OpenMP threads.
#include <omp.h>

#include <cstdlib>
#include <cstring>

#include "engine/backend.h"
#include "engine/cpu/gemm.h"
#include "engine/cpu/kernels.h"

namespace kraken::engine {

namespace {

class CpuLinear final : public LinearWeight {
 public:
  explicit CpuLinear(cpu::PackedMatrix m) : packed(std::move(m)) {
    in_ = packed.in();
    out_ = packed.out();
  }
  size_t bytes() const override { return packed.bytes(); }
  cpu::PackedMatrix packed;
};

void FreeHost(float* p) {
  std::free(p);
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : threads_(threads) {}

  std::string name() const override { return "cpu"; }
  bool is_host() const override { return true; }

  StatusOr<Buffer> Allocate(int64_t floats) override {
    if (floats < 0 || floats > (int64_t{1} << 60)) {
      return ResourceExhausted("cannot allocate ", floats, " floats of host memory");
    }
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(floats, 1)) * sizeof(float) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) return ResourceExhausted("cannot allocate ", bytes, " bytes of host memory");
    std::memset(p, 0, bytes);
    return Buffer(static_cast<float*>(p), floats, &FreeHost);
  }
  void Upload(const float* host, float* device, int64_t n) override { std::memcpy(device, host, n * sizeof(float)); }
  void Download(const float* device, float* host, int64_t n) override { std::memcpy(host, device, n * sizeof(float)); }

  StatusOr<std::unique_ptr<LinearWeight>> PrepareLinear(const LinearSource& src) override {
    KRAKEN_ASSIGN_OR_RETURN(LinearSelection sel, SelectLinear(src));
    const TensorInfo& t = *src.tensor;
    cpu::MatrixSource m;
    m.data = t.data;
    m.dtype = t.dtype;
    m.out_stride = src.in_major ? 1 : sel.in_total;
    m.in_stride = src.in_major ? sel.out_total : 1;
    m.in_begin = static_cast<int>(sel.in_begin);
    m.in = static_cast<int>(sel.in);
    m.rows = std::move(sel.rows);
    KRAKEN_ASSIGN_OR_RETURN(cpu::PackedMatrix packed, cpu::PackedMatrix::Pack(m));
    return std::unique_ptr<LinearWeight>(new CpuLinear(std::move(packed)));
  }

  void Embed(const int32_t* tokens, const int32_t* positions, const LinearWeight& wte, const float* wpe,
             Mat out) override {
    KRAKEN_CHECK(wte.in_features() == out.cols, "Embed width mismatch");
    Scoped s(threads_);
    cpu::Embed(tokens, positions, static_cast<const CpuLinear&>(wte).packed, wpe, out);
  }
  void LayerNorm(Mat x, const float* w, const float* b, float eps, Mat y) override {
    KRAKEN_CHECK(x.rows == y.rows && x.cols == y.cols);
    Scoped s(threads_);
    cpu::LayerNorm(x, w, b, eps, y);
  }
  void Linear(Mat x, const LinearWeight& w, const float* bias, Mat y, bool accumulate) override {
    KRAKEN_CHECK(x.cols == w.in_features() && y.cols == w.out_features() && x.rows == y.rows, "Linear shape mismatch");
    Scoped s(threads_);
    cpu::Gemm(x.data, x.rows, x.stride, static_cast<const CpuLinear&>(w).packed, bias, y.data, y.stride, accumulate,
              &gemm_scratch_);
  }
  void GeluTanh(Mat x) override {
    Scoped s(threads_);
    cpu::GeluTanh(x);
  }
  void Add(Mat a, Mat b, Mat out) override {
    KRAKEN_CHECK(a.rows == out.rows && b.rows == out.rows && a.cols == out.cols && b.cols == out.cols);
    Scoped s(threads_);
    cpu::Add(a, b, out);
  }
  void Copy(Mat src, Mat dst) override {
    KRAKEN_CHECK(src.rows == dst.rows && src.cols == dst.cols);
    Scoped s(threads_);
    cpu::Copy(src, dst);
  }
  void GatherRows(Mat src, const int32_t* rows, Mat dst) override {
    KRAKEN_CHECK(src.cols == dst.cols);
    Scoped s(threads_);
    cpu::GatherRows(src, rows, dst);
  }
  void WriteKv(Mat k, Mat v, const KvSlot& slot, const AttentionBatch& batch) override {
    KRAKEN_CHECK(k.cols == slot.heads * slot.head_dim && v.cols == k.cols);
    Scoped s(threads_);
    cpu::WriteKv(k, v, slot, batch);
  }
  void Attention(Mat q, const KvSlot& slot, const AttentionBatch& batch, float scale, Mat out) override {
    KRAKEN_CHECK(q.cols == slot.heads * slot.head_dim && out.cols == q.cols);
    Scoped s(threads_);
    cpu::Attention(q, slot, batch, scale, out, &attention_scratch_);
  }
  Status ReserveScratch(const ScratchHint& h) override {
    const int64_t tiles = (static_cast<int64_t>(h.max_seqs) + h.max_tokens / cpu::kQueryTile + 1) * h.max_heads;
    const int64_t per_thread = 2 * static_cast<int64_t>(cpu::kQueryTile) * h.max_head_dim + cpu::kQueryTile * 16;
    if (static_cast<int64_t>(h.max_tokens) * h.max_gemm_k > (int64_t{1} << 40) || tiles > (int64_t{1} << 32)) {
      return ResourceExhausted("scratch for ", h.max_tokens, " tokens is too large");
    }
    gemm_scratch_.packed_a.resize(
        std::max(gemm_scratch_.packed_a.size(), cpu::GemmScratchFloats(h.max_tokens, h.max_gemm_k)));
    attention_scratch_.tiles.reserve(tiles);
    const size_t buffers = static_cast<size_t>(per_thread) * threads_;
    attention_scratch_.buffers.resize(std::max(attention_scratch_.buffers.size(), buffers));
    return absl::OkStatus();
  }
  Status Synchronize() override { return absl::OkStatus(); }
  int64_t scratch_bytes() const override {
    return static_cast<int64_t>(gemm_scratch_.packed_a.capacity() * sizeof(float) +
                                attention_scratch_.buffers.capacity() * sizeof(float) +
                                attention_scratch_.tiles.capacity() * sizeof(cpu::AttentionTile));
  }

 private:
  // Sets the OpenMP team size for the ops of this backend (each worker process may own fewer
  // cores than the machine has).
  struct Scoped {
    explicit Scoped(int n) { omp_set_num_threads(n); }
  };

  int threads_;
  cpu::GemmScratch gemm_scratch_;
  cpu::AttentionScratch attention_scratch_;
};

}  // namespace

StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const BackendOptions& options) {
  int threads = options.threads;
  if (threads < 0) return InvalidArgument("backend option 'threads' must be >= 0, got ", threads);
  if (threads == 0) threads = omp_get_num_procs();
  return std::unique_ptr<Backend>(new CpuBackend(threads));
}

}  // namespace kraken::engine
