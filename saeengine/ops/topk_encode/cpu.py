"""topk_encode's "cpu" implementation: torch ops, a sparse backward from the chosen pairs.

Forward: the pre-activations one block of rows at a time (``torch.addmm`` into one
reused buffer of at most ``ROW_CHUNK_BYTES``, so [N, F] never exists and the buffer
stays in the allocator's reused memory; at F so wide that fewer than ``MIN_ROWS`` rows
fit, blocks of columns too, their candidates merged), and per block a two-level exact
top-k (:func:`two_level_topk`), then relu on the k values (relu is monotone).

Backward: the math of the Triton backward (engine-design.md, "Backward, all sparse")
with the CPU primitives of :mod:`saeengine.ops.pairs_cpu`: one by-latent index per code
(built in the forward, reused by the decoder), W_enc's and b_enc's gradients as segment
sums over it (dense [F, d], or compact rows as a sparse COO tensor with ``sparse_grad``),
x's as one ``embedding_bag`` of the gradient at the chosen pairs. Deterministic, no
float atomics, no [N, F] or [N, k, d] temporary.
"""

from __future__ import annotations

import torch

from ..code import SparseCode
from ..latent_index import LatentIndex, build_latent_index, sparse_row_gradient
from ..pairs_cpu import latent_rowsum_cpu, math_dtype, pairs_decode_cpu

ROW_CHUNK_BYTES = 16 * 2**20  # one [rows, columns] pre-activation block
MIN_ROWS = 64                 # fewer rows per GEMM run it far below its speed: split the columns instead
GROUP = 8                     # columns per group of the two-level top-k


def two_level_topk(pre: torch.Tensor, k: int, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """pre [R, F] (contiguous) -> (values [R, k] sorted descending, indices [R, k]): the
    exact top-k per row, as ``torch.topk`` gives, with fewer comparisons.

    The columns c, c + W, c + 2W, ... (W = F // group) form group c. The k groups with the
    largest maxima hold every value above the k-th largest value (a group outside them
    has a maximum at most the k-th largest group maximum, itself at most the k-th value),
    so the top-k over their k * group members (and the F - group * W tail columns) is the
    answer. Values are exactly torch.topk's; an index may differ only between tied values.
    """
    r, f = pre.shape
    width = f // group
    if width < 2 * k:
        return pre.topk(k, dim=1, sorted=True)
    maxima = pre[:, : group * width].view(r, group, width).amax(1)        # [R, W]
    _, columns = maxima.topk(k, dim=1, sorted=False)
    candidates = (columns.unsqueeze(2) + width * torch.arange(group)).reshape(r, k * group)
    if group * width < f:
        candidates = torch.cat([candidates, torch.arange(group * width, f).expand(r, -1)], 1)
    values, where = pre.gather(1, candidates).topk(k, dim=1, sorted=True)
    return values, candidates.gather(1, where)


def cpu_topk_select(x_centered: torch.Tensor, W: torch.Tensor, b_enc: torch.Tensor, k: int,
                    latent_subset: torch.Tensor | None = None, *,
                    chunk_bytes: int = ROW_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of relu(x_centered @ W.T + b_enc) per row, a block of rows at a time.

    x_centered [N, d], W [F, d] and b_enc [F] in one dtype; latent_subset [F_sub] int64
    (choose among these only) or None; 1 <= k <= F (F_sub). Returns (values [N, k] relu'd,
    sorted descending; indices [N, k] int64 latents). Only values tied at the k-th place
    may pick other latents than the reference, the same ones on every run.
    """
    if latent_subset is not None:
        W, b_enc = W[latent_subset], b_enc[latent_subset]
    n, f = x_centered.shape[0], W.shape[0]
    size = x_centered.element_size()
    rows = max(1, min(n, chunk_bytes // max(1, f * size)))
    cols = f
    if rows < min(n, MIN_ROWS):  # wide F: blocks of MIN_ROWS rows, and of columns within them
        rows = min(n, MIN_ROWS)
        cols = max(1, min(f, chunk_bytes // (rows * size)))
    buffer = torch.empty(rows * cols, dtype=x_centered.dtype)
    values = torch.empty(n, k, dtype=x_centered.dtype)
    indices = torch.empty(n, k, dtype=torch.int64)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        found = []
        for first in range(0, f, cols):
            last = min(f, first + cols)
            pre = buffer[: (stop - start) * (last - first)].view(stop - start, last - first)
            torch.addmm(b_enc[first:last], x_centered[start:stop], W[first:last].T, out=pre)
            v, i = two_level_topk(pre, min(k, last - first))
            found.append((v, i + first))
        if len(found) == 1:
            values[start:stop], indices[start:stop] = found[0]
        else:  # the top-k among the column blocks' candidates
            values[start:stop], where = torch.cat([v for v, _ in found], 1).topk(k, dim=1, sorted=True)
            indices[start:stop] = torch.cat([i for _, i in found], 1).gather(1, where)
    if latent_subset is not None:
        indices = latent_subset[indices]
    return values.clamp_min_(0), indices


class TopKEncodeCPU(torch.autograd.Function):
    """Inputs: x_centered [N, d] (= x - b_pre), W_enc [F, d] (the parameter), W_compute
    (W_enc detached, in x's dtype), b_enc [F] in x's dtype, the selections (a tuple of
    (k, latent_subset or None): the main code, then the AuxK code), sparse_grad. Outputs:
    values and indices per selection, then each selection's LatentIndex tensors
    (non-differentiable; the decoder's backward reuses them).

    One node for all selections: W_enc's and b_enc's gradients of every code add into one
    buffer (dense [F, d] in W_enc's dtype) or one sparse COO tensor of compact rows
    (``sparse_grad``), and x's gradient is one embedding_bag of the joined codes.
    """

    @staticmethod
    def forward(ctx, x_centered, W_enc, W_compute, b_enc, selections, sparse_grad):
        codes, indexes = [], []
        for k, subset in selections:
            values, indices = cpu_topk_select(x_centered, W_compute, b_enc, k, subset)
            bound = W_compute.shape[0] if subset is None else subset.numel()
            codes += [values, indices]
            indexes += list(build_latent_index(indices, bound))
        ctx.n_codes = len(selections)
        ctx.save_for_backward(x_centered, W_compute, *codes, *indexes)
        ctx.weight_dtype, ctx.bias_dtype, ctx.sparse_grad = W_enc.dtype, b_enc.dtype, sparse_grad
        ctx.mark_non_differentiable(*codes[1::2], *indexes)
        return (*codes, *indexes)

    @staticmethod
    def backward(ctx, *grads):
        x_centered, W_compute, *saved = ctx.saved_tensors
        n_codes = ctx.n_codes
        codes, index_tensors = saved[:2 * n_codes], saved[2 * n_codes:]
        n_latents = W_compute.shape[0]
        dtype = math_dtype(x_centered.dtype)
        weights_needed = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        grad_pres, pieces, grad_W, grad_b = [], [], None, None
        for i in range(n_codes):
            values = codes[2 * i]
            # ReLU: only pairs with a positive activation pass gradient.
            grad_pre = torch.where(values > 0, grads[2 * i].to(dtype), 0.0)
            grad_pres.append(grad_pre)
            if not weights_needed:
                continue
            index = LatentIndex(*index_tensors[4 * i:4 * i + 4])
            latents, rows, sums = latent_rowsum_cpu(
                index, grad_pre, x_centered, n_latents, compact=ctx.sparse_grad, with_sums=True, out=grad_W,
                sums=None if ctx.sparse_grad else grad_b)
            if ctx.sparse_grad:
                pieces.append((latents, rows.to(ctx.weight_dtype)))
                grad_b = torch.zeros(n_latents, dtype=dtype) if grad_b is None else grad_b
                grad_b.index_add_(0, latents, sums)  # distinct latents per code (padding adds 0)
            else:
                grad_W, grad_b = rows, sums
        if pieces:
            grad_W = sparse_row_gradient(pieces, (n_latents, W_compute.shape[1]))
        elif grad_W is not None:
            grad_W = grad_W.to(ctx.weight_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # sum_j grad_pre[n, j] W_enc[indices[n, j]] over every code: one decode of the pairs.
            joined = (grad_pres[0], codes[1]) if n_codes == 1 else (
                torch.cat(grad_pres, 1), torch.cat(codes[1::2], 1))
            grad_x = pairs_decode_cpu(*joined, W_compute).to(x_centered.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_W, None, grad_b, None, None


def encode_selections_cpu(x_centered: torch.Tensor, W_enc: torch.Tensor, W_compute: torch.Tensor,
                          b_enc: torch.Tensor, selections: list[tuple[int, torch.Tensor | None]],
                          sparse_grad: bool = False) -> list[SparseCode]:
    """One SparseCode per selection (k, latent_subset); through :class:`TopKEncodeCPU`
    when a gradient is needed (the codes then carry their LatentIndex)."""
    tracked = (x_centered, W_enc, b_enc)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tracked)):
        return [SparseCode(*cpu_topk_select(x_centered, W_compute, b_enc, k, subset)) for k, subset in selections]
    outputs = TopKEncodeCPU.apply(x_centered, W_enc, W_compute, b_enc, tuple(selections), sparse_grad)
    n = len(selections)
    codes, indexes = outputs[:2 * n], outputs[2 * n:]
    return [SparseCode(codes[2 * i], codes[2 * i + 1], latent_index=LatentIndex(*indexes[4 * i:4 * i + 4]))
            for i in range(n)]
