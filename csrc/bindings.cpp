// The saeengine op library: schemas, and a clear error for CPU tensors. CUDA kernels are
// registered next to their glue (*_op.cpp, optim_ops.cpp); fake (meta) kernels and
// autograd live in Python (saeengine/ops/_cuda_ops.py).
#include <torch/extension.h>
#include <torch/library.h>

namespace saeengine {
namespace {

// Every op's CPU kernel: say what to do instead of torch's generic dispatch error.
void not_on_cpu(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), " (cuda backend) needs CUDA tensors, got CPU tensors. Move them to a GPU, "
              "or use the torch backend: the saeengine.ops / saeengine.optim function with backend=\"torch\".");
}

constexpr const char* kOps[] = {"sparse_decode", "sparse_decode_backward", "topk_select", "row_sparse_adam_",
                                "mark_fired_", "resample_dead_"};

}  // namespace

TORCH_LIBRARY(saeengine, m) {
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor weight, Tensor? bias) -> Tensor");
  m.def("sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor weight, Tensor order, "
        "Tensor unique_latents, Tensor segment_starts, Tensor n_unique) -> (Tensor, Tensor)");
  m.def("topk_select(Tensor input, int k) -> (Tensor, Tensor)");
  m.def("row_sparse_adam_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, "
        "float lr, float beta1, float beta2, float eps, int step, bool grad_is_dense, bool decoder) -> ()");
  m.def("mark_fired_(Tensor(a!) last_fired, Tensor indices, Tensor values, int token_count) -> ()");
  m.def("resample_dead_(Tensor(a!) W_enc, Tensor(b!) b_enc, Tensor(c!) W_dec, Tensor dead, Tensor x, Tensor cdf, "
        "Tensor enc_norm, int seed, Tensor(d!)? enc_m, Tensor(e!)? enc_v, Tensor(f!)? dec_m, Tensor(g!)? dec_v, "
        "Tensor(h!)? bias_m, Tensor(i!)? bias_v) -> ()");
}

TORCH_LIBRARY_IMPL(saeengine, CPU, m) {
  for (const char* name : kOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&not_on_cpu>());
}

}  // namespace saeengine

// Importing saeengine._C runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "saeengine CUDA ops (registered under torch.ops.saeengine)"; }
