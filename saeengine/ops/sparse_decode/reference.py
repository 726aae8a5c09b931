"""Torch reference of sparse_decode: the CPU path, the test oracle and the benchmark baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_decode_ref(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                      b_dec: torch.Tensor | None = None, *, sparse_grad: bool = False,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """W_dec's rows rounded to the compute ``dtype`` (default W_dec's), fp32 accumulation;
    differentiable through autograd.

    values [N, k], indices [N, k] int64, W_dec [F, d], b_dec [d] -> [N, d] in ``dtype``.
    ``sparse_grad``: W_dec's gradient is a sparse COO tensor of the decoded rows (the
    rows are gathered with ``F.embedding(sparse=True)``: an [N, k, d] temporary).
    """
    dtype = dtype or W_dec.dtype
    if sparse_grad:
        rows = F.embedding(indices, W_dec, sparse=True).to(dtype).float()
        out = torch.einsum("nk,nkd->nd", values.float(), rows)
    else:
        out = F.embedding_bag(indices, W_dec.to(dtype).float(), per_sample_weights=values.float(), mode="sum")
    if b_dec is not None:
        out = out + b_dec.to(dtype).float()
    return out.to(dtype)


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
