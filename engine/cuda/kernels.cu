// CUDA kernels of the engine's ops; see kernels.h for each contract. Row-wise kernels use one
// thread block per row so a row's result never depends on how many rows a step has (batch
// invariance, as on the CPU backend).
#include <cfloat>
#include <type_traits>

#ifdef KRAKEN_CUDA_EMULATION
#include "engine/cuda/emulation.h"  // the same source on the CPU, for tests without a GPU
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define KRAKEN_SHARED __shared__
#define KRAKEN_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define KRAKEN_LAUNCH(kernel, grid, block, shared, stream, ...) kernel<<<grid, block, shared, stream>>>(__VA_ARGS__)
#endif

#include "engine/cuda/kernels.h"

KRAKEN_CUDA_NAMESPACE_BEGIN
namespace {

constexpr int kRowThreads = 256;
constexpr int kAttentionThreads = 128;  // also the key tile of the attention kernel

// Sum / max over the thread block; every thread gets the result. `red` holds one value per warp
// and is free again when the function returns.
__device__ float BlockSum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < warps; ++i) s += red[i];
  __syncthreads();
  return s;
}

__device__ float BlockMax(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = -FLT_MAX;
  for (int i = 0; i < warps; ++i) m = fmaxf(m, red[i]);
  __syncthreads();
  return m;
}

__device__ float ToFloat(float v) {
  return v;
}
__device__ float ToFloat(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ float ToFloat(__half v) {
  return __half2float(v);
}

template <typename T>
__global__ void EmbedKernel(const int32_t* tokens, const int32_t* positions, const T* wte, const float* wpe, float* out,
                            int cols, int64_t out_stride) {
  const int64_t t = blockIdx.x;
  const T* e = wte + static_cast<int64_t>(tokens[t]) * cols;
  const float* p = wpe + static_cast<int64_t>(positions[t]) * cols;
  float* o = out + t * out_stride;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = ToFloat(e[c]) + p[c];
}

__global__ void LayerNormKernel(const float* x, int64_t x_stride, const float* w, const float* b, float eps, float* y,
                                int64_t y_stride, int cols) {
  KRAKEN_SHARED float red[32];
  const float* xr = x + blockIdx.x * x_stride;
  float* yr = y + blockIdx.x * y_stride;
  float s = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
  const float mean = BlockSum(s, red) / static_cast<float>(cols);
  float q = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float d = xr[c] - mean;
    q += d * d;
  }
  const float var = BlockSum(q, red) / static_cast<float>(cols);
  const float rstd = 1.f / sqrtf(var + eps);
  // Each thread writes only the elements it read above, after both reductions: safe when y == x.
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float n = (xr[c] - mean) * rstd * w[c];
    yr[c] = b != nullptr ? n + b[c] : n;
  }
}

__global__ void GeluTanhKernel(float* x, int64_t stride, int cols) {
  float* r = x + blockIdx.x * stride;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = r[c];
    r[c] = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  }
}

__global__ void AddKernel(const float* a, int64_t as, const float* b, int64_t bs, float* out, int64_t os, int cols) {
  const int64_t r = blockIdx.x;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) out[r * os + c] = a[r * as + c] + b[r * bs + c];
}

__global__ void GatherRowsKernel(const float* src, int64_t ss, const int32_t* rows, float* dst, int64_t ds, int cols) {
  const float* s = src + static_cast<int64_t>(rows[blockIdx.x]) * ss;
  float* d = dst + static_cast<int64_t>(blockIdx.x) * ds;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
}

__global__ void BiasRowsKernel(const float* bias, float* y, int64_t ys, int cols, bool accumulate) {
  float* r = y + blockIdx.x * ys;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) r[c] = accumulate ? r[c] + bias[c] : bias[c];
}

// float -> T, rounding to nearest even for the 16-bit types.
template <typename T>
__device__ T FromFloat(float v);
template <>
__device__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}

template <typename Half>
__global__ void ToHalfKernel(const float* x, int64_t xs, int cols, Half* out) {
  const float* r = x + blockIdx.x * xs;
  Half* o = out + static_cast<int64_t>(blockIdx.x) * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = FromFloat<Half>(r[c]);
}

// T: the KV cache's element type (float, __nv_bfloat16 or __half); 16-bit entries are rounded to
// nearest even here and widened exactly (ToFloat) by the attention kernels.
template <typename T>
__global__ void WriteKvKernel(const float* k, int64_t ks, const float* v, int64_t vs, T* kc, T* vc,
                              const AttentionRow* rows, int heads, int head_dim, int block_size) {
  const AttentionRow r = rows[blockIdx.x];
  const int64_t t = r.row;
  const int64_t slot = r.slot;
  const int64_t block = slot / block_size, off = slot % block_size;
  const int width = heads * head_dim;
  const int64_t base = block * heads * head_dim * block_size;  // same size for K and V blocks
  for (int e = threadIdx.x; e < width; e += blockDim.x) {
    const int h = e / head_dim, d = e % head_dim;
    kc[base + (static_cast<int64_t>(h) * head_dim + d) * block_size + off] = FromFloat<T>(k[t * ks + e]);
    vc[base + (static_cast<int64_t>(h) * block_size + off) * head_dim + d] = FromFloat<T>(v[t * vs + e]);
  }
}

// Shared memory: q (scaled) [head_dim], acc [head_dim], p [kAttentionThreads], red [32].
template <typename T>
__global__ void AttentionKernel(const float* q, int64_t qs, const T* kc, const T* vc, const AttentionRow* rows,
                                const int32_t* tables, int heads, int head_dim, int block_size, float scale, float* out,
                                int64_t os) {
  KRAKEN_DYNAMIC_SHARED(float, smem);
  float* qsh = smem;
  float* acc = qsh + head_dim;
  float* p = acc + head_dim;
  float* red = p + kAttentionThreads;

  const AttentionRow row = rows[blockIdx.x];
  const int64_t t = row.row;
  const int h = blockIdx.y;
  const int tid = threadIdx.x;
  const int32_t* table = tables + row.table_offset;
  const int keys = row.position + 1;
  const int64_t block_floats = static_cast<int64_t>(heads) * head_dim * block_size;

  for (int d = tid; d < head_dim; d += blockDim.x) {
    qsh[d] = q[t * qs + static_cast<int64_t>(h) * head_dim + d] * scale;
    acc[d] = 0.f;
  }
  __syncthreads();

  float m = -FLT_MAX;  // running max over the keys seen so far (same in every thread)
  float l = 0.f;       // running sum of exp(score - m)
  for (int tile = 0; tile < keys; tile += kAttentionThreads) {
    const int j = tile + tid;
    float s = -FLT_MAX;
    if (j < keys) {
      // K block layout [heads][head_dim][block_size]: neighbouring threads read neighbouring keys.
      const T* kp =
          kc + table[j / block_size] * block_floats + static_cast<int64_t>(h) * head_dim * block_size + j % block_size;
      float dot = 0.f;
      for (int d = 0; d < head_dim; ++d) dot += qsh[d] * ToFloat(kp[static_cast<int64_t>(d) * block_size]);
      s = dot;
    }
    const float m_new = fmaxf(m, BlockMax(s, red));
    const float e = j < keys ? expf(s - m_new) : 0.f;
    p[tid] = e;
    const float correction = expf(m - m_new);
    l = l * correction + BlockSum(e, red);  // BlockSum's barrier also publishes p[]
    const int n = min(kAttentionThreads, keys - tile);
    // V block layout [heads][block_size][head_dim]: neighbouring threads read neighbouring dims.
    for (int d = tid; d < head_dim; d += blockDim.x) {
      float a = acc[d] * correction;
      for (int i = 0; i < n; ++i) {
        const int jj = tile + i;
        const T* vp = vc + table[jj / block_size] * block_floats +
                      (static_cast<int64_t>(h) * block_size + jj % block_size) * head_dim;
        a += p[i] * ToFloat(vp[d]);
      }
      acc[d] = a;
    }
    m = m_new;
    __syncthreads();  // p[] is rewritten by the next tile
  }
  const float inv = 1.f / l;
  for (int d = tid; d < head_dim; d += blockDim.x) out[t * os + static_cast<int64_t>(h) * head_dim + d] = acc[d] * inv;
}

// TiledAttentionKernel's staging of keys k0 .. k0 + nk - 1 of head `h` into shared memory, zeros
// past nk: K as [kKeyTile][kd] (kd = head_dim + 1; neighbouring threads take neighbouring keys, contiguous
// within a KV block), V as [kKeyTile][head_dim] (neighbouring threads take neighbouring dims).
// Every thread of the block takes part; the caller synchronises after.
template <typename T>
__device__ void LoadKeyTile(const T* kc, const T* vc, const int32_t* table, int h, int head_dim, int block_size,
                            int64_t block_floats, int k0, int nk, int kd, float* ksh, float* vsh) {
  for (int i = threadIdx.x; i < kKeyTile * head_dim; i += blockDim.x) {
    const int j = i % kKeyTile, d = i / kKeyTile;
    float kv = 0.f;
    if (j < nk) {
      const int key = k0 + j;
      kv = ToFloat(kc[table[key / block_size] * block_floats + (static_cast<int64_t>(h) * head_dim + d) * block_size +
                      key % block_size]);
    }
    ksh[j * kd + d] = kv;
  }
  for (int i = threadIdx.x; i < kKeyTile * head_dim; i += blockDim.x) {
    const int j = i / head_dim, d = i % head_dim;
    float vv = 0.f;
    if (j < nk) {
      const int key = k0 + j;
      vv = ToFloat(vc[table[key / block_size] * block_floats +
                      (static_cast<int64_t>(h) * block_size + key % block_size) * head_dim + d]);
    }
    vsh[i] = vv;
  }
}

// One thread block (128 threads) per (tile, head). Thread t scores query row t / 8 of the tile
// against keys t % 8 and t % 8 + 8 of each key tile; the 8 threads of a row (8 neighbouring
// lanes of one warp) combine their maxima and sums with shuffles. Shared memory: see
// TiledAttentionSharedBytes.
template <typename T>
__global__ void TiledAttentionKernel(const float* q, int64_t qs, const T* kc, const T* vc, const AttentionTile* tiles,
                                     const int32_t* tables, int heads, int head_dim, int block_size, float scale,
                                     float* out, int64_t os) {
  KRAKEN_DYNAMIC_SHARED(float, smem);
  const int kd = head_dim + 1;                // K row stride
  float* qsh = smem;                          // [kQueryTile][head_dim]
  float* acc = qsh + kQueryTile * head_dim;   // [kQueryTile][head_dim]
  float* ksh = acc + kQueryTile * head_dim;   // [kKeyTile][head_dim + 1]
  float* vsh = ksh + kKeyTile * kd;           // [kKeyTile][head_dim]
  float* psh = vsh + kKeyTile * head_dim;     // [kQueryTile][kKeyTile]
  float* corr = psh + kQueryTile * kKeyTile;  // [kQueryTile]
  float* lsum = corr + kQueryTile;            // [kQueryTile]

  const AttentionTile tile = tiles[blockIdx.x];
  const int h = blockIdx.y;
  const int tid = threadIdx.x;
  const int32_t* table = tables + tile.table_offset;
  const int keys = tile.position0 + tile.count;  // the last row sees keys 0 .. keys - 1
  const int64_t block_floats = static_cast<int64_t>(heads) * head_dim * block_size;

  for (int i = tid; i < kQueryTile * head_dim; i += blockDim.x) {
    const int r = i / head_dim, d = i % head_dim;
    qsh[i] = r < tile.count ? q[(tile.row0 + r) * qs + static_cast<int64_t>(h) * head_dim + d] * scale : 0.f;
    acc[i] = 0.f;
  }
  const int r = tid / 8;      // this thread's query row in the tile (kQueryTile * 8 == 128 threads)
  const int lane8 = tid % 8;  // its first key in each key tile; the second is lane8 + 8
  const int my_pos = tile.position0 + r;
  float m = -FLT_MAX, l = 0.f;  // running max and sum of this row (the same in its 8 threads)
  __syncthreads();

  for (int k0 = 0; k0 < keys; k0 += kKeyTile) {
    const int nk = min(kKeyTile, keys - k0);
    LoadKeyTile(kc, vc, table, h, head_dim, block_size, block_floats, k0, nk, kd, ksh, vsh);
    __syncthreads();

    float s[2];
    float local_max = -FLT_MAX;
    for (int u = 0; u < 2; ++u) {
      const int j = lane8 + 8 * u, key = k0 + j;
      s[u] = -FLT_MAX;
      if (r < tile.count && j < nk && key <= my_pos) {
        float dot = 0.f;
        for (int d = 0; d < head_dim; ++d) dot += qsh[r * head_dim + d] * ksh[j * kd + d];
        s[u] = dot;
        local_max = fmaxf(local_max, dot);
      }
    }
    for (int o = 4; o > 0; o >>= 1) local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, o));
    const float m_new = fmaxf(m, local_max);
    float local_sum = 0.f;
    for (int u = 0; u < 2; ++u) {
      const float e = s[u] > -FLT_MAX ? expf(s[u] - m_new) : 0.f;
      psh[r * kKeyTile + lane8 + 8 * u] = e;
      local_sum += e;
    }
    for (int o = 4; o > 0; o >>= 1) local_sum += __shfl_xor_sync(0xffffffffu, local_sum, o);
    const float c = expf(m - m_new);  // 1 while the row has seen nothing (both -FLT_MAX)
    l = l * c + local_sum;
    m = m_new;
    if (lane8 == 0) corr[r] = c;
    __syncthreads();

    for (int i = tid; i < kQueryTile * head_dim; i += blockDim.x) {
      const int rr = i / head_dim, d = i % head_dim;
      float a = acc[i] * corr[rr];
      for (int j = 0; j < nk; ++j) a += psh[rr * kKeyTile + j] * vsh[j * head_dim + d];
      acc[i] = a;
    }
    __syncthreads();  // K, V and P are rewritten by the next key tile
  }
  if (lane8 == 0) lsum[r] = l;
  __syncthreads();
  for (int i = tid; i < kQueryTile * head_dim; i += blockDim.x) {
    const int rr = i / head_dim, d = i % head_dim;
    if (rr < tile.count) out[(tile.row0 + rr) * os + static_cast<int64_t>(h) * head_dim + d] = acc[i] / lsum[rr];
  }
}

// Calls f with a null T* whose T is the element type `s` names (float, __nv_bfloat16 or __half),
// so one launch site serves every stored dtype.
template <typename F>
void WithStorage(Storage s, F&& f) {
  switch (s) {
    case Storage::kF32:
      return f(static_cast<float*>(nullptr));
    case Storage::kBF16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    case Storage::kF16:
      return f(static_cast<__half*>(nullptr));
  }
}

template <typename Tag>
using Elem = std::remove_pointer_t<Tag>;

int RowThreads(int cols) {
  // Enough threads for the row, rounded up to whole warps, at most kRowThreads.
  const int t = (cols + 31) / 32 * 32;
  return t < 32 ? 32 : (t > kRowThreads ? kRowThreads : t);
}

}  // namespace

void LaunchEmbed(const int32_t* tokens, const int32_t* positions, const void* wte, Storage wte_type, const float* wpe,
                 float* out, int rows, int cols, int64_t out_stride, cudaStream_t stream) {
  if (rows == 0) return;
  WithStorage(wte_type, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    KRAKEN_LAUNCH(EmbedKernel<T>, rows, RowThreads(cols), 0, stream, tokens, positions, static_cast<const T*>(wte), wpe,
                  out, cols, out_stride);
  });
}

void LaunchLayerNorm(const float* x, int64_t x_stride, const float* w, const float* b, float eps, float* y,
                     int64_t y_stride, int rows, int cols, cudaStream_t stream) {
  if (rows == 0) return;
  KRAKEN_LAUNCH(LayerNormKernel, rows, RowThreads(cols), 0, stream, x, x_stride, w, b, eps, y, y_stride, cols);
}

void LaunchGeluTanh(float* x, int64_t stride, int rows, int cols, cudaStream_t stream) {
  if (rows == 0) return;
  KRAKEN_LAUNCH(GeluTanhKernel, rows, RowThreads(cols), 0, stream, x, stride, cols);
}

void LaunchAdd(const float* a, int64_t a_stride, const float* b, int64_t b_stride, float* out, int64_t out_stride,
               int rows, int cols, cudaStream_t stream) {
  if (rows == 0) return;
  KRAKEN_LAUNCH(AddKernel, rows, RowThreads(cols), 0, stream, a, a_stride, b, b_stride, out, out_stride, cols);
}

void LaunchGatherRows(const float* src, int64_t src_stride, const int32_t* rows, float* dst, int64_t dst_stride, int n,
                      int cols, cudaStream_t stream) {
  if (n == 0) return;
  KRAKEN_LAUNCH(GatherRowsKernel, n, RowThreads(cols), 0, stream, src, src_stride, rows, dst, dst_stride, cols);
}

void LaunchBiasRows(const float* bias, float* y, int64_t y_stride, int rows, int cols, bool accumulate,
                    cudaStream_t stream) {
  if (rows == 0) return;
  KRAKEN_LAUNCH(BiasRowsKernel, rows, RowThreads(cols), 0, stream, bias, y, y_stride, cols, accumulate);
}

void LaunchToHalf(const float* x, int64_t x_stride, int rows, int cols, void* out, bool bf16, cudaStream_t stream) {
  if (rows == 0) return;
  if (bf16) {
    KRAKEN_LAUNCH(ToHalfKernel<__nv_bfloat16>, rows, RowThreads(cols), 0, stream, x, x_stride, cols,
                  static_cast<__nv_bfloat16*>(out));
  } else {
    KRAKEN_LAUNCH(ToHalfKernel<__half>, rows, RowThreads(cols), 0, stream, x, x_stride, cols,
                  static_cast<__half*>(out));
  }
}

void LaunchWriteKv(const float* k, int64_t k_stride, const float* v, int64_t v_stride, void* k_cache, void* v_cache,
                   Storage kv_type, const AttentionRow* rows, int n, int heads, int head_dim, int block_size,
                   cudaStream_t stream) {
  if (n == 0) return;
  WithStorage(kv_type, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    KRAKEN_LAUNCH(WriteKvKernel<T>, n, RowThreads(heads * head_dim), 0, stream, k, k_stride, v, v_stride,
                  static_cast<T*>(k_cache), static_cast<T*>(v_cache), rows, heads, head_dim, block_size);
  });
}

void LaunchAttention(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache, Storage kv_type,
                     const AttentionRow* rows, const int32_t* tables, int n, int heads, int head_dim, int block_size,
                     float scale, float* out, int64_t out_stride, cudaStream_t stream) {
  if (n == 0) return;
  const size_t shared = (2 * static_cast<size_t>(head_dim) + kAttentionThreads + 32) * sizeof(float);
  WithStorage(kv_type, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    KRAKEN_LAUNCH(AttentionKernel<T>, dim3(n, heads), kAttentionThreads, shared, stream, q, q_stride,
                  static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), rows, tables, heads, head_dim,
                  block_size, scale, out, out_stride);
  });
}

void LaunchTiledAttention(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache, Storage kv_type,
                          const AttentionTile* tiles, const int32_t* tables, int n, int heads, int head_dim,
                          int block_size, float scale, float* out, int64_t out_stride, cudaStream_t stream) {
  if (n == 0) return;
  WithStorage(kv_type, [&](auto tag) {
    using T = Elem<decltype(tag)>;
    KRAKEN_LAUNCH(TiledAttentionKernel<T>, dim3(n, heads), kQueryTile * 8, TiledAttentionSharedBytes(head_dim), stream,
                  q, q_stride, static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), tiles, tables, heads,
                  head_dim, block_size, scale, out, out_stride);
  });
}

KRAKEN_CUDA_NAMESPACE_END
