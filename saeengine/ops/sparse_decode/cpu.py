"""sparse_decode's "cpu" implementation: ``embedding_bag`` forward, and the sparse backward
of the Triton decoder in torch ops (:mod:`saeengine.ops.pairs_cpu`): the values' gradient
as one dot product per pair, W_dec's as segment sums over each code's by-latent index
(the encoder's, when it built one). Deterministic; no [N, F] or [N, k, d] temporary."""

from __future__ import annotations

import torch

from ..latent_index import LatentIndex, build_latent_index, sparse_row_gradient
from ..pairs_cpu import latent_rowsum_cpu, math_dtype, pair_dots_cpu, pairs_decode_cpu


class SparseDecodeCPU(torch.autograd.Function):
    """Inputs and outputs as :class:`saeengine.ops.sparse_decode.SparseDecodeTriton`:
    W_dec [F, d] (the parameter), W_compute (W_dec detached, in the codes' dtype), b_dec
    [d] or None (added to the first code's output only), latent_indexes (one LatentIndex
    or None per code), sparse_grad, then each code's values [N, k_i] and indices [N, k_i].
    Outputs: one [N, d] per code, in the values' dtype (fp32 accumulation).

    The codes share the node: W_dec's gradient is one [F, d] buffer in W_dec's dtype, or
    one sparse COO tensor of compact rows with ``sparse_grad``.
    """

    @staticmethod
    def forward(ctx, W_dec, W_compute, b_dec, latent_indexes, sparse_grad, *codes):
        pairs = list(zip(codes[0::2], codes[1::2]))
        ctx.has_index = [index is not None for index in latent_indexes]
        ctx.save_for_backward(W_compute, *codes, *(t for index in latent_indexes if index is not None for t in index))
        ctx.has_bias, ctx.weight_dtype, ctx.sparse_grad = b_dec is not None, W_dec.dtype, sparse_grad
        ctx.mark_non_differentiable(*codes[1::2])
        outs = []
        for i, (values, indices) in enumerate(pairs):
            out = pairs_decode_cpu(values, indices, W_compute)
            if i == 0 and b_dec is not None:
                out += b_dec.to(out.dtype)
            outs.append(out.to(values.dtype))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        W_compute, *rest = ctx.saved_tensors
        n_codes = len(grad_outs)
        codes, index_tensors = rest[:2 * n_codes], rest[2 * n_codes:]
        n_latents = W_compute.shape[0]
        indexes = []
        for has in ctx.has_index:
            indexes.append(LatentIndex(*index_tensors[:4]) if has else None)
            index_tensors = index_tensors[4:] if has else index_tensors
        grad_codes, grad_W, pieces = [], None, []
        for i, grad_out in enumerate(grad_outs):
            values, indices = codes[2 * i], codes[2 * i + 1]
            g = grad_out.to(math_dtype(grad_out.dtype))
            grad_values = pair_dots_cpu(g, indices, W_compute).to(values.dtype) \
                if ctx.needs_input_grad[5 + 2 * i] else None
            grad_codes += [grad_values, None]
            if not ctx.needs_input_grad[0]:
                continue
            index = indexes[i] if indexes[i] is not None else build_latent_index(indices, n_latents)
            latents, rows, _ = latent_rowsum_cpu(index, values, g, n_latents, compact=ctx.sparse_grad,
                                                 out=None if ctx.sparse_grad else grad_W)
            if ctx.sparse_grad:
                pieces.append((latents, rows.to(ctx.weight_dtype)))
            else:
                grad_W = rows
        if pieces:
            grad_W = sparse_row_gradient(pieces, tuple(W_compute.shape))
        elif grad_W is not None:
            grad_W = grad_W.to(ctx.weight_dtype)
        grad_b = (grad_outs[0].float().sum(0).to(grad_outs[0].dtype)
                  if ctx.has_bias and ctx.needs_input_grad[2] else None)
        return grad_W, None, grad_b, None, None, *grad_codes
