// Row-wise CPU kernels: embedding gather, LayerNorm, tanh GELU, residual add.
#include <omp.h>

#include <cmath>
#include <cstring>

#include "engine/cpu/isa_kernels.h"
#include "engine/cpu/simd.h"

namespace kraken::engine::cpu::KRAKEN_CPU_ISA {
namespace {

// Sum of n floats: 16 lane-wise partial sums over the row in order, then the fixed tree.
float RowSum(const float* x, int n) {
  F32x16 acc = F32x16::Zero();
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = acc + F32x16::Load(x + i);
  if (i < n) acc = acc + F32x16::LoadPartial(x + i, n - i);
  return acc.ReduceAdd();
}

float RowSquaredDeviation(const float* x, int n, float mean) {
  const F32x16 m = F32x16::Broadcast(mean);
  F32x16 acc = F32x16::Zero();
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const F32x16 d = F32x16::Load(x + i) - m;
    acc = Fma(d, d, acc);
  }
  if (i < n) {
    const F32x16 d = Select(FirstLanes(n - i), F32x16::LoadPartial(x + i, n - i) - m, F32x16::Zero());
    acc = Fma(d, d, acc);
  }
  return acc.ReduceAdd();
}

}  // namespace

void Embed(const int32_t* tokens, const int32_t* positions, const PackedMatrix& wte, const float* wpe, Mat out) {
  const int d = out.cols;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < out.rows; ++t) {
    // Row n of the packed matrix (gemm.h gives both layouts).
    const int n = tokens[t], lane = n % kPanelWidth;
    const uint8_t* panel = wte.panel(n / kPanelWidth);
    const float* p = wpe + static_cast<int64_t>(positions[t]) * d;
    float* o = out.Row(t);
    for (int i = 0; i < d; ++i) {
      const uint8_t* e = panel + wte.OffsetInPanel(lane, i);
      float w;
      if (wte.dtype() == DType::kF32) {
        std::memcpy(&w, e, sizeof w);
      } else {
        uint16_t bits;
        std::memcpy(&bits, e, sizeof bits);
        w = wte.dtype() == DType::kBF16 ? Bf16ToF32(bits) : F16ToF32(bits);
      }
      o[i] = w + p[i];
    }
  }
}

void LayerNorm(Mat x, const float* w, const float* b, float eps, Mat y) {
  const int n = x.cols;
#pragma omp parallel for schedule(static)
  for (int r = 0; r < x.rows; ++r) {
    const float* xr = x.Row(r);
    float* yr = y.Row(r);
    const float mean = RowSum(xr, n) / static_cast<float>(n);
    float var = RowSquaredDeviation(xr, n, mean) / static_cast<float>(n);
    if (var < 0.f) var = 0.f;
    const float inv = 1.0f / std::sqrt(var + eps);
    const F32x16 vm = F32x16::Broadcast(mean), vi = F32x16::Broadcast(inv);
    int i = 0;
    for (; i < n; i += kLanes) {
      const int m = n - i < kLanes ? n - i : kLanes;
      F32x16 v = (F32x16::LoadPartial(xr + i, m) - vm) * vi * F32x16::LoadPartial(w + i, m);
      if (b != nullptr) v = v + F32x16::LoadPartial(b + i, m);
      v.StorePartial(yr + i, m);
    }
  }
}

void GeluTanh(Mat x) {
  const F32x16 half = F32x16::Broadcast(0.5f), one = F32x16::Broadcast(1.0f);
  const F32x16 k0 = F32x16::Broadcast(0.7978845608028654f);  // sqrt(2 / pi)
  const F32x16 k1 = F32x16::Broadcast(0.044715f);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < x.rows; ++r) {
    float* xr = x.Row(r);
    for (int i = 0; i < x.cols; i += kLanes) {
      const int m = x.cols - i < kLanes ? x.cols - i : kLanes;
      const F32x16 v = F32x16::LoadPartial(xr + i, m);
      const F32x16 inner = k0 * (v + k1 * v * v * v);
      (half * v * (one + Tanh(inner))).StorePartial(xr + i, m);
    }
  }
}

void Add(Mat a, Mat b, Mat out) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < out.rows; ++r) {
    const float* ar = a.Row(r);
    const float* br = b.Row(r);
    float* o = out.Row(r);
    for (int i = 0; i < out.cols; ++i) o[i] = ar[i] + br[i];
  }
}

void Copy(Mat src, Mat dst) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < dst.rows; ++r) std::memcpy(dst.Row(r), src.Row(r), sizeof(float) * dst.cols);
}

void GatherRows(Mat src, const int32_t* rows, Mat dst) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < dst.rows; ++r) std::memcpy(dst.Row(r), src.Row(rows[r]), sizeof(float) * dst.cols);
}

}  // namespace kraken::engine::cpu::KRAKEN_CPU_ISA
