// Sparse decode: out[n] = sum_j values[n, j] * weight[indices[n, j]] + bias.
// Launchers take raw pointers so the .cu files need no torch headers (faster builds,
// and they compile on machines whose CUDA toolkit lacks cuBLAS headers).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace saeengine {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// values [n_rows, k] (kind), indices [n_rows, k] int64, weight [n_latents, d] (kind),
// bias [d] (kind) or nullptr, out [n_rows, d] (kind). All contiguous.
// Accumulates in fp32. Returns the launch's cudaError_t.
cudaError_t launch_sparse_decode_forward(ScalarKind kind, const void* values, const int64_t* indices,
                                         const void* weight, const void* bias, void* out,
                                         int64_t n_rows, int64_t k, int64_t d, cudaStream_t stream);

}  // namespace saeengine
