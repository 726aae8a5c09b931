// torch glue of saeengine::topk_select.
#include "torch_glue.h"

namespace saeengine {
namespace {

constexpr const char* kOp = "topk_select";

std::tuple<at::Tensor, at::Tensor> topk_select_cuda(const at::Tensor& input, int64_t k) {
  TORCH_CHECK(input.dim() == 2, "saeengine::topk_select: input must be [N, F], got ", input.sizes());
  check_cuda(kOp, input, {input});
  const int64_t n = input.size(0), f = input.size(1);
  TORCH_CHECK(1 <= k && k <= f, "saeengine::topk_select: k=", k, " must lie in [1, F=", f, "].");
  TORCH_CHECK(k <= kTopkSelectMaxK, "saeengine::topk_select: k=", k, " is above the kernel's limit of ",
              kTopkSelectMaxK, "; use saeengine.ops.topk_select(..., backend=\"torch\") for wider codes.");
  TORCH_CHECK(f < (int64_t{1} << 32), "saeengine::topk_select: F=", f, " must be below 2^32.");
  const ScalarKind kind = scalar_kind(input, kOp, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor values = at::empty({n, k}, input.options());
  at::Tensor indices = at::empty({n, k}, input.options().dtype(at::kLong));
  check_launch(kOp, launch_topk_select(kind, x.data_ptr(), values.data_ptr(), indices.data_ptr<int64_t>(), n, f, k,
                                       current_stream()));
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(saeengine, CUDA, m) { m.impl("topk_select", &topk_select_cuda); }

}  // namespace saeengine
