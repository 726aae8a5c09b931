"""Torch reference of topk_encode: the CPU path, the test oracle and the benchmark baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_encode_ref(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                    b_pre: torch.Tensor | None = None, latent_subset: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Materializes pre [N, F]; differentiable through autograd (dense gradients).

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


def topk_encode_ref_sparse_grad(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                                b_pre: torch.Tensor | None = None, latent_subset: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_encode_ref` whose W_enc gradient is a sparse COO tensor of the chosen
    rows (``F.embedding(sparse=True)``): the selection runs without gradient, and the
    chosen values are recomputed from the gathered rows ([N, k, d]; a reference, not a
    fast path). W_enc may be fp32 master weights of a half-precision x: the gathered rows
    are rounded to x's dtype, and the gradient stays fp32. b_enc's gradient stays dense,
    as on the kernel paths."""
    with torch.no_grad():
        _, indices = topk_encode_ref(x, W_enc.to(x.dtype), b_enc, k, b_pre=b_pre, latent_subset=latent_subset)
    xc = x - b_pre if b_pre is not None else x
    rows = F.embedding(indices, W_enc, sparse=True).to(x.dtype)         # [N, k, d], rounded like x
    values = torch.relu(torch.einsum("nd,nkd->nk", xc, rows) + b_enc[indices])
    # Recomputed values may reorder where two tie within rounding: keep rows descending.
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)
