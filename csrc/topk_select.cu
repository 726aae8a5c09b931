// Top-k select over an existing dense matrix: one block per row, radix select then sort.
//
// Each value maps to an order-preserving 32-bit key (NaN above +inf, -0 as +0). Passes
// over the row build a 256-bin histogram of the next 8 key bits among the elements that
// still match the chosen prefix, until the elements at or above the prefix fit in shared
// memory (kCapacity). One more pass collects them as 64-bit (key, reversed column)
// composites, and a bitonic sort in shared memory orders them: the first k are the
// answer, ties broken towards the lower column, so the output is the same on every run
// whatever order the atomics collected it in. Exact ties beyond the capacity (say,
// thousands of equal values at the k-th place) are collected in column order instead.
#include "common.cuh"

namespace saeengine {
namespace {

constexpr int kThreads = 256;
constexpr int kCapacity = 2048;  // >= 2 * kTopkSelectMaxK

__device__ __forceinline__ uint32_t order_key(float v) {
  if (isnan(v)) return 0xFFFFFFFFu;
  const uint32_t u = v == 0.f ? 0u : __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t composite(uint32_t key, int64_t col) {
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(col));
}

// The key's top `bits` bits (bits in 0..32).
__device__ __forceinline__ uint32_t top_bits(uint32_t key, int bits) {
  return bits == 0 ? 0u : (bits == 32 ? key : key >> (32 - bits));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_select_kernel(const T* __restrict__ input, T* __restrict__ values,
                                                               int64_t* __restrict__ indices, int64_t n_cols, int k) {
  __shared__ uint32_t hist[256];
  __shared__ uint64_t cand[kCapacity];
  __shared__ uint32_t s_digit, s_remaining, s_bin;
  __shared__ uint32_t n_greater;
  __shared__ uint32_t warp_counts[kThreads / kWarp];

  const int tid = threadIdx.x;
  const T* row = input + static_cast<int64_t>(blockIdx.x) * n_cols;

  // Narrow the prefix 8 bits at a time. `remaining`: how many of the elements matching the
  // prefix are still needed; `above`: how many elements beat the prefix (all selected).
  uint32_t prefix = 0, remaining = k, in_bin = static_cast<uint32_t>(n_cols);
  int bits = 0;
  while (bits < 32 && (k - remaining) + in_bin > kCapacity) {
    for (int b = tid; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    const int shift = 24 - bits;
    for (int64_t col = tid; col < n_cols; col += kThreads) {
      const uint32_t key = order_key(to_float(row[col]));
      if (top_bits(key, bits) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t above = 0;
      int b = 255;
      for (; b > 0 && above + hist[b] < remaining; --b) above += hist[b];
      s_digit = b;
      s_remaining = remaining - above;
      s_bin = hist[b];
    }
    __syncthreads();
    prefix = (prefix << 8) | s_digit;
    remaining = s_remaining;
    in_bin = s_bin;
    bits += 8;
  }

  // Collect: every element above the prefix, and the prefix's own elements, all of them
  // when they fit, else (exact ties at bits == 32) the first `remaining` in column order.
  const uint32_t greater = k - remaining;
  const bool fits = greater + in_bin <= kCapacity;
  if (tid == 0) n_greater = 0;
  __syncthreads();
  uint32_t taken_ties = 0;  // fallback only: ties taken so far (the same in every thread)
  for (int64_t base = 0; base < n_cols; base += kThreads) {
    const int64_t col = base + tid;
    const uint32_t key = col < n_cols ? order_key(to_float(row[col])) : 0u;
    const uint32_t top = top_bits(key, bits);
    const bool valid = col < n_cols;
    if (fits) {
      if (valid && top >= prefix) cand[atomicAdd(&n_greater, 1u)] = composite(key, col);
      continue;
    }
    if (valid && top > prefix) cand[atomicAdd(&n_greater, 1u)] = composite(key, col);
    // Ties in column order: rank = ties before this thread in the chunk (ballot + scan).
    const bool tie = valid && top == prefix;
    const uint32_t ballot = __ballot_sync(0xffffffffu, tie);
    const int lane = tid % kWarp, warp = tid / kWarp;
    __syncthreads();
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    uint32_t rank = __popc(ballot & ((1u << lane) - 1u)), chunk = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) {
      if (w < warp) rank += warp_counts[w];
      chunk += warp_counts[w];
    }
    if (tie && taken_ties + rank < remaining) cand[greater + taken_ties + rank] = composite(key, col);
    taken_ties += chunk;
  }
  __syncthreads();
  const uint32_t n_cand = fits ? greater + in_bin : static_cast<uint32_t>(k);
  uint32_t padded = 1;
  while (padded < n_cand) padded <<= 1;
  for (uint32_t i = n_cand + tid; i < padded; i += kThreads) cand[i] = 0;  // sorts last

  // Bitonic sort, descending.
  for (uint32_t size = 2; size <= padded; size <<= 1) {
    for (uint32_t stride = size / 2; stride > 0; stride >>= 1) {
      __syncthreads();
      for (uint32_t i = tid; i < padded; i += kThreads) {
        const uint32_t j = i ^ stride;
        if (j > i) {
          const uint64_t a = cand[i], b = cand[j];
          const bool descending = (i & size) == 0;
          if (descending ? a < b : a > b) {
            cand[i] = b;
            cand[j] = a;
          }
        }
      }
    }
  }
  __syncthreads();
  for (int j = tid; j < k; j += kThreads) {
    const int64_t col = 0xFFFFFFFFu - static_cast<uint32_t>(cand[j] & 0xFFFFFFFFu);
    values[static_cast<int64_t>(blockIdx.x) * k + j] = row[col];
    indices[static_cast<int64_t>(blockIdx.x) * k + j] = col;
  }
}

template <typename T>
cudaError_t topk_select_typed(const void* input, void* values, int64_t* indices, int64_t n_rows, int64_t n_cols,
                              int64_t k, cudaStream_t stream) {
  if (n_rows == 0 || k == 0) return cudaSuccess;
  if (k > kTopkSelectMaxK || k > n_cols || n_cols >= (int64_t{1} << 32) || n_rows > 0x7FFFFFFF)
    return cudaErrorInvalidValue;
  topk_select_kernel<T><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
      static_cast<const T*>(input), static_cast<T*>(values), indices, n_cols, static_cast<int>(k));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_topk_select(ScalarKind kind, const void* input, void* values, int64_t* indices, int64_t n_rows,
                               int64_t n_cols, int64_t k, cudaStream_t stream) {
  SAEENGINE_DISPATCH(kind, topk_select_typed<T>(input, values, indices, n_rows, n_cols, k, stream))
}

}  // namespace saeengine
