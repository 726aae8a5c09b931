"""Python side of the csrc/ ops: fake (meta) kernels and autograd registrations.

Imported by saeengine._native once ``saeengine._C`` has registered the ops.
"""

from __future__ import annotations

import torch

from .sparse_decode import sparse_decode_backward_ref


@torch.library.register_fake("saeengine::sparse_decode")
def _sparse_decode_fake(values, indices, weight, bias):
    torch._check(values.shape == indices.shape, lambda: "values and indices must have the same shape")
    return weight.new_empty(values.shape[0], weight.shape[1])


def _sparse_decode_setup_context(ctx, inputs, output):
    values, indices, weight, bias = inputs
    ctx.save_for_backward(values, indices, weight)
    ctx.has_bias = bias is not None


def _sparse_decode_backward(ctx, grad_out):
    # The CUDA backward kernels are issue #4; until then the reference formulas run here.
    values, indices, weight = ctx.saved_tensors
    grad_values, grad_weight = sparse_decode_backward_ref(grad_out, values, indices, weight)
    grad_bias = grad_out.float().sum(0).to(grad_out.dtype) if ctx.has_bias else None
    return grad_values, None, grad_weight, grad_bias


torch.library.register_autograd(
    "saeengine::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup_context
)
