"""TopKEncodeFunction: the kernel forward of one or more selections (the main code, then
the AuxK code) with one sparse backward through the by-latent index.

The forward of each selection is the implementation its plan names: "fused" (the Triton
kernel, kernels/topk_encode.py) or "chunked" (cuBLAS chunks + a select, :mod:`.chunked`).
The backward is the same for both: the Triton segment sum (kernels/latent_rowsum.py) for
W_enc's and b_enc's gradients, and one sparse decode (kernels/sparse_decode.py) for x's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..code import SparseCode
from ..latent_index import LatentIndex, build_latent_index, compact_rowsum, sparse_row_gradient
from .chunked import chunked_topk_encode


class Selection(NamedTuple):
    """One code of a call: its width k, the latents it chooses among (None: all), the
    implementation that selects it ("fused" or "chunked") and a chunked part's select."""

    k: int
    latent_subset: torch.Tensor | None
    implementation: str
    select: str | None = None


def select_topk(x_centered, W_compute, b_enc, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward selection of one code: (values [N, k], indices [N, k])."""
    if selection.implementation == "fused":
        from saeengine.kernels.topk_encode import topk_encode_forward

        return topk_encode_forward(x_centered, W_compute, b_enc, selection.k, selection.latent_subset)
    if selection.implementation == "chunked":
        return chunked_topk_encode(x_centered, W_compute, b_enc, selection.k, selection.latent_subset,
                                   select_backend=selection.select)
    raise AssertionError(f"no kernel selection {selection.implementation!r}")


class TopKEncodeFunction(torch.autograd.Function):
    """Inputs: x_centered [N, d] (= x - b_pre), W_enc [F, d] (the parameter, possibly fp32
    master weights), W_compute (what the kernels read: W_enc detached, in x's dtype or the
    fp32 master weights), b_enc [F] in x's dtype, the selections (a tuple of
    :class:`Selection`), sparse_grad. Outputs: values and indices per selection, then the
    LatentIndex of each selection's indices (built once here, reused by the decoder's
    backward), flattened: the first 2*S outputs are values/indices pairs.

    The selections share one autograd node: W_enc's and b_enc's gradients of all of them
    are summed in place by the segment-sum kernel, in W_enc's dtype directly, and x's
    gradient is one sparse decode of the joined codes. With ``sparse_grad`` W_enc's
    gradient is a sparse COO tensor of the chosen latents' rows instead (no [F, d] buffer).
    """

    @staticmethod
    def forward(ctx, x_centered, W_enc, W_compute, b_enc, selections, sparse_grad):
        codes, indexes = [], []
        for selection in selections:
            values, indices = select_topk(x_centered, W_compute, b_enc, selection)
            # A subset code's distinct latents are at most the subset's: its compact
            # gradients are sized by that, not by its N*k pairs.
            subset = selection.latent_subset
            bound = W_compute.shape[0] if subset is None else subset.numel()
            codes += [values, indices]
            indexes += list(build_latent_index(indices, bound))
        ctx.n_codes = len(selections)
        ctx.save_for_backward(x_centered, W_compute, *codes, *indexes)
        ctx.weight_dtype, ctx.bias_dtype = W_enc.dtype, b_enc.dtype
        ctx.sparse_grad = sparse_grad
        ctx.mark_non_differentiable(*codes[1::2], *indexes)
        return (*codes, *indexes)

    @staticmethod
    def backward(ctx, *grads):
        from saeengine.kernels.latent_rowsum import latent_weighted_rowsum
        from saeengine.kernels.sparse_decode import sparse_decode_forward

        x_centered, W_compute, *saved = ctx.saved_tensors
        n_codes = ctx.n_codes
        codes, index_tensors = saved[:2 * n_codes], saved[2 * n_codes:]
        grad_pres, all_indices, pieces = [], [], []
        grad_W = grad_b = None
        n_latents = W_compute.shape[0]
        for i in range(n_codes):
            values, indices = codes[2 * i], codes[2 * i + 1]
            index = LatentIndex(*index_tensors[4 * i:4 * i + 4])
            # ReLU: only pairs with a positive activation pass gradient.
            grad_pre = torch.where(values > 0, grads[2 * i].float(), 0.0)
            grad_pres.append(grad_pre)
            all_indices.append(indices)
            if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[3]):
                continue
            if ctx.sparse_grad:
                latents, rows, sums = compact_rowsum(index, grad_pre, x_centered, n_latents, ctx.weight_dtype,
                                                     with_sums=True)
                pieces.append((latents, rows))
                if grad_b is None:
                    grad_b = torch.zeros(n_latents, dtype=ctx.weight_dtype, device=rows.device)
                grad_b.index_add_(0, latents, sums)  # distinct latents per code: no collisions
            else:
                grad_W, grad_b = latent_weighted_rowsum(
                    index, grad_pre, x_centered, indices.shape[1], n_latents,
                    out_dtype=ctx.weight_dtype, with_sums=True, out=grad_W, sums=grad_b)
        if pieces:
            grad_W = sparse_row_gradient(pieces, (n_latents, W_compute.shape[1]))
        grad_x = None
        if ctx.needs_input_grad[0]:
            # sum_j grad_pre[n, j] W_enc[indices[n, j]] over every code: one sparse decode.
            joined = (grad_pres[0], all_indices[0]) if n_codes == 1 else (
                torch.cat(grad_pres, 1), torch.cat(all_indices, 1))
            grad_x = sparse_decode_forward(*joined, W_compute, out_dtype=x_centered.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_W, None, grad_b, None, None


def encode_selections(x_centered, W_enc, W_compute, b_enc, selections: list[Selection],
                      sparse_grad: bool = False) -> list[SparseCode]:
    """One SparseCode per selection; through the autograd node when a gradient is needed."""
    tracked = (x_centered, W_enc, b_enc)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tracked)):
        return [SparseCode(*select_topk(x_centered, W_compute, b_enc, s)) for s in selections]
    outputs = TopKEncodeFunction.apply(x_centered, W_enc, W_compute, b_enc, tuple(selections), sparse_grad)
    n = len(selections)
    codes, indexes = outputs[:2 * n], outputs[2 * n:]
    return [SparseCode(codes[2 * i], codes[2 * i + 1], latent_index=LatentIndex(*indexes[4 * i:4 * i + 4]))
            for i in range(n)]
