#include "engine/cpu/gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "engine/cpu/kernels.h"

namespace kraken::engine::cpu {

void PackedMatrix::Free::operator()(uint8_t* p) const {
  std::free(p);
}

StatusOr<PackedMatrix> PackedMatrix::Pack(const MatrixSource& src) {
  return Pack(src, Kernels().bf16_pairs);
}

StatusOr<PackedMatrix> PackedMatrix::Pack(const MatrixSource& src, bool bf16_pairs) {
  if (!IsComputeFloat(src.dtype)) {
    return InvalidArgument("weight dtype ", DTypeName(src.dtype), " cannot be used in a matrix multiply");
  }
  PackedMatrix m;
  m.in_ = src.in;
  m.out_ = static_cast<int>(src.rows.size());
  m.dtype_ = src.dtype;
  m.pairs_ = bf16_pairs && src.dtype == DType::kBF16;
  m.panels_ = (m.out_ + kPanelWidth - 1) / kPanelWidth;
  const size_t es = DTypeSize(src.dtype);
  const size_t k_rows = m.pairs_ ? (m.in_ + kPairBlock - 1) / kPairBlock * kPairBlock : m.in_;
  m.panel_bytes_ = (k_rows * kPanelWidth * es + 63) / 64 * 64;
  m.bytes_ = m.panel_bytes_ * m.panels_;
  void* mem = std::aligned_alloc(64, std::max<size_t>(m.bytes_, 64));
  if (mem == nullptr) return ResourceExhausted("cannot allocate ", m.bytes_, " bytes for a packed weight");
  m.data_.reset(static_cast<uint8_t*>(mem));
  std::memset(mem, 0, m.bytes_);
  for (int n = 0; n < m.out_; ++n) {
    uint8_t* panel = m.data_.get() + (n / kPanelWidth) * m.panel_bytes_;
    const int lane = n % kPanelWidth;
    const int64_t row = src.rows[n];
    for (int k = 0; k < m.in_; ++k) {
      const int64_t e = row * src.out_stride + static_cast<int64_t>(src.in_begin + k) * src.in_stride;
      std::memcpy(panel + m.OffsetInPanel(lane, k), src.data + e * es, es);
    }
  }
  return m;
}

void Gemm(const float* x, int m, int64_t lda, const PackedMatrix& w, const float* bias, float* y, int64_t ldc,
          bool accumulate, GemmScratch* scratch) {
  if (m <= 0 || w.out() == 0) return;
  const KernelTable& isa = Kernels();
  KRAKEN_CHECK(!w.pairs() || isa.bf16_pairs, "a pair-interleaved weight reached a level that reads k-major ones");
  const size_t need = isa.gemm_scratch_floats(m, w.in());
  if (scratch->packed_a.size() < need) scratch->packed_a.resize(need);
  isa.gemm(x, m, lda, w, bias, y, ldc, accumulate, scratch->packed_a.data());
}

size_t GemmScratchFloats(int m, int k) {
  return Kernels().gemm_scratch_floats(m, k);
}

}  // namespace kraken::engine::cpu
