// Device helpers shared by the csrc/ kernels: dtype conversion, 16-byte vectors, block sums.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace saeengine {

constexpr int kWarp = 32;

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

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of x over the block, returned to every thread. The order of additions is fixed by
// the thread layout, so the result is the same on every run. `scratch` holds one float
// per warp; the call synchronizes the block twice.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = (blockDim.x + kWarp - 1) / kWarp;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < n_warps; ++w) total += scratch[w];
  return total;
}

}  // namespace saeengine

// Runs `call` with T bound to the C++ type of a ScalarKind (launchers.h); for launchers.
#define SAEENGINE_DISPATCH(kind, call)                                    \
  switch (kind) {                                                         \
    case ::saeengine::ScalarKind::kFloat32: { using T = float; return call; }          \
    case ::saeengine::ScalarKind::kFloat16: { using T = __half; return call; }         \
    case ::saeengine::ScalarKind::kBFloat16: { using T = __nv_bfloat16; return call; } \
  }                                                                       \
  return cudaErrorInvalidValue;
