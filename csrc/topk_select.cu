// Top-k select over an existing dense matrix: one block per row.
//
// Each value maps to an order-preserving 32-bit key (NaN above +inf, -0 as +0), and each
// element to a 64-bit composite (key, reversed column). Sorting composites descending
// orders by value and breaks ties towards the lower column, so the output is the same on
// every run whatever order the atomics collected the candidates in.
//
// Fast path, two reads of the row and no histogram atomics: every thread keeps the R
// largest keys it reads. The k-th largest of those kThreads*R keys belongs to k distinct
// elements, so it is a lower bound on the row's k-th largest key, and the elements at or
// above it hold the whole answer, ties included. Without heavy ties they number a few
// times k; when they fit in shared memory (kCapacity), a bitonic sort orders them.
// Fallback (many elements at the bound, e.g. a constant row): radix select, 8 key bits a
// pass, until the elements at or above the prefix fit; exact ties beyond the capacity are
// collected in column order.
#include "common.cuh"

namespace saeengine {
namespace {

constexpr int kThreads = 256;
constexpr int kCapacity = 2048;  // >= 2 * kTopkSelectMaxK, and >= kThreads * R

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

// fn(key, col) for every column of the row, in no fixed order: 16-byte loads between a
// scalar head (up to the first 16-byte boundary) and a scalar tail.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_key(const T* row, int64_t n_cols, Fn&& fn) {
  using V = Vec16<T>;
  const int64_t to_boundary = ((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16) / sizeof(T);
  const int64_t head = to_boundary < n_cols ? to_boundary : n_cols;
  const int64_t n_vec = (n_cols - head) / V::kSize;
  const uint4* vectors = reinterpret_cast<const uint4*>(row + head);
  for (int64_t v = threadIdx.x; v < n_vec; v += kThreads) {
    V vec;
    vec.raw = vectors[v];
#pragma unroll
    for (int e = 0; e < V::kSize; ++e) fn(order_key(to_float(vec.elem[e])), head + v * V::kSize + e);
  }
  for (int64_t col = threadIdx.x; col < head; col += kThreads) fn(order_key(to_float(row[col])), col);
  for (int64_t col = head + n_vec * V::kSize + threadIdx.x; col < n_cols; col += kThreads)
    fn(order_key(to_float(row[col])), col);
}

// Sorts a[0, padded) descending in shared memory (padded: a power of two); synchronizes
// before and after.
__device__ void bitonic_sort_descending(uint64_t* a, uint32_t padded) {
  for (uint32_t size = 2; size <= padded; size <<= 1) {
    for (uint32_t stride = size / 2; stride > 0; stride >>= 1) {
      __syncthreads();
      for (uint32_t i = threadIdx.x; i < padded; i += kThreads) {
        const uint32_t j = i ^ stride;
        if (j > i) {
          const uint64_t x = a[i], y = a[j];
          const bool descending = (i & size) == 0;
          if (descending ? x < y : x > y) {
            a[i] = y;
            a[j] = x;
          }
        }
      }
    }
  }
  __syncthreads();
}

// Lower bound on the row's k-th largest key (k <= kThreads * R): the k-th largest of the
// per-thread top-R keys. Uses cand as scratch.
template <typename T, int R>
__device__ uint32_t kth_key_lower_bound(const T* row, int64_t n_cols, int k, uint64_t* cand) {
  uint32_t best[R];  // descending; 0 (below every real key) while empty
#pragma unroll
  for (int r = 0; r < R; ++r) best[r] = 0u;
  for_each_key(row, n_cols, [&](uint32_t key, int64_t) {
    if (key > best[R - 1]) {
      best[R - 1] = key;
#pragma unroll
      for (int r = R - 1; r > 0; --r) {
        if (best[r] > best[r - 1]) {
          const uint32_t t = best[r];
          best[r] = best[r - 1];
          best[r - 1] = t;
        }
      }
    }
  });
#pragma unroll
  for (int r = 0; r < R; ++r) cand[threadIdx.x * R + r] = static_cast<uint64_t>(best[r]) << 32;
  bitonic_sort_descending(cand, kThreads * R);
  const uint32_t bound = static_cast<uint32_t>(cand[k - 1] >> 32);
  __syncthreads();  // cand is reused next
  return bound;
}

// Radix fallback: collects into cand the composites that hold the answer and returns how
// many (at most kCapacity).
template <typename T>
__device__ uint32_t radix_collect(const T* row, int64_t n_cols, int k, uint64_t* cand) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_digit, s_remaining, s_bin, n_greater;
  __shared__ uint32_t warp_counts[kThreads / kWarp];
  const int tid = threadIdx.x;

  // Narrow the prefix 8 bits at a time. `remaining`: how many of the elements matching the
  // prefix are still needed; the k - remaining elements above the prefix are all selected.
  uint32_t prefix = 0, remaining = k, in_bin = static_cast<uint32_t>(n_cols);
  int bits = 0;
  while (bits < 32 && (k - remaining) + in_bin > kCapacity) {
    for (int b = tid; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    const int shift = 24 - bits;
    for_each_key(row, n_cols, [&](uint32_t key, int64_t) {
      if (top_bits(key, bits) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    });
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
  if (fits) {
    for_each_key(row, n_cols, [&](uint32_t key, int64_t col) {
      if (top_bits(key, bits) >= prefix) cand[atomicAdd(&n_greater, 1u)] = composite(key, col);
    });
    __syncthreads();
    return greater + in_bin;
  }
  uint32_t taken_ties = 0;  // ties taken so far (the same in every thread)
  for (int64_t base = 0; base < n_cols; base += kThreads) {
    const int64_t col = base + tid;
    const bool valid = col < n_cols;
    const uint32_t key = valid ? order_key(to_float(row[col])) : 0u;
    const uint32_t top = top_bits(key, bits);
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
  return static_cast<uint32_t>(k);
}

template <typename T, int R>
__global__ void __launch_bounds__(kThreads) topk_select_kernel(const T* __restrict__ input, T* __restrict__ values,
                                                               int64_t* __restrict__ indices, int64_t n_cols, int k) {
  __shared__ uint64_t cand[kCapacity];
  __shared__ uint32_t n_found;
  const T* row = input + static_cast<int64_t>(blockIdx.x) * n_cols;

  // Fast path; a row that fits whole needs no bound (0 is below every key).
  const uint32_t bound = n_cols <= kCapacity ? 0u : kth_key_lower_bound<T, R>(row, n_cols, k, cand);
  if (threadIdx.x == 0) n_found = 0;
  __syncthreads();
  for_each_key(row, n_cols, [&](uint32_t key, int64_t col) {
    if (key >= bound) {
      const uint32_t slot = atomicAdd(&n_found, 1u);
      if (slot < kCapacity) cand[slot] = composite(key, col);
    }
  });
  __syncthreads();
  uint32_t n_cand = n_found;
  if (n_cand > kCapacity) n_cand = radix_collect(row, n_cols, k, cand);  // block-uniform branch

  uint32_t padded = 1;
  while (padded < n_cand) padded <<= 1;
  for (uint32_t i = n_cand + threadIdx.x; i < padded; i += kThreads) cand[i] = 0;  // sorts last
  bitonic_sort_descending(cand, padded);
  for (int j = threadIdx.x; j < k; j += kThreads) {
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
  const auto grid = static_cast<unsigned>(n_rows);
  const auto* in = static_cast<const T*>(input);
  auto* out = static_cast<T*>(values);
  // R per-thread keys must cover k for the lower bound; R = 1 keeps the first pass cheapest.
  if (k <= kThreads)
    topk_select_kernel<T, 1><<<grid, kThreads, 0, stream>>>(in, out, indices, n_cols, static_cast<int>(k));
  else
    topk_select_kernel<T, kTopkSelectMaxK / kThreads><<<grid, kThreads, 0, stream>>>(in, out, indices, n_cols,
                                                                                    static_cast<int>(k));
  return cudaGetLastError();
}

static_assert(kCapacity >= 2 * kTopkSelectMaxK, "the radix fallback needs room for k plus ties");
static_assert(kThreads * (kTopkSelectMaxK / kThreads) >= kTopkSelectMaxK, "R must cover the largest k");

}  // namespace

cudaError_t launch_topk_select(ScalarKind kind, const void* input, void* values, int64_t* indices, int64_t n_rows,
                               int64_t n_cols, int64_t k, cudaStream_t stream) {
  SAEENGINE_DISPATCH(kind, topk_select_typed<T>(input, values, indices, n_rows, n_cols, k, stream))
}

}  // namespace saeengine
