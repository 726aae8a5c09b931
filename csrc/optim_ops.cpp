// torch glue of the optimizer-side ops: saeengine::row_sparse_adam_, mark_fired_ and
// resample_dead_ (all in place, on CUDA tensors).
#include "torch_glue.h"

namespace saeengine {
namespace {

bool moments_are_bf16(const char* op, const at::Tensor& m) {
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kBFloat16, "saeengine::", op,
              ": optimizer moments must be float32 or bfloat16, got ", m.scalar_type());
  return m.scalar_type() == at::kBFloat16;
}

// param [F, d] or [F]; grad dense (like param) or compact ([R, d] or [R], row r for rows[r]).
void row_sparse_adam_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                          const at::Tensor& rows, double lr, double beta1, double beta2, double eps, int64_t step,
                          bool grad_is_dense, bool decoder) {
  constexpr const char* op = "row_sparse_adam_";
  check_cuda(op, param, {param, grad, exp_avg, exp_avg_sq, rows});
  TORCH_CHECK(param.dim() == 1 || param.dim() == 2, "saeengine::row_sparse_adam_: param must be [F, d] or [F], got ",
              param.sizes());
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes(),
              "saeengine::row_sparse_adam_: exp_avg and exp_avg_sq must have param's shape ", param.sizes());
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type(),
              "saeengine::row_sparse_adam_: exp_avg and exp_avg_sq must share a dtype.");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "saeengine::row_sparse_adam_: rows must be a 1-D int64 tensor of distinct row ids.");
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "saeengine::row_sparse_adam_: grad (", grad.scalar_type(),
              ") must share param's dtype (", param.scalar_type(), ").");
  const int64_t d = param.dim() == 2 ? param.size(1) : 1;
  const int64_t grad_rows = grad_is_dense ? param.size(0) : rows.size(0);
  TORCH_CHECK(grad.numel() == grad_rows * d && grad.size(0) == grad_rows, "saeengine::row_sparse_adam_: grad must be ",
              grad_is_dense ? "dense like param" : "compact ([R, d] with R = len(rows))", ", got ", grad.sizes());
  TORCH_CHECK(step >= 1, "saeengine::row_sparse_adam_: step=", step, " must be >= 1 (the count including this one).");
  TORCH_CHECK(!decoder || param.dim() == 2, "saeengine::row_sparse_adam_: decoder=True needs a [F, d] param.");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"param", &param}, {"exp_avg", &exp_avg},
                                {"exp_avg_sq", &exp_avg_sq}})
    check_contiguous(op, name, *t);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor g = grad.contiguous(), r = rows.contiguous();
  const AdamStep s{static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
                   static_cast<float>(eps), static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(step))),
                   static_cast<float>(1.0 - std::pow(beta2, static_cast<double>(step)))};
  check_launch(op, launch_row_sparse_adam(scalar_kind(param, op, "param"), moments_are_bf16(op, exp_avg),
                                          param.data_ptr(), g.data_ptr(), grad_is_dense, exp_avg.data_ptr(),
                                          exp_avg_sq.data_ptr(), r.data_ptr<int64_t>(), r.size(0), d, s,
                                          decoder, current_stream()));
}

void mark_fired_cuda(at::Tensor& last_fired, const at::Tensor& indices, const at::Tensor& values,
                     int64_t token_count) {
  constexpr const char* op = "mark_fired_";
  check_cuda(op, last_fired, {last_fired, indices, values});
  TORCH_CHECK(last_fired.dim() == 1 && last_fired.scalar_type() == at::kLong,
              "saeengine::mark_fired_: last_fired must be a [F] int64 tensor.");
  check_contiguous(op, "last_fired", last_fired);
  TORCH_CHECK(indices.sizes() == values.sizes() && indices.scalar_type() == at::kLong,
              "saeengine::mark_fired_: indices (int64) and values must have one shape [N, k].");
  const c10::cuda::CUDAGuard guard(last_fired.device());
  const at::Tensor i = indices.contiguous(), v = values.contiguous();
  check_launch(op, launch_mark_fired(scalar_kind(values, op, "values"), last_fired.data_ptr<int64_t>(),
                                     i.data_ptr<int64_t>(), v.data_ptr(), i.numel(), token_count, current_stream()));
}

void* optional_moment(const char* op, const std::optional<at::Tensor>& moment, const at::Tensor& like,
                      std::optional<bool>& bf16) {
  if (!moment.has_value()) return nullptr;
  TORCH_CHECK(moment->sizes() == like.sizes(), "saeengine::", op, ": a moment has shape ", moment->sizes(),
              " but its parameter has ", like.sizes());
  check_contiguous(op, "each moment", *moment);
  const bool is_bf16 = moments_are_bf16(op, *moment);
  TORCH_CHECK(!bf16.has_value() || *bf16 == is_bf16, "saeengine::", op, ": all moments must share a dtype.");
  bf16 = is_bf16;
  return moment->data_ptr();
}

void resample_dead_cuda(at::Tensor& W_enc, at::Tensor& b_enc, at::Tensor& W_dec, const at::Tensor& dead,
                        const at::Tensor& x, const at::Tensor& cdf, const at::Tensor& enc_norm, int64_t seed,
                        const std::optional<at::Tensor>& enc_m, const std::optional<at::Tensor>& enc_v,
                        const std::optional<at::Tensor>& dec_m, const std::optional<at::Tensor>& dec_v,
                        const std::optional<at::Tensor>& bias_m, const std::optional<at::Tensor>& bias_v) {
  constexpr const char* op = "resample_dead_";
  check_cuda(op, W_dec, {W_enc, b_enc, W_dec, dead, x, cdf, enc_norm});
  const int64_t f = W_dec.size(0), d = W_dec.dim() == 2 ? W_dec.size(1) : 0;
  TORCH_CHECK(W_dec.dim() == 2 && W_enc.sizes() == W_dec.sizes() && b_enc.dim() == 1 && b_enc.size(0) == f,
              "saeengine::resample_dead_: W_enc and W_dec must be [F, d] and b_enc [F].");
  TORCH_CHECK(W_enc.scalar_type() == W_dec.scalar_type() && b_enc.scalar_type() == W_dec.scalar_type(),
              "saeengine::resample_dead_: W_enc, b_enc and W_dec must share a dtype.");
  TORCH_CHECK(dead.dim() == 1 && dead.size(0) == f && dead.scalar_type() == at::kBool,
              "saeengine::resample_dead_: dead must be a [F] bool mask.");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d && x.size(0) >= 1 && x.scalar_type() == at::kFloat,
              "saeengine::resample_dead_: x must be float32 [N >= 1, d=", d, "], got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(cdf.dim() == 1 && cdf.size(0) == x.size(0) && cdf.scalar_type() == at::kDouble,
              "saeengine::resample_dead_: cdf must be float64 [N] (the cumulative sum of the sampling weights).");
  TORCH_CHECK(enc_norm.numel() == 1 && enc_norm.scalar_type() == at::kFloat,
              "saeengine::resample_dead_: enc_norm must be a one-element float32 tensor.");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"W_enc", &W_enc}, {"b_enc", &b_enc},
                                {"W_dec", &W_dec}})
    check_contiguous(op, name, *t);
  std::optional<bool> bf16;
  ResampleMoments moments{optional_moment(op, enc_m, W_enc, bf16), optional_moment(op, enc_v, W_enc, bf16),
                          optional_moment(op, dec_m, W_dec, bf16), optional_moment(op, dec_v, W_dec, bf16),
                          optional_moment(op, bias_m, b_enc, bf16), optional_moment(op, bias_v, b_enc, bf16)};
  const c10::cuda::CUDAGuard guard(W_dec.device());
  const at::Tensor dm = dead.contiguous(), xc = x.contiguous(), c = cdf.contiguous();
  check_launch(op, launch_resample_dead(scalar_kind(W_dec, op, "W_dec"), bf16.value_or(false), dm.data_ptr<bool>(), f,
                                        xc.data_ptr<float>(), c.data_ptr<double>(), xc.size(0), d,
                                        enc_norm.data_ptr<float>(), static_cast<uint64_t>(seed), W_enc.data_ptr(),
                                        b_enc.data_ptr(), W_dec.data_ptr(), moments, current_stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(saeengine, CUDA, m) {
  m.impl("row_sparse_adam_", &row_sparse_adam_cuda);
  m.impl("mark_fired_", &mark_fired_cuda);
  m.impl("resample_dead_", &resample_dead_cuda);
}

}  // namespace saeengine
