"""TopK encoding: (values, indices) = top-k of relu((x - b_pre) W_enc^T + b_enc) per row.

Layers: torch reference (here) | fused Triton kernel (kernels/topk_encode.py) wired by
``TopKEncodeTriton`` with a sparse backward | functional :func:`topk_encode`.
The AuxK code (top-k_aux over dead latents only) is a second pass of the same kernel
with the dead mask; its gradient reaches the encoder like the main code's.
"""

from __future__ import annotations

import torch

from saeengine.backends import resolve_backend

from . import _checks
from .code import SparseCode
from .latent_index import LatentIndex, build_latent_index


def topk_encode_ref(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                    b_pre: torch.Tensor | None = None, latent_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: materializes pre [N, F]; the CPU path and the test oracle.

    x [N, d], W_enc [F, d], b_enc [F], b_pre [d], latent_mask [F] bool (latents outside
    it count as 0) -> (values [N, k], indices [N, k] int64), rows sorted descending.
    """
    xc = x - b_pre if b_pre is not None else x
    pre = torch.relu(xc @ W_enc.T + b_enc)
    if latent_mask is not None:
        pre = pre * latent_mask.to(pre.dtype)
    values, indices = pre.topk(k, dim=1, sorted=True)
    return values, indices


class TopKEncodeTriton(torch.autograd.Function):
    """Fused Triton top-k forward; sparse backward through the by-latent index.

    Inputs: x_centered [N, d] (= x - b_pre), W_enc [F, d], b_enc [F], k, latent_mask.
    Outputs: values [N, k], indices [N, k], and the LatentIndex tensors of ``indices``
    (built once here, reused by the decoder's backward).
    """

    @staticmethod
    def forward(ctx, x_centered, W_enc, b_enc, k, latent_mask):
        from saeengine.kernels.topk_encode import topk_encode_forward

        values, indices = topk_encode_forward(x_centered, W_enc, b_enc, k, latent_mask)
        index = build_latent_index(indices)
        ctx.save_for_backward(x_centered, W_enc, values, indices, *index)
        ctx.mark_non_differentiable(indices, *index)
        return (values, indices, *index)

    @staticmethod
    def backward(ctx, grad_values, *unused):
        from saeengine.kernels.latent_rowsum import latent_weighted_rowsum
        from saeengine.kernels.sparse_decode import sparse_decode_forward

        x_centered, W_enc, values, indices, *index = ctx.saved_tensors
        # ReLU: only pairs with a positive activation pass gradient.
        grad_pre = torch.where(values > 0, grad_values.float(), 0.0)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # sum_j grad_pre[n, j] W_enc[indices[n, j]]: the sparse decode kernel again.
            grad_x = sparse_decode_forward(grad_pre, indices, W_enc, out_dtype=x_centered.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_W, grad_b = latent_weighted_rowsum(
                LatentIndex(*index), grad_pre, x_centered, indices.shape[1], W_enc.shape[0],
                out_dtype=torch.float32, with_sums=True)
            grad_W, grad_b = grad_W.to(W_enc.dtype), grad_b.to(W_enc.dtype)
        return grad_x, grad_W, grad_b, None, None


def _encode_triton(x, W_enc, b_enc, k, b_pre, latent_mask) -> SparseCode:
    from saeengine.kernels.topk_encode import topk_encode_forward

    x_centered = x - b_pre if b_pre is not None else x
    tracked = (x_centered, W_enc, b_enc)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tracked)):
        values, indices = topk_encode_forward(x_centered, W_enc, b_enc, k, latent_mask)
        return SparseCode(values, indices)
    values, indices, *index = TopKEncodeTriton.apply(x_centered, W_enc, b_enc, k, latent_mask)
    return SparseCode(values, indices, latent_index=LatentIndex(*index))


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                b_pre: torch.Tensor | None = None, dead_mask: torch.Tensor | None = None,
                k_aux: int = 0, backend: str = "auto", check: bool = True) -> SparseCode:
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per row.

    Args:
        x: [N, d] activations.
        W_enc: [F, d] encoder rows; b_enc: [F]; b_pre: [d] subtracted from x (the
            decoder bias in an SAE), or None.
        k: latents kept per row, 1 <= k <= F.
        dead_mask: [F] bool, True for dead latents; with ``k_aux > 0`` the result's
            ``aux`` holds the top-k_aux over dead latents only (AuxK; slots beyond the
            dead latents hold value 0).
        backend: "auto", "torch" or "triton" (see saeengine.backends).
        check: validate shapes, devices, dtypes and finiteness (one host sync).
    Returns:
        :class:`SparseCode` with values [N, k] (x's dtype, sorted descending) and
        indices [N, k] int64. Differentiable in x, W_enc, b_enc and b_pre.
    """
    if check:
        _checks.check_matrix("x", x, what="[N, d]")
        _checks.check_matrix("W_enc", W_enc, cols=x.shape[1], what="([F, d] with d = x.shape[1])")
        _checks.check_vector("b_enc", b_enc, W_enc.shape[0])
        _checks.check_vector("b_pre", b_pre, x.shape[1])
        _checks.check_vector("dead_mask", dead_mask, W_enc.shape[0])
        _checks.check_nonempty("x", x)
        _checks.check_float("x", x)
        _checks.check_k(k, W_enc.shape[0])
        if k_aux:
            _checks.check_k(k_aux, W_enc.shape[0], name="k_aux")
        _checks.check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, b_pre=b_pre, dead_mask=dead_mask)
        _checks.check_same_dtype(x=x, W_enc=W_enc, b_enc=b_enc, b_pre=b_pre)
        _checks.check_finite("x", x)
    if dead_mask is not None and dead_mask.dtype != torch.bool:
        raise TypeError(f"dead_mask must be a bool tensor [F], got {dead_mask.dtype}")
    backend = resolve_backend(backend, "topk_encode", x.device)
    aux = None
    if backend == "torch":
        code = SparseCode(*topk_encode_ref(x, W_enc, b_enc, k, b_pre=b_pre))
        if dead_mask is not None and k_aux > 0:
            aux = SparseCode(*topk_encode_ref(x, W_enc, b_enc, k_aux, b_pre=b_pre, latent_mask=dead_mask))
    else:
        code = _encode_triton(x, W_enc, b_enc, k, b_pre, None)
        if dead_mask is not None and k_aux > 0:
            aux = _encode_triton(x, W_enc, b_enc, k_aux, b_pre, dead_mask)
    code.aux = aux
    return code
