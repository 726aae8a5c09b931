// Sparse decode forward: one warp per output row, fp32 accumulation.
//
// Each lane owns VEC consecutive columns per 16-byte chunk, so a warp reads 512
// contiguous bytes of a gathered decoder row per step (coalesced, 16-byte loads).
// The (value, index) pairs of the row are read once per 32 pairs by the lanes and
// broadcast with shuffles, so the gather loop issues only weight loads.
#include "sparse_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace saeengine {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One 16-byte vector of T.
template <typename T> struct Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  union { uint4 raw; T elem[kSize]; };
};

// VECTOR: every row start is 16-byte aligned (d * sizeof(T) % 16 == 0 and aligned bases),
// so each lane moves one uint4 per chunk; otherwise lanes load element by element.
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

  // Columns handled per warp step: 32 lanes x VEC.
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
        const T* w_row = weight + latent * d;
        if constexpr (VECTOR) {
          if (col < d) {
            Vec16<T> w;
            w.raw = *reinterpret_cast<const uint4*>(w_row + col);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] += v * to_float(w.elem[e]);
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            if (col + e < d) acc[e] += v * to_float(w_row[col + e]);
        }
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

template <typename T>
cudaError_t launch_typed(const void* values, const int64_t* indices, const void* weight, const void* bias,
                         void* out, int64_t n_rows, int64_t k, int64_t d, cudaStream_t stream) {
  if (n_rows == 0 || d == 0) return cudaSuccess;
  const dim3 block(kWarp * kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>((n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vector = (d * sizeof(T)) % 16 == 0 && aligned(weight);
  const T* v = static_cast<const T*>(values);
  const T* w = static_cast<const T*>(weight);
  const T* b = static_cast<const T*>(bias);
  T* o = static_cast<T*>(out);
  if (vector)
    sparse_decode_forward_kernel<T, true><<<grid, block, 0, stream>>>(v, indices, w, b, o, n_rows, k, d);
  else
    sparse_decode_forward_kernel<T, false><<<grid, block, 0, stream>>>(v, indices, w, b, o, n_rows, k, d);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sparse_decode_forward(ScalarKind kind, const void* values, const int64_t* indices,
                                         const void* weight, const void* bias, void* out, int64_t n_rows,
                                         int64_t k, int64_t d, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32: return launch_typed<float>(values, indices, weight, bias, out, n_rows, k, d, stream);
    case ScalarKind::kFloat16: return launch_typed<__half>(values, indices, weight, bias, out, n_rows, k, d, stream);
    case ScalarKind::kBFloat16:
      return launch_typed<__nv_bfloat16>(values, indices, weight, bias, out, n_rows, k, d, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace saeengine
