"""Python side of the csrc/ ops: fake (meta) kernels and autograd registrations.

Imported by saeengine._native once ``saeengine._C`` has registered the ops.
"""

from __future__ import annotations

import torch

from .latent_index import build_latent_index


@torch.library.register_fake("saeengine::sparse_decode")
def _sparse_decode_fake(values, indices, weight, bias):
    torch._check(values.shape == indices.shape, lambda: "values and indices must have the same shape")
    return weight.new_empty(values.shape[0], weight.shape[1])


@torch.library.register_fake("saeengine::sparse_decode_backward")
def _sparse_decode_backward_fake(grad_out, values, indices, weight, order, unique_latents, segment_starts, n_unique):
    return values.new_empty(values.shape), weight.new_empty(weight.shape, dtype=torch.float32)


@torch.library.register_fake("saeengine::topk_select")
def _topk_select_fake(x, k):
    torch._check(1 <= k <= x.shape[1], lambda: "k must lie in [1, F]")
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


# The in-place ops return nothing, so their fake kernels have nothing to build.
for _name in ("row_sparse_adam_", "mark_fired_", "resample_dead_"):
    torch.library.register_fake(f"saeengine::{_name}")(lambda *args, **kwargs: None)


def _sparse_decode_setup_context(ctx, inputs, output):
    values, indices, weight, bias = inputs
    ctx.save_for_backward(values, indices, weight)
    ctx.has_bias = bias is not None


def _sparse_decode_backward(ctx, grad_out):
    values, indices, weight = ctx.saved_tensors
    index = build_latent_index(indices)
    grad_values, grad_weight = torch.ops.saeengine.sparse_decode_backward(
        grad_out.to(weight.dtype), values, indices, weight, *index)
    grad_bias = grad_out.float().sum(0).to(grad_out.dtype) if ctx.has_bias else None
    return grad_values, None, grad_weight.to(weight.dtype), grad_bias


torch.library.register_autograd(
    "saeengine::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup_context
)
