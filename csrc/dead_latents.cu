// Dead-latent tracking and resampling, with no host synchronization.
//
// mark_fired: a thread per (token, slot) pair writes the step's token count into the
//   latent's "last fired" counter; racing writers store the same value.
// resample_dead: a block per latent (grid-stride); blocks of live latents return at once.
//   A dead latent draws u from a counter-based hash of (seed, latent), picks the input
//   where the loss^2 CDF first exceeds u * total (binary search), and writes its decoder,
//   encoder and bias rows and zeroes its optimizer moments: the whole edit in one launch.
//   The hash is mirrored in saeengine/optim/resample.py, so the torch reference picks
//   the same inputs.
#include "common.cuh"

namespace saeengine {
namespace {

constexpr int kResampleThreads = 128;

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

__device__ __forceinline__ double resample_uniform(uint64_t seed, int64_t latent) {
  const uint32_t h = mix32(static_cast<uint32_t>(seed) ^
                           mix32(static_cast<uint32_t>(latent) ^ mix32(static_cast<uint32_t>(seed >> 32))));
  return static_cast<double>(h) * (1.0 / 4294967296.0);
}

template <typename T>
__global__ void mark_fired_kernel(int64_t* __restrict__ last_fired, const int64_t* __restrict__ indices,
                                  const T* __restrict__ values, int64_t n_pairs, int64_t token_count) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p < n_pairs && to_float(values[p]) > 0.f) last_fired[indices[p]] = token_count;
}

template <typename M>
__device__ __forceinline__ void zero_at(void* moment, int64_t offset) {
  if (moment != nullptr) static_cast<M*>(moment)[offset] = from_float<M>(0.f);
}

template <typename P, typename M>
__global__ void __launch_bounds__(kResampleThreads)
resample_dead_kernel(const bool* __restrict__ dead, int64_t n_latents, const float* __restrict__ x,
                     const double* __restrict__ cdf, int64_t n_inputs, int64_t d, const float* __restrict__ enc_norm,
                     uint64_t seed, P* __restrict__ W_enc, P* __restrict__ b_enc, P* __restrict__ W_dec,
                     ResampleMoments moments) {
  __shared__ float scratch[kResampleThreads / kWarp];
  const double total = cdf[n_inputs - 1];
  const float enc_scale = 0.2f * enc_norm[0];
  for (int64_t f = blockIdx.x; f < n_latents; f += gridDim.x) {
    if (!dead[f]) continue;  // the same for the whole block
    const double target = resample_uniform(seed, f) * total;
    int64_t lo = 0, hi = n_inputs - 1;  // first i with cdf[i] > target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (cdf[mid] > target) hi = mid; else lo = mid + 1;
    }
    const float* xi = x + lo * d;
    float sumsq = 0.f;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) sumsq += xi[c] * xi[c];
    const float norm = fmaxf(sqrtf(block_sum(sumsq, scratch)), 1e-12f);
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const float direction = xi[c] / norm;
      W_dec[f * d + c] = from_float<P>(direction);
      W_enc[f * d + c] = from_float<P>(direction * enc_scale);
      zero_at<M>(moments.enc_m, f * d + c);
      zero_at<M>(moments.enc_v, f * d + c);
      zero_at<M>(moments.dec_m, f * d + c);
      zero_at<M>(moments.dec_v, f * d + c);
    }
    if (threadIdx.x == 0) {
      b_enc[f] = from_float<P>(0.f);
      zero_at<M>(moments.bias_m, f);
      zero_at<M>(moments.bias_v, f);
    }
  }
}

template <typename T>
cudaError_t mark_fired_typed(int64_t* last_fired, const int64_t* indices, const void* values, int64_t n_pairs,
                             int64_t token_count, cudaStream_t stream) {
  if (n_pairs == 0) return cudaSuccess;
  constexpr int threads = 256;
  mark_fired_kernel<T><<<static_cast<unsigned>((n_pairs + threads - 1) / threads), threads, 0, stream>>>(
      last_fired, indices, static_cast<const T*>(values), n_pairs, token_count);
  return cudaGetLastError();
}

template <typename P>
cudaError_t resample_typed(bool moments_bf16, const bool* dead, int64_t n_latents, const float* x, const double* cdf,
                           int64_t n_inputs, int64_t d, const float* enc_norm, uint64_t seed, void* W_enc,
                           void* b_enc, void* W_dec, ResampleMoments moments, cudaStream_t stream) {
  if (n_latents == 0 || n_inputs == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(n_latents < 16384 ? n_latents : 16384);
  auto* we = static_cast<P*>(W_enc);
  auto* be = static_cast<P*>(b_enc);
  auto* wd = static_cast<P*>(W_dec);
  if (moments_bf16)
    resample_dead_kernel<P, __nv_bfloat16><<<blocks, kResampleThreads, 0, stream>>>(
        dead, n_latents, x, cdf, n_inputs, d, enc_norm, seed, we, be, wd, moments);
  else
    resample_dead_kernel<P, float><<<blocks, kResampleThreads, 0, stream>>>(
        dead, n_latents, x, cdf, n_inputs, d, enc_norm, seed, we, be, wd, moments);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_mark_fired(ScalarKind kind, int64_t* last_fired, const int64_t* indices, const void* values,
                              int64_t n_pairs, int64_t token_count, cudaStream_t stream) {
  SAEENGINE_DISPATCH(kind, mark_fired_typed<T>(last_fired, indices, values, n_pairs, token_count, stream))
}

cudaError_t launch_resample_dead(ScalarKind param_kind, bool moments_bf16, const bool* dead, int64_t n_latents,
                                 const float* x, const double* cdf, int64_t n_inputs, int64_t d,
                                 const float* enc_norm, uint64_t seed, void* W_enc, void* b_enc, void* W_dec,
                                 ResampleMoments moments, cudaStream_t stream) {
  SAEENGINE_DISPATCH(param_kind, resample_typed<T>(moments_bf16, dead, n_latents, x, cdf, n_inputs, d, enc_norm,
                                                   seed, W_enc, b_enc, W_dec, moments, stream))
}

}  // namespace saeengine
