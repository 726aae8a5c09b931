// Input checks and launch helpers shared by the ops' torch glue (*_op.cpp).
#pragma once
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "launchers.h"

namespace saeengine {

inline ScalarKind scalar_kind(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, "saeengine::", op, ": ", name, " has dtype ", t.scalar_type(),
                  "; use float32, float16 or bfloat16.");
  }
}

inline void check_cuda(const char* op, const at::Tensor& reference, std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    if (!t.defined()) continue;
    TORCH_CHECK(t.is_cuda(), "saeengine::", op, " (cuda backend) needs CUDA tensors, got one on ", t.device(), ".");
    TORCH_CHECK(t.device() == reference.device(), "saeengine::", op, ": all tensors must be on ",
                reference.device(), ", got one on ", t.device(), ".");
  }
}

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "saeengine::", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// In-place ops write through their tensors' pointers, so those must be contiguous already.
inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "saeengine::", op, ": ", name, " must be contiguous (it is updated in place); "
              "pass a contiguous tensor, e.g. a parameter or its .contiguous() copy kept by the caller.");
}

}  // namespace saeengine
