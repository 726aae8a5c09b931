"""SparseDecodeTriton: the Triton forward of one or more codes with one decoder, and the
deterministic sparse backward through each code's by-latent index (kernels/sparse_decode.py,
kernels/latent_rowsum.py)."""

from __future__ import annotations

import torch

from ..latent_index import LatentIndex, build_latent_index, compact_rowsum, sparse_row_gradient


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
