// torch.library registration of the CUDA ops (namespace "saeengine").
// Only c10/cuda headers are used (no ATen/cuda), so this builds against the plain CUDA
// toolkit. Fake (meta) implementations and autograd are registered from Python
// (saeengine/ops/_cuda_ops.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "sparse_decode.h"

namespace saeengine {
namespace {

ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, "saeengine::sparse_decode: ", name, " has dtype ", t.scalar_type(),
                  "; use float32, float16 or bfloat16.");
  }
}

at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(values.dim() == 2 && indices.dim() == 2 && weight.dim() == 2,
              "saeengine::sparse_decode: values and indices must be [N, k] and weight [F, d]; got ",
              values.sizes(), ", ", indices.sizes(), ", ", weight.sizes());
  TORCH_CHECK(values.sizes() == indices.sizes(), "saeengine::sparse_decode: values ", values.sizes(),
              " and indices ", indices.sizes(), " must have the same shape [N, k].");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "saeengine::sparse_decode: indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(values.scalar_type() == weight.scalar_type(), "saeengine::sparse_decode: values (",
              values.scalar_type(), ") and weight (", weight.scalar_type(), ") must share a dtype.");
  TORCH_CHECK(values.is_cuda() && indices.is_cuda() && weight.is_cuda(),
              "saeengine::sparse_decode (cuda backend) needs CUDA tensors.");
  TORCH_CHECK(values.device() == weight.device() && indices.device() == weight.device(),
              "saeengine::sparse_decode: all tensors must be on one device.");
  const int64_t d = weight.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d, "saeengine::sparse_decode: bias must be [", d,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type() && bias->device() == weight.device(),
                "saeengine::sparse_decode: bias must match weight's dtype and device.");
  }
  const ScalarKind kind = scalar_kind(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor v = values.contiguous();
  const at::Tensor i = indices.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({values.size(0), d}, weight.options());
  const cudaError_t err = launch_sparse_decode_forward(
      kind, v.data_ptr(), i.data_ptr<int64_t>(), w.data_ptr(), b.defined() ? b.data_ptr() : nullptr,
      out.data_ptr(), values.size(0), values.size(1), d, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "saeengine::sparse_decode: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor sparse_decode_not_cuda(const at::Tensor& values, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "saeengine::sparse_decode (cuda backend) needs CUDA tensors, got tensors on ",
              values.device(), ". Move them to a GPU, or call saeengine.ops.sparse_decode(..., backend=\"torch\").");
}

}  // namespace

TORCH_LIBRARY(saeengine, m) {
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(saeengine, CUDA, m) { m.impl("sparse_decode", &sparse_decode_cuda); }
TORCH_LIBRARY_IMPL(saeengine, CPU, m) { m.impl("sparse_decode", &sparse_decode_not_cuda); }

}  // namespace saeengine

// Importing saeengine._C runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "saeengine CUDA ops (registered under torch.ops.saeengine)"; }
