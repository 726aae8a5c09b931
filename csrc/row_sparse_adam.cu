// Row-sparse ("lazy") Adam: one warp per listed latent row, and nothing else is touched.
//
// For a decoder row the same pass first removes the gradient's component along the row,
// and after the update projects the row back to unit norm; both need a row-wide sum,
// which the warp reduces with shuffles in a fixed order. Math in fp32 whatever the
// storage dtypes, with the formulas of saeengine/optim/row_sparse_adam.py.
#include "common.cuh"

namespace saeengine {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename P, typename M>
__global__ void row_sparse_adam_kernel(P* __restrict__ param, const P* __restrict__ grad, bool grad_rows_indexed,
                                       M* __restrict__ exp_avg, M* __restrict__ exp_avg_sq,
                                       const int64_t* __restrict__ rows, int64_t n_rows, int64_t d, AdamStep s,
                                       bool decoder) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= n_rows) return;
  const int64_t row = rows[r];
  P* p = param + row * d;
  const P* g = grad + (grad_rows_indexed ? row : r) * d;
  M* m = exp_avg + row * d;
  M* v = exp_avg_sq + row * d;

  float along = 0.f;  // <g, w> for the decoder's parallel-gradient removal (unit-norm rows)
  if (decoder) {
    for (int64_t c = lane; c < d; c += kWarp) along += to_float(g[c]) * to_float(p[c]);
    along = warp_sum(along);
  }
  float sumsq = 0.f;
  for (int64_t c = lane; c < d; c += kWarp) {
    const float w = to_float(p[c]);
    const float gc = decoder ? to_float(g[c]) - along * w : to_float(g[c]);
    const float mc = s.beta1 * to_float(m[c]) + (1.f - s.beta1) * gc;
    const float vc = s.beta2 * to_float(v[c]) + (1.f - s.beta2) * gc * gc;
    m[c] = from_float<M>(mc);
    v[c] = from_float<M>(vc);
    const float update = (mc / s.bias_correction1) / (sqrtf(vc / s.bias_correction2) + s.eps);
    const P updated = from_float<P>(w - s.lr * update);
    p[c] = updated;
    sumsq += to_float(updated) * to_float(updated);
  }
  if (decoder) {
    const float norm = fmaxf(sqrtf(warp_sum(sumsq)), 1.17549435e-38f);  // clamp as the reference
    for (int64_t c = lane; c < d; c += kWarp) p[c] = from_float<P>(to_float(p[c]) / norm);
  }
}

template <typename P, typename M>
cudaError_t adam_typed(void* param, const void* grad, bool grad_rows_indexed, void* exp_avg, void* exp_avg_sq,
                       const int64_t* rows, int64_t n_rows, int64_t d, AdamStep step, bool decoder,
                       cudaStream_t stream) {
  if (n_rows == 0 || d == 0) return cudaSuccess;
  const dim3 block(kWarp * kWarpsPerBlock), grid(static_cast<unsigned>((n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  row_sparse_adam_kernel<P, M><<<grid, block, 0, stream>>>(
      static_cast<P*>(param), static_cast<const P*>(grad), grad_rows_indexed, static_cast<M*>(exp_avg),
      static_cast<M*>(exp_avg_sq), rows, n_rows, d, step, decoder);
  return cudaGetLastError();
}

template <typename P>
cudaError_t adam_param_typed(bool moments_bf16, void* param, const void* grad, bool grad_rows_indexed, void* exp_avg,
                             void* exp_avg_sq, const int64_t* rows, int64_t n_rows, int64_t d, AdamStep step,
                             bool decoder, cudaStream_t stream) {
  if (moments_bf16)
    return adam_typed<P, __nv_bfloat16>(param, grad, grad_rows_indexed, exp_avg, exp_avg_sq, rows, n_rows, d, step,
                                        decoder, stream);
  return adam_typed<P, float>(param, grad, grad_rows_indexed, exp_avg, exp_avg_sq, rows, n_rows, d, step, decoder,
                              stream);
}

}  // namespace

cudaError_t launch_row_sparse_adam(ScalarKind param_kind, bool moments_bf16, void* param, const void* grad,
                                   bool grad_rows_indexed, void* exp_avg, void* exp_avg_sq, const int64_t* rows,
                                   int64_t n_rows, int64_t d, AdamStep step, bool decoder, cudaStream_t stream) {
  SAEENGINE_DISPATCH(param_kind, adam_param_typed<T>(moments_bf16, param, grad, grad_rows_indexed, exp_avg,
                                                     exp_avg_sq, rows, n_rows, d, step, decoder, stream))
}

}  // namespace saeengine
