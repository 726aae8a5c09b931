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
from .latent_index import LatentIndex, build_latent_index, compact_rowsum, sparse_row_gradient


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
    """Triton forward of one or more codes with one decoder; deterministic sparse backward
    through each code's by-latent index.

    Inputs: W_dec [F, d] (the parameter, possibly fp32 master weights), W_compute (W_dec
    detached, in the codes' dtype), b_dec [d] in that dtype or None (added to the first
    code's output only), latent_indexes (one LatentIndex or None per code), then each
    code's values [N, k_i] and indices [N, k_i]. Outputs: one [N, d] per code.

    W_dec's gradient is produced directly in W_dec's dtype, and the codes add into one
    buffer (the main and the AuxK code of a step): no gradient of a cast copy, and no
    [F, d] buffer per code for autograd to sum. With ``sparse_grad`` it is a sparse COO
    tensor of the decoded latents' rows instead.
    """

    @staticmethod
    def forward(ctx, W_dec, W_compute, b_dec, latent_indexes, sparse_grad, *codes):
        from saeengine.kernels.sparse_decode import sparse_decode_forward

        pairs = list(zip(codes[0::2], codes[1::2]))
        ctx.has_index = [index is not None for index in latent_indexes]
        ctx.save_for_backward(W_compute, *codes, *(t for index in latent_indexes if index is not None for t in index))
        ctx.has_bias = b_dec is not None
        ctx.weight_dtype = W_dec.dtype
        ctx.sparse_grad = sparse_grad
        ctx.mark_non_differentiable(*codes[1::2])
        return tuple(sparse_decode_forward(values, indices, W_compute, b_dec if i == 0 else None, out_dtype=values.dtype)
                     for i, (values, indices) in enumerate(pairs))

    @staticmethod
    def backward(ctx, *grad_outs):
        from saeengine.kernels.latent_rowsum import latent_weighted_rowsum
        from saeengine.kernels.sparse_decode import sparse_decode_grad_values

        W_compute, *rest = ctx.saved_tensors
        n_codes = len(grad_outs)
        codes, index_tensors = rest[:2 * n_codes], rest[2 * n_codes:]
        grad_codes, grad_W, pieces = [], None, []
        for i, grad_out in enumerate(grad_outs):
            values, indices = codes[2 * i], codes[2 * i + 1]
            grad_values = None
            if ctx.needs_input_grad[5 + 2 * i]:
                grad_values = sparse_decode_grad_values(grad_out, indices, W_compute, out_dtype=values.dtype)
            grad_codes += [grad_values, None]
            if ctx.needs_input_grad[0]:
                if ctx.has_index[i]:
                    index, index_tensors = LatentIndex(*index_tensors[:4]), index_tensors[4:]
                else:
                    index = build_latent_index(indices, W_compute.shape[0])
                if ctx.sparse_grad:
                    latents, rows, _ = compact_rowsum(index, values, grad_out, W_compute.shape[0], ctx.weight_dtype)
                    pieces.append((latents, rows))
                else:
                    grad_W, _ = latent_weighted_rowsum(index, values, grad_out, indices.shape[1],
                                                       W_compute.shape[0], out_dtype=ctx.weight_dtype, out=grad_W)
        if pieces:
            grad_W = sparse_row_gradient(pieces, tuple(W_compute.shape))
        grad_b = grad_outs[0].float().sum(0).to(grad_outs[0].dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_W, None, grad_b, None, None, *grad_codes


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
        weight_compute: what the kernels read: W_dec detached in values' dtype, when the
            caller already made one (see :func:`compute_copy`), or W_dec's fp32 master
            weights themselves (no copy; the rows are gathered in fp32). Triton path only.
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
    return sparse_decode_codes([(values, indices, latent_index)], W_dec, b_dec, backend=backend,
                               weight_compute=weight_compute)[0]


def sparse_decode_codes(codes: list, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None, *,
                        backend: str = "auto", weight_compute: torch.Tensor | None = None,
                        sparse_grad: bool = False) -> list[torch.Tensor]:
    """Decode several codes with one decoder (the main and the AuxK code of a step).

    ``codes``: (values [N, k_i], indices [N, k_i], LatentIndex or None) per code, all in
    one dtype and already validated (see :func:`sparse_decode`). b_dec is added to the
    first code's output only. On the Triton path the codes share one autograd node, so
    W_dec's gradient is summed in place, with no [F, d] buffer per code; with
    ``sparse_grad`` it is a sparse COO tensor of the decoded latents' rows (Triton path
    only; uncoalesced, min(N*k_i, F) rows per code, no host sync).
    Returns one [N, d] tensor per code.
    """
    backend = resolve_backend(backend, "sparse_decode", W_dec.device)
    dtype = codes[0][0].dtype
    b = b_dec.to(dtype) if b_dec is not None else None
    if backend == "triton":
        W_c = weight_compute if weight_compute is not None else compute_copy(W_dec, dtype)
        flat = [t for values, indices, _ in codes for t in (values, indices)]
        return list(SparseDecodeTriton.apply(W_dec, W_c, b, tuple(index for _, _, index in codes), sparse_grad,
                                             *flat))
    W = W_dec.to(dtype)
    decode = sparse_decode_ref if backend == "torch" else torch.ops.saeengine.sparse_decode
    return [decode(values, indices, W, b if i == 0 else None) for i, (values, indices, _) in enumerate(codes)]
