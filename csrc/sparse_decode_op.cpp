// torch glue of saeengine::sparse_decode and saeengine::sparse_decode_backward.
#include "torch_glue.h"

namespace saeengine {
namespace {

constexpr const char* kForward = "sparse_decode";
constexpr const char* kBackward = "sparse_decode_backward";

void check_code(const char* op, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight) {
  TORCH_CHECK(values.dim() == 2 && indices.dim() == 2 && weight.dim() == 2, "saeengine::", op,
              ": values and indices must be [N, k] and weight [F, d]; got ", values.sizes(), ", ", indices.sizes(),
              ", ", weight.sizes());
  TORCH_CHECK(values.sizes() == indices.sizes(), "saeengine::", op, ": values ", values.sizes(), " and indices ",
              indices.sizes(), " must have the same shape [N, k].");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "saeengine::", op, ": indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(values.scalar_type() == weight.scalar_type(), "saeengine::", op, ": values (", values.scalar_type(),
              ") and weight (", weight.scalar_type(), ") must share a dtype.");
}

at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  check_code(kForward, values, indices, weight);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  check_cuda(kForward, weight, {values, indices, weight, b});
  const int64_t d = weight.size(1);
  if (b.defined()) {
    TORCH_CHECK(b.dim() == 1 && b.size(0) == d, "saeengine::sparse_decode: bias must be [", d, "], got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == weight.scalar_type(), "saeengine::sparse_decode: bias must match weight's dtype.");
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor v = values.contiguous(), i = indices.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty({values.size(0), d}, weight.options());
  check_launch(kForward, launch_sparse_decode_forward(scalar_kind(weight, kForward, "weight"), v.data_ptr(),
                                                      i.data_ptr<int64_t>(), w.data_ptr(),
                                                      b.defined() ? b.data_ptr() : nullptr, out.data_ptr(),
                                                      values.size(0), values.size(1), d, current_stream()));
  return out;
}

// (grad_values [N, k] in values' dtype, grad_weight [F, d] fp32). The by-latent index
// (order, unique_latents, segment_starts, n_unique) is build_latent_index(indices).
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
    const at::Tensor& order, const at::Tensor& unique_latents, const at::Tensor& segment_starts,
    const at::Tensor& n_unique) {
  check_code(kBackward, values, indices, weight);
  check_cuda(kBackward, weight, {grad_out, values, indices, weight, order, unique_latents, segment_starts, n_unique});
  const int64_t n = values.size(0), k = values.size(1), d = weight.size(1), pairs = n * k;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == n && grad_out.size(1) == d,
              "saeengine::sparse_decode_backward: grad_out must be [", n, ", ", d, "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(),
              "saeengine::sparse_decode_backward: grad_out must share weight's dtype.");
  TORCH_CHECK(order.numel() == pairs && unique_latents.numel() == pairs && segment_starts.numel() == pairs + 1 &&
                  n_unique.numel() == 1,
              "saeengine::sparse_decode_backward: the latent index must come from build_latent_index(indices) "
              "(order and unique_latents [N*k], segment_starts [N*k + 1], n_unique [1]).");
  for (const at::Tensor* t : {&order, &unique_latents, &segment_starts, &n_unique})
    TORCH_CHECK(t->scalar_type() == at::kLong, "saeengine::sparse_decode_backward: the latent index tensors must be "
                "int64, got ", t->scalar_type());
  const c10::cuda::CUDAGuard guard(weight.device());
  const ScalarKind kind = scalar_kind(weight, kBackward, "weight");
  const at::Tensor g = grad_out.contiguous(), v = values.contiguous(), i = indices.contiguous(),
                   w = weight.contiguous();
  at::Tensor grad_values = at::empty({n, k}, values.options());
  at::Tensor grad_weight = at::zeros({weight.size(0), d}, weight.options().dtype(at::kFloat));
  check_launch(kBackward, launch_sparse_decode_grad_values(kind, g.data_ptr(), i.data_ptr<int64_t>(), w.data_ptr(),
                                                           grad_values.data_ptr(), n, k, d, current_stream()));
  check_launch(kBackward, launch_sparse_decode_grad_weight(
                              kind, g.data_ptr(), v.data_ptr(), order.contiguous().data_ptr<int64_t>(),
                              unique_latents.contiguous().data_ptr<int64_t>(),
                              segment_starts.contiguous().data_ptr<int64_t>(), n_unique.data_ptr<int64_t>(),
                              grad_weight.data_ptr<float>(), pairs, k, d, current_stream()));
  return {grad_values, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(saeengine, CUDA, m) {
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cuda);
}

}  // namespace saeengine
