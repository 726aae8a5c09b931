// Sparse decode: the forward (warp per output row) and its deterministic backward.
//
// Forward: each lane owns VEC consecutive columns per 16-byte chunk, so a warp reads 512
// contiguous bytes of a gathered decoder row per step (coalesced, 16-byte loads). The
// (value, index) pairs of the row are read once per 32 pairs by the lanes and broadcast
// with shuffles, so the gather loop issues only weight loads.
// Backward: grad_values is a warp-per-row dot product; grad_weight sums each latent's
// pairs in the by-latent order (saeengine/ops/latent_index.py): a fixed order and no
// float atomics, so its bits are the same on every run.
#include "common.cuh"
#include "launchers.h"

namespace saeengine {
namespace {

constexpr int kWarpsPerBlock = 8;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// VECTOR: every row start is 16-byte aligned (d * sizeof(T) % 16 == 0 and aligned bases),
// so each lane moves one uint4 per chunk; otherwise lanes load element by element.
template <typename T, bool VECTOR>
__device__ __forceinline__ void load_chunk(const T* row, int64_t col, int64_t d, float (&out)[Vec16<T>::kSize]) {
  constexpr int VEC = Vec16<T>::kSize;
  if constexpr (VECTOR) {
    if (col < d) {
      Vec16<T> w;
      w.raw = *reinterpret_cast<const uint4*>(row + col);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = to_float(w.elem[e]);
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = col + e < d ? to_float(row[col + e]) : 0.f;
}

template <typename T, bool VECTOR>
__global__ void sparse_decode_forward_kernel(const T* __restrict__ values, const int64_t* __restrict__ indices,
                                             const T* __restrict__ weight, const T* __restrict__ bias,
                                             T* __restrict__ out, int64_t n_rows, int64_t k, int64_t d) {
  constexpr int VEC = Vec16<T>::kSize;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= n_rows) return;
  const T* row_values = values + row * k;
  const int64_t* row_indices = indices + row * k;
  T* out_row = out + row * d;

  for (int64_t col0 = 0; col0 < d; col0 += static_cast<int64_t>(kWarp) * VEC) {
    const int64_t col = col0 + static_cast<int64_t>(lane) * VEC;
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
    for (int64_t j0 = 0; j0 < k; j0 += kWarp) {
      const int64_t my_j = j0 + lane;
      const float my_value = my_j < k ? to_float(row_values[my_j]) : 0.f;
      const int64_t my_index = my_j < k ? row_indices[my_j] : 0;
      const int count = static_cast<int>(k - j0 < kWarp ? k - j0 : kWarp);
      for (int t = 0; t < count; ++t) {
        const float v = __shfl_sync(0xffffffffu, my_value, t);
        const int64_t latent = __shfl_sync(0xffffffffu, my_index, t);
        float w[VEC];
        load_chunk<T, VECTOR>(weight + latent * d, col, d, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += v * w[e];
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (col + e < d) {
        const float b = bias != nullptr ? to_float(bias[col + e]) : 0.f;
        out_row[col + e] = from_float<T>(acc[e] + b);
      }
    }
  }
}

// grad_values[n, j] = <grad_out[n], weight[indices[n, j]]>: a warp per row n; the lanes'
// partial sums are reduced in a fixed shuffle order.
template <typename T, bool VECTOR>
__global__ void sparse_decode_grad_values_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ indices,
                                                 const T* __restrict__ weight, T* __restrict__ grad_values,
                                                 int64_t n_rows, int64_t k, int64_t d) {
  constexpr int VEC = Vec16<T>::kSize;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= n_rows) return;
  const T* g_row = grad_out + row * d;
  for (int64_t j = 0; j < k; ++j) {
    const T* w_row = weight + indices[row * k + j] * d;
    float partial = 0.f;
    for (int64_t col = static_cast<int64_t>(lane) * VEC; col < d; col += static_cast<int64_t>(kWarp) * VEC) {
      float g[VEC], w[VEC];
      load_chunk<T, VECTOR>(g_row, col, d, g);
      load_chunk<T, VECTOR>(w_row, col, d, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) partial += g[e] * w[e];
    }
    partial = warp_sum(partial);
    if (lane == 0) grad_values[row * k + j] = from_float<T>(partial);
  }
}

// One block per distinct latent (grid-stride over the device-side count): each thread
// owns columns and walks the latent's pairs in their sorted order.
template <typename T>
__global__ void sparse_decode_grad_weight_kernel(const T* __restrict__ grad_out, const T* __restrict__ values,
                                                 const int64_t* __restrict__ order,
                                                 const int64_t* __restrict__ unique_latents,
                                                 const int64_t* __restrict__ segment_starts,
                                                 const int64_t* __restrict__ n_unique, float* __restrict__ grad_weight,
                                                 int64_t k, int64_t d) {
  const int64_t count = *n_unique;
  for (int64_t u = blockIdx.x; u < count; u += gridDim.x) {
    const int64_t begin = segment_starts[u], end = segment_starts[u + 1];
    float* out_row = grad_weight + unique_latents[u] * d;
    for (int64_t col = threadIdx.x; col < d; col += blockDim.x) {
      float acc = 0.f;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t pair = order[p];
        acc += to_float(values[pair]) * to_float(grad_out[(pair / k) * d + col]);
      }
      out_row[col] = acc;
    }
  }
}

template <typename T>
cudaError_t forward_typed(const void* values, const int64_t* indices, const void* weight, const void* bias,
                          void* out, int64_t n_rows, int64_t k, int64_t d, cudaStream_t stream) {
  if (n_rows == 0 || d == 0) return cudaSuccess;
  const dim3 block(kWarp * kWarpsPerBlock), grid(static_cast<unsigned>((n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const auto* v = static_cast<const T*>(values);
  const auto* w = static_cast<const T*>(weight);
  const auto* b = static_cast<const T*>(bias);
  auto* o = static_cast<T*>(out);
  if ((d * sizeof(T)) % 16 == 0 && aligned16(weight))
    sparse_decode_forward_kernel<T, true><<<grid, block, 0, stream>>>(v, indices, w, b, o, n_rows, k, d);
  else
    sparse_decode_forward_kernel<T, false><<<grid, block, 0, stream>>>(v, indices, w, b, o, n_rows, k, d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_values_typed(const void* grad_out, const int64_t* indices, const void* weight, void* grad_values,
                              int64_t n_rows, int64_t k, int64_t d, cudaStream_t stream) {
  if (n_rows == 0 || k == 0) return cudaSuccess;
  const dim3 block(kWarp * kWarpsPerBlock), grid(static_cast<unsigned>((n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const auto* g = static_cast<const T*>(grad_out);
  const auto* w = static_cast<const T*>(weight);
  auto* gv = static_cast<T*>(grad_values);
  if ((d * sizeof(T)) % 16 == 0 && aligned16(weight) && aligned16(grad_out))
    sparse_decode_grad_values_kernel<T, true><<<grid, block, 0, stream>>>(g, indices, w, gv, n_rows, k, d);
  else
    sparse_decode_grad_values_kernel<T, false><<<grid, block, 0, stream>>>(g, indices, w, gv, n_rows, k, d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_weight_typed(const void* grad_out, const void* values, const int64_t* order,
                              const int64_t* unique_latents, const int64_t* segment_starts, const int64_t* n_unique,
                              float* grad_weight, int64_t max_unique, int64_t k, int64_t d, cudaStream_t stream) {
  if (max_unique == 0 || d == 0) return cudaSuccess;
  // Enough blocks to fill any current GPU; each then strides over the distinct latents.
  const int64_t blocks = max_unique < 8192 ? max_unique : 8192;
  const int threads = d >= 256 ? 256 : (d >= 64 ? 64 : 32);
  sparse_decode_grad_weight_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(grad_out), static_cast<const T*>(values), order, unique_latents, segment_starts,
      n_unique, grad_weight, k, d);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sparse_decode_forward(ScalarKind kind, const void* values, const int64_t* indices,
                                         const void* weight, const void* bias, void* out, int64_t n_rows,
                                         int64_t k, int64_t d, cudaStream_t stream) {
  SAEENGINE_DISPATCH(kind, forward_typed<T>(values, indices, weight, bias, out, n_rows, k, d, stream))
}

cudaError_t launch_sparse_decode_grad_values(ScalarKind kind, const void* grad_out, const int64_t* indices,
                                             const void* weight, void* grad_values, int64_t n_rows, int64_t k,
                                             int64_t d, cudaStream_t stream) {
  SAEENGINE_DISPATCH(kind, grad_values_typed<T>(grad_out, indices, weight, grad_values, n_rows, k, d, stream))
}

cudaError_t launch_sparse_decode_grad_weight(ScalarKind kind, const void* grad_out, const void* values,
                                             const int64_t* order, const int64_t* unique_latents,
                                             const int64_t* segment_starts, const int64_t* n_unique,
                                             float* grad_weight, int64_t max_unique, int64_t k, int64_t d,
                                             cudaStream_t stream) {
  SAEENGINE_DISPATCH(kind, grad_weight_typed<T>(grad_out, values, order, unique_latents, segment_starts, n_unique,
                                                grad_weight, max_unique, k, d, stream))
}

}  // namespace saeengine
