"""Sparse decode: out[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec.

Layers: torch reference (here) | Triton kernels (kernels/sparse_decode.py,
kernels/latent_rowsum.py) wired by ``SparseDecodeTriton`` | CUDA op
``torch.ops.saeengine.sparse_decode`` (csrc/) | functional :func:`sparse_decode`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saeengine.backends import resolve_backend

from . import _checks
from .latent_index import LatentIndex, build_latent_index


def sparse_decode_ref(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                      b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference (CPU path, test oracle, benchmark baseline); fp32 accumulation.

    values [N, k], indices [N, k] int64, W_dec [F, d], b_dec [d] -> [N, d] in W_dec's dtype.
    """
    out = F.embedding_bag(indices, W_dec.float(), per_sample_weights=values.float(), mode="sum")
    if b_dec is not None:
        out = out + b_dec.float()
    return out.to(W_dec.dtype)


def sparse_decode_backward_ref(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                               W_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference gradients: (grad_values [N, k], grad_W_dec [F, d]), fp32 math.

    Materializes [N, k, d]; it is the oracle, not a fast path.
    """
    g = grad_out.float()
    gathered = W_dec.float()[indices]                       # [N, k, d]
    grad_values = torch.einsum("nd,nkd->nk", g, gathered)
    contrib = values.float()[..., None] * g[:, None, :]      # [N, k, d]
    grad_W = torch.zeros(W_dec.shape, dtype=torch.float32, device=W_dec.device)
    grad_W.index_add_(0, indices.reshape(-1), contrib.reshape(-1, W_dec.shape[1]))
    return grad_values.to(values.dtype), grad_W.to(W_dec.dtype)


class SparseDecodeTriton(torch.autograd.Function):
    """Triton forward; deterministic sparse backward through the by-latent index.

    Inputs: values [N, k], indices [N, k], W_dec [F, d] (the parameter, possibly fp32
    master weights), W_compute (W_dec detached, in values' dtype), b_dec [d] in values'
    dtype or None, latent_index. The gradient of W_dec is produced directly in W_dec's
    dtype: no gradient for a cast copy, and no second [F, d] buffer.
    """

    @staticmethod
    def forward(ctx, values, indices, W_dec, W_compute, b_dec, latent_index):
        from saeengine.kernels.sparse_decode import sparse_decode_forward

        ctx.save_for_backward(values, indices, W_compute, *(latent_index or ()))
        ctx.has_bias = b_dec is not None
        ctx.weight_dtype = W_dec.dtype
        ctx.mark_non_differentiable(indices)
        return sparse_decode_forward(values, indices, W_compute, b_dec)

    @staticmethod
    def backward(ctx, grad_out):
        from saeengine.kernels.latent_rowsum import latent_weighted_rowsum
        from saeengine.kernels.sparse_decode import sparse_decode_grad_values

        values, indices, W_compute, *index = ctx.saved_tensors
        grad_values = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_values = sparse_decode_grad_values(grad_out, indices, W_compute, out_dtype=values.dtype)
        if ctx.needs_input_grad[2]:
            index = LatentIndex(*index) if index else build_latent_index(indices)
            grad_W, _ = latent_weighted_rowsum(index, values, grad_out, indices.shape[1], W_compute.shape[0],
                                               out_dtype=ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_b = grad_out.float().sum(0).to(grad_out.dtype)
        return grad_values, None, grad_W, None, grad_b, None


def compute_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` detached, in ``dtype`` (a view when it already is): what the kernels read."""
    return weight.detach() if weight.dtype == dtype else weight.detach().to(dtype)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None, *, backend: str = "auto",
                  latent_index: LatentIndex | None = None, weight_compute: torch.Tensor | None = None,
                  check: bool = True) -> torch.Tensor:
    """Decode sparse codes: ``out[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec``.

    Computes in values' dtype. W_dec and b_dec are in that dtype too, or float32 master
    weights (mixed precision): the Triton path then returns W_dec's gradient in float32
    directly, with no gradient buffer for a cast copy.

    Args:
        values: [N, k] activations (float32, float16 or bfloat16).
        indices: [N, k] int64 latent ids in [0, F).
        W_dec: [F, d] decoder rows; b_dec: [d] bias, or None.
        backend: "auto", "torch", "triton" or "cuda" (see saeengine.backends).
        latent_index: the by-latent index of ``indices`` if already built (saves a sort
            in the backward).
        weight_compute: W_dec detached in values' dtype, when the caller already made one
            (two decodes of one step share it; see :func:`compute_copy`).
        check: validate shapes, devices, dtypes and index range (one host sync).
    Returns:
        [N, d] in values' dtype, accumulated in fp32. Differentiable in values, W_dec, b_dec.
    """
    if check:
        _checks.check_matrix("values", values, what="[N, k]")
        _checks.check_matrix("indices", indices, cols=values.shape[1], what="[N, k] like values")
        _checks.check_matrix("W_dec", W_dec, what="[F, d]")
        if indices.shape[0] != values.shape[0]:
            raise ValueError(f"values has {values.shape[0]} rows but indices has {indices.shape[0]}")
        _checks.check_vector("b_dec", b_dec, W_dec.shape[1])
        _checks.check_nonempty("values", values)
        _checks.check_float("W_dec", W_dec)
        _checks.check_same_device(values=values, indices=indices, W_dec=W_dec, b_dec=b_dec)
        _checks.check_compute_dtype("values", values, W_dec=W_dec, b_dec=b_dec)
        _checks.check_indices(indices, W_dec.shape[0])
    backend = resolve_backend(backend, "sparse_decode", W_dec.device)
    dtype = values.dtype
    b = b_dec.to(dtype) if b_dec is not None else None
    if backend == "triton":
        W_c = weight_compute if weight_compute is not None else compute_copy(W_dec, dtype)
        return SparseDecodeTriton.apply(values, indices, W_dec, W_c, b, latent_index)
    if backend == "torch":
        return sparse_decode_ref(values, indices, W_dec.to(dtype), b)
    return torch.ops.saeengine.sparse_decode(values, indices, W_dec.to(dtype), b)
