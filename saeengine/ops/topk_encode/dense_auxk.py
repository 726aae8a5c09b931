"""AuxK through dense GEMMs over the dead latents: encode, top-k, decode and the backward.

The AuxK code is wide (k_aux = d/2 = 512) over a small subset (the dead latents, about a
tenth of F). Sparse kernels pay for every chosen pair: the decode, its value gradient,
both segment sums and x's gradient each gather N * k_aux rows of d values (4.3 GB in bf16
at N=4096, d=1024, about 1.5 ms each on an H100). Over S dead latents the same products
are GEMMs of N x S x d, which tensor cores finish in 2 N S d / ~700 TFLOP/s. That beats
the gathers while S < about 230 k_aux, so the SAE takes this path while
S <= DENSE_AUXK_MAX_SUBSET_PER_K * k_aux (which keeps the [N, S] activation matrix small)
and the sparse one beyond.

Layers: torch math in one autograd Function (:class:`AuxKDense`), its reference being the
sparse path (ops.topk_encode with a dead mask, then ops.sparse_decode) | functional
:func:`auxk_dense`.
"""

from __future__ import annotations

import torch

from ..code import SparseCode
from ..latent_index import sparse_row_gradient
from ..topk_select import topk_select

DENSE_AUXK_MAX_SUBSET_PER_K = 64


def use_dense_auxk(n_subset: int, k_aux: int) -> bool:
    """Whether an AuxK code of width k_aux over n_subset latents goes through dense GEMMs."""
    return 0 < n_subset <= DENSE_AUXK_MAX_SUBSET_PER_K * k_aux


class AuxKDense(torch.autograd.Function):
    """Inputs: x_centered [N, d] (compute dtype), W_enc [F, d], b_enc [F], W_dec [F, d]
    (parameters, fp32 master weights or the compute dtype), subset [S] int64 ascending,
    k. Outputs: recon [N, d] = act @ W_dec[subset] in x's dtype, values [N, k] (relu'd,
    descending) and indices [N, k] (latents of the subset).

    act [N, S] (the code scattered densely) is kept for the backward. Weight gradients are
    sparse COO tensors over the subset's rows; b_enc's is dense [F].
    """

    @staticmethod
    def forward(ctx, x_centered, W_enc, b_enc, W_dec, subset, k, select):
        dtype = x_centered.dtype
        W_enc_sub, W_dec_sub = W_enc[subset].to(dtype), W_dec[subset].to(dtype)
        pre = torch.addmm(b_enc[subset].to(dtype), x_centered, W_enc_sub.T)  # [N, S]
        values, positions = topk_select(pre, k, backend=select)
        values = values.clamp_min(0)
        act = pre.zero_().scatter_(1, positions, values)  # reuses pre's memory
        recon = act @ W_dec_sub
        ctx.save_for_backward(x_centered, W_enc_sub, W_dec_sub, act, subset, positions)
        ctx.params = [(p.shape, p.dtype) for p in (W_enc, b_enc, W_dec)]
        indices = subset[positions]
        ctx.mark_non_differentiable(indices)
        return recon, values, indices

    @staticmethod
    def backward(ctx, grad_recon, grad_values, _grad_indices):
        x_centered, W_enc_sub, W_dec_sub, act, subset, positions = ctx.saved_tensors
        (enc_shape, enc_dtype), (b_shape, b_dtype), (dec_shape, dec_dtype) = ctx.params
        g = grad_recon.to(act.dtype)
        # Weight gradients as sparse rows of the subset: autograd adds them into the main
        # code's gradient, dense or sparse, with no [F, d] temporary of their own.
        grad_W_dec = (sparse_row_gradient([(subset, (act.T @ g).to(dec_dtype))], dec_shape)
                      if ctx.needs_input_grad[3] else None)
        grad_act = g @ W_dec_sub.T
        if grad_values is not None:  # a loss on the values themselves adds at the chosen entries
            grad_act = grad_act.scatter_add(1, positions, grad_values.to(grad_act.dtype))
        grad_pre = torch.where(act > 0, grad_act, 0.0)  # relu and the selection: chosen, positive entries
        grad_x = grad_pre @ W_enc_sub if ctx.needs_input_grad[0] else None
        grad_W_enc = (sparse_row_gradient([(subset, (grad_pre.T @ x_centered).to(enc_dtype))], enc_shape)
                      if ctx.needs_input_grad[1] else None)
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(b_shape, dtype=b_dtype, device=subset.device)
            grad_b.index_copy_(0, subset, grad_pre.float().sum(0).to(b_dtype))
        return grad_x, grad_W_enc, grad_b, grad_W_dec, None, None, None


def auxk_dense(x_centered: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
               subset: torch.Tensor, k: int, *, select: str = "auto") -> tuple[SparseCode, torch.Tensor]:
    """The AuxK code over ``subset`` and its decode, through dense GEMMs.

    Args:
        x_centered: [N, d] (x - b_pre) in the compute dtype.
        W_enc, b_enc, W_dec: the SAE's [F, d], [F], [F, d] parameters.
        subset: [S] int64 ascending distinct latents (the dead ones); k <= S.
        select: the topk_select implementation over the [N, S] pre-activations.
    Returns:
        (SparseCode of values [N, k] and indices [N, k], recon [N, d] = sum_j values[n, j]
        W_dec[indices[n, j]] in x's dtype). Differentiable in x_centered, W_enc, b_enc and
        W_dec (weight gradients as sparse rows of the subset).
    """
    recon, values, indices = AuxKDense.apply(x_centered, W_enc, b_enc, W_dec, subset, k, select)
    return SparseCode(values, indices), recon
