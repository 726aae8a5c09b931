"""TopK encoding: (values, indices) = top-k of relu((x - b_pre) W_enc^T + b_enc) per row.

Layers: torch reference (here) | forward selection by the fused Triton kernel
(kernels/topk_encode.py, backend "triton") or by chunked cuBLAS GEMM + CUDA top-k select
(:mod:`.gemm_topk`, backend "cuda"), wired by ``TopKEncodeFunction`` with one sparse backward
(Triton segment-sum and decode kernels) | functional :func:`topk_encode`.
The AuxK code (top-min(k_aux, #dead) over the dead latents only) is a second pass of the
same kernel over the dead rows of W_enc alone (a tenth of the work when 10% are dead); its
gradient reaches the encoder like the main code's. Listing the dead latents costs one host
sync per call with AuxK on (the pass is sized by their number), or none when the caller
gives them listed (``dead_latents``).
"""

from __future__ import annotations

import torch

from saeengine.backends import resolve_backend

from . import _checks
from .code import SparseCode
from .gemm_topk import gemm_topk_encode
from .latent_index import LatentIndex, build_latent_index, compact_rowsum, sparse_row_gradient
from .sparse_decode import compute_copy


def topk_encode_ref(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                    b_pre: torch.Tensor | None = None, latent_subset: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: materializes pre [N, F]; the CPU path and the test oracle.

    x [N, d], W_enc [F, d], b_enc [F], b_pre [d], latent_subset [F_sub] int64 (choose
    among these latents only) -> (values [N, k], indices [N, k] int64 latents), rows
    sorted descending.
    """
    xc = x - b_pre if b_pre is not None else x
    if latent_subset is not None:
        W_enc, b_enc = W_enc[latent_subset], b_enc[latent_subset]
    pre = torch.relu(xc @ W_enc.T + b_enc)
    values, indices = pre.topk(k, dim=1, sorted=True)
    if latent_subset is not None:
        indices = latent_subset[indices]
    return values, indices


def auxk_latents(dead: torch.Tensor | None, k_aux: int) -> tuple[torch.Tensor | None, int]:
    """dead [S] ascending dead latent ids or None -> (dead, the AuxK width min(k_aux, S)),
    or (None, 0) when AuxK is off or nothing is dead: there is then no AuxK code."""
    if dead is None or k_aux <= 0 or dead.numel() == 0:
        return None, 0
    return dead, min(k_aux, dead.numel())


def dead_latent_list(dead_mask: torch.Tensor | None, k_aux: int) -> tuple[torch.Tensor | None, int]:
    """:func:`auxk_latents` of the mask's True positions. One host sync (their number)."""
    if dead_mask is None or k_aux <= 0:
        return None, 0
    return auxk_latents(torch.nonzero(dead_mask).squeeze(1), k_aux)


# A wide code over a subset (AuxK: k_aux = d/2 = 512 over the dead latents) is selected
# densely, chunk by chunk: the fused kernel's selection cost grows with k (k=512 over 26k
# dead latents took 10.3 ms on an H100, 3x the full F=2^18 GEMM), while the subset's GEMM
# is small (a tenth of the full one at 10% dead). The backward stays sparse either way.
DENSE_SELECT_MIN_K = 129


def _select(x_centered, W_compute, b_enc, k, latent_subset, method):
    """Forward selection: (values [N, k], indices [N, k]). method: "fused" (the Triton
    kernel; wide subset codes go dense) or "gemm" (chunked cuBLAS GEMM + top-k select)."""
    from saeengine.kernels.topk_encode import topk_encode_forward

    fused, select_backend = {"fused": (True, "torch"), "gemm": (False, "fastest")}[method]
    if fused and not (latent_subset is not None and k >= DENSE_SELECT_MIN_K):
        return topk_encode_forward(x_centered, W_compute, b_enc, k, latent_subset)
    return gemm_topk_encode(x_centered, W_compute, b_enc, k, latent_subset, select_backend=select_backend)


class TopKEncodeFunction(torch.autograd.Function):
    """Top-k forward of one or more selections (``method``: see :func:`_select`); sparse
    backward through the by-latent index, by the Triton kernels.

    Inputs: x_centered [N, d] (= x - b_pre), W_enc [F, d] (the parameter, possibly fp32
    master weights), W_compute (W_enc detached, in x's dtype), b_enc [F] in x's dtype, and
    selections: (k, latent_subset or None) per code (the main code, then the AuxK code).
    Outputs per selection: values [N, k], indices [N, k], and the LatentIndex tensors of
    ``indices`` (built once here, reused by the decoder's backward).

    The selections share one autograd node: W_enc's and b_enc's gradients of all of them
    are summed in place by the segment-sum kernel, in W_enc's dtype directly, and x's
    gradient is one sparse decode of the joined codes. With ``sparse_grad`` W_enc's
    gradient is a sparse COO tensor of the chosen latents' rows instead (no [F, d] buffer).
    """

    OUTPUTS_PER_CODE = 6

    @staticmethod
    def forward(ctx, x_centered, W_enc, W_compute, b_enc, selections, method, sparse_grad):
        outputs = []
        for k, latent_subset in selections:
            values, indices = _select(x_centered, W_compute, b_enc, k, latent_subset, method)
            # A subset code's distinct latents are at most the subset's: its compact
            # gradients are sized by that, not by its N*k pairs.
            bound = W_compute.shape[0] if latent_subset is None else latent_subset.numel()
            outputs += [values, indices, *build_latent_index(indices, bound)]
        ctx.save_for_backward(x_centered, W_compute, *outputs)
        ctx.weight_dtype, ctx.bias_dtype = W_enc.dtype, b_enc.dtype
        ctx.sparse_grad = sparse_grad
        ctx.mark_non_differentiable(*(t for i, t in enumerate(outputs) if i % TopKEncodeFunction.OUTPUTS_PER_CODE))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        from saeengine.kernels.latent_rowsum import latent_weighted_rowsum
        from saeengine.kernels.sparse_decode import sparse_decode_forward

        x_centered, W_compute, *outputs = ctx.saved_tensors
        per_code = TopKEncodeFunction.OUTPUTS_PER_CODE
        grad_pres, all_indices, pieces = [], [], []
        grad_W = grad_b = None
        n_latents = W_compute.shape[0]
        for start in range(0, len(outputs), per_code):
            values, indices, *index = outputs[start:start + per_code]
            # ReLU: only pairs with a positive activation pass gradient.
            grad_pre = torch.where(values > 0, grads[start].float(), 0.0)
            grad_pres.append(grad_pre)
            all_indices.append(indices)
            if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[3]):
                continue
            if ctx.sparse_grad:
                latents, rows, sums = compact_rowsum(LatentIndex(*index), grad_pre, x_centered, n_latents,
                                                     ctx.weight_dtype, with_sums=True)
                pieces.append((latents, rows))
                if grad_b is None:
                    grad_b = torch.zeros(n_latents, dtype=ctx.weight_dtype, device=rows.device)
                grad_b.index_add_(0, latents, sums)  # distinct latents per code: no collisions
            else:
                grad_W, grad_b = latent_weighted_rowsum(
                    LatentIndex(*index), grad_pre, x_centered, indices.shape[1], n_latents,
                    out_dtype=ctx.weight_dtype, with_sums=True, out=grad_W, sums=grad_b)
        if pieces:
            grad_W = sparse_row_gradient(pieces, (n_latents, W_compute.shape[1]))
        grad_x = None
        if ctx.needs_input_grad[0]:
            # sum_j grad_pre[n, j] W_enc[indices[n, j]] over every code: one sparse decode.
            joined = (grad_pres[0], all_indices[0]) if len(grad_pres) == 1 else (
                torch.cat(grad_pres, 1), torch.cat(all_indices, 1))
            grad_x = sparse_decode_forward(*joined, W_compute, out_dtype=x_centered.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_W, None, grad_b, None, None, None


def _encode_sparse(x_centered, W_enc, W_compute, b_enc, selections, method, sparse_grad=False) -> list[SparseCode]:
    """One SparseCode per (k, latent_subset) selection."""
    tracked = (x_centered, W_enc, b_enc)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tracked)):
        return [SparseCode(*_select(x_centered, W_compute, b_enc, k, subset, method)) for k, subset in selections]
    outputs = TopKEncodeFunction.apply(x_centered, W_enc, W_compute, b_enc, tuple(selections), method, sparse_grad)
    per_code = TopKEncodeFunction.OUTPUTS_PER_CODE
    return [SparseCode(values, indices, latent_index=LatentIndex(*index))
            for values, indices, *index in (outputs[i:i + per_code] for i in range(0, len(outputs), per_code))]


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                b_pre: torch.Tensor | None = None, dead_mask: torch.Tensor | None = None,
                k_aux: int = 0, dead_latents: torch.Tensor | None = None, backend: str = "auto",
                sparse_grad: bool = False,
                weight_compute: torch.Tensor | None = None, check: bool = True) -> SparseCode:
    """Top-k of ``relu((x - b_pre) @ W_enc.T + b_enc)`` per row.

    Computes in x's dtype. W_enc, b_enc and b_pre are in that dtype too, or float32 master
    weights (mixed precision): the triton and cuda paths then return W_enc's gradient in float32
    directly, with no gradient buffer for a cast copy.

    Args:
        x: [N, d] activations.
        W_enc: [F, d] encoder rows; b_enc: [F]; b_pre: [d] subtracted from x (the
            decoder bias in an SAE), or None.
        k: latents kept per row, 1 <= k <= F.
        dead_mask: [F] bool, True for dead latents; with ``k_aux > 0`` and any latent
            dead, the result's ``aux`` holds the top-min(k_aux, #dead) over the dead
            latents only (AuxK); one host sync lists them.
        dead_latents: [S] int64 ascending dead latent ids, instead of ``dead_mask`` (no
            host sync: the caller has listed them).
        backend: "auto", "torch", "triton" (fused kernel) or "cuda" (chunked cuBLAS GEMM
            + CUDA top-k select); both share the sparse Triton backward (see
            saeengine.backends).
        sparse_grad: on the triton and cuda paths, W_enc's gradient is a sparse COO tensor
            holding the rows of the chosen latents only, as ``nn.Embedding(sparse=True)``
            gives (for :class:`saeengine.optim.RowSparseAdam`). Uncoalesced, and sized
            min(N*k, F) rows per code (zero padding rows past the distinct latents), so no
            host sync sizes it. The torch path ignores it.
        weight_compute: what the kernels read, on the triton and cuda paths: by default
            one copy of W_enc in x's dtype per call; W_enc's fp32 master weights themselves
            (``W_enc.detach()``) save that copy (2 bytes per weight under bf16 autocast),
            the kernels then round the weights as they read them.
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
        _checks.check_latent_list("dead_latents", dead_latents, W_enc.shape[0])
        _checks.check_nonempty("x", x)
        _checks.check_float("x", x)
        _checks.check_k(k, W_enc.shape[0])
        if k_aux:
            _checks.check_k(k_aux, W_enc.shape[0], name="k_aux")
        _checks.check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, b_pre=b_pre, dead_mask=dead_mask,
                                  dead_latents=dead_latents)
        _checks.check_compute_dtype("x", x, W_enc=W_enc, b_enc=b_enc, b_pre=b_pre)
        _checks.check_finite("x", x)
    if dead_mask is not None and dead_mask.dtype != torch.bool:
        raise TypeError(f"dead_mask must be a bool tensor [F], got {dead_mask.dtype}")
    if dead_latents is not None and dead_mask is not None:
        raise ValueError("give the dead latents as dead_mask or as dead_latents, not both")
    backend = resolve_backend(backend, "topk_encode", x.device)
    dead, k_dead = auxk_latents(dead_latents, k_aux) if dead_latents is not None else dead_latent_list(dead_mask, k_aux)
    dtype = x.dtype
    b_enc = b_enc.to(dtype)
    b_pre = b_pre.to(dtype) if b_pre is not None else None
    if backend == "torch":
        W = W_enc.to(dtype)
        code = SparseCode(*topk_encode_ref(x, W, b_enc, k, b_pre=b_pre))
        if dead is not None:
            code.aux = SparseCode(*topk_encode_ref(x, W, b_enc, k_dead, b_pre=b_pre, latent_subset=dead))
    else:
        x_centered = x - b_pre if b_pre is not None else x
        # one cast shared by the main and the AuxK pass, unless the caller gave the weights to read
        W_c = weight_compute if weight_compute is not None else compute_copy(W_enc, dtype)
        selections = [(k, None)] + ([(k_dead, dead)] if dead is not None else [])
        method = "fused" if backend == "triton" else "gemm"
        code, *aux = _encode_sparse(x_centered, W_enc, W_c, b_enc, selections, method, sparse_grad)
        code.aux = aux[0] if aux else None
    return code
