// Launchers of the csrc/ kernels. They take raw pointers so the .cu files need no torch
// headers (faster builds, and they compile where the toolkit lacks cuBLAS headers); the
// torch glue that checks inputs and registers the ops lives in the *_op.cpp files.
// All tensors are contiguous. Each launcher returns the launch's cudaError_t.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace saeengine {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ----- sparse decode (sparse_decode.cu) -----------------------------------------------
// out [n_rows, d] = sum_j values[n, j] * weight[indices[n, j]] + bias. values [n_rows, k],
// indices [n_rows, k] int64, weight [n_latents, d], bias [d] or nullptr; one dtype (kind).
cudaError_t launch_sparse_decode_forward(ScalarKind kind, const void* values, const int64_t* indices,
                                         const void* weight, const void* bias, void* out,
                                         int64_t n_rows, int64_t k, int64_t d, cudaStream_t stream);

// grad_values [n_rows, k] (kind) = <grad_out[n], weight[indices[n, j]]>, fp32 accumulation.
cudaError_t launch_sparse_decode_grad_values(ScalarKind kind, const void* grad_out, const int64_t* indices,
                                             const void* weight, void* grad_values, int64_t n_rows, int64_t k,
                                             int64_t d, cudaStream_t stream);

// grad_weight [n_latents, d] fp32, zero-filled by the caller: row unique_latents[u] =
// sum over the pairs p in order[starts[u]:starts[u+1]] of values[p] * grad_out[p / k],
// in that order (deterministic). n_unique is read on the device; the grid covers max_unique.
cudaError_t launch_sparse_decode_grad_weight(ScalarKind kind, const void* grad_out, const void* values,
                                             const int64_t* order, const int64_t* unique_latents,
                                             const int64_t* segment_starts, const int64_t* n_unique,
                                             float* grad_weight, int64_t max_unique, int64_t k, int64_t d,
                                             cudaStream_t stream);

// ----- top-k select (topk_select.cu) ---------------------------------------------------
// The k largest of each row of input [n_rows, n_cols] (kind), sorted descending; ties go
// to the lower column; NaN counts as the largest value (as torch.topk). k <= kTopkSelectMaxK.
constexpr int64_t kTopkSelectMaxK = 1024;
cudaError_t launch_topk_select(ScalarKind kind, const void* input, void* values, int64_t* indices,
                               int64_t n_rows, int64_t n_cols, int64_t k, cudaStream_t stream);

// ----- row-sparse Adam (row_sparse_adam.cu) --------------------------------------------
// For each r < n_rows, row = rows[r] of param [*, d] (fp32 or kind): Adam on grad row
// (grad_rows_indexed ? grad[row] : grad[r]), with moments exp_avg/exp_avg_sq [*, d]
// (fp32, or bf16 when moments_bf16). decoder: first remove the gradient's component
// along the row, and after the update project the row to unit norm.
struct AdamStep {
  float lr, beta1, beta2, eps, bias_correction1, bias_correction2;
};
cudaError_t launch_row_sparse_adam(ScalarKind param_kind, bool moments_bf16, void* param, const void* grad,
                                   bool grad_rows_indexed, void* exp_avg, void* exp_avg_sq, const int64_t* rows,
                                   int64_t n_rows, int64_t d, AdamStep step, bool decoder, cudaStream_t stream);

// ----- dead latents (dead_latents.cu) --------------------------------------------------
// last_fired[indices[n, j]] = token_count where values[n, j] > 0 (values in kind).
cudaError_t launch_mark_fired(ScalarKind kind, int64_t* last_fired, const int64_t* indices, const void* values,
                              int64_t n_pairs, int64_t token_count, cudaStream_t stream);

// For every latent f with dead[f]: pick input i = the first index with cdf[i] > u * cdf[n-1]
// (u = resample_uniform(seed, f)), set W_dec[f] = x_i / |x_i|, W_enc[f] = W_dec[f] * 0.2 *
// enc_norm[0], b_enc[f] = 0, and zero row f of every non-null moment. Parameters share
// param_kind; x [n_inputs, d] fp32; moments fp32 (or bf16 when moments_bf16).
struct ResampleMoments {
  void* enc_m; void* enc_v; void* dec_m; void* dec_v; void* bias_m; void* bias_v;
};
cudaError_t launch_resample_dead(ScalarKind param_kind, bool moments_bf16, const bool* dead, int64_t n_latents,
                                 const float* x, const double* cdf, int64_t n_inputs, int64_t d,
                                 const float* enc_norm, uint64_t seed, void* W_enc, void* b_enc, void* W_dec,
                                 ResampleMoments moments, cudaStream_t stream);

}  // namespace saeengine
