"""Data-dependent initialization: the geometric median for the decoder bias."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: argmin_y sum_i ||x_i - y|| for points [M, d] -> [d] (float64 inside)."""
    x = points.double()
    y = x.mean(0)
    for _ in range(iterations):
        dist = (x - y).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        new = (w[:, None] * x).sum(0) / w.sum()
        moved = (new - y).norm() / y.norm().clamp_min(1e-12)
        y = new
        if moved < tol:
            break
    return y.to(points.dtype)


@torch.no_grad()
def init_from_sample(sae, sample: torch.Tensor, b_dec_init: str) -> None:
    """Fit the input normalization on ``sample`` [M, d_in], then set b_dec from the
    normalized sample: its geometric median, its mean, or zeros."""
    sae.fit_normalization(sample)
    xn = sae.normalize(sample.float())
    if b_dec_init == "geometric_median":
        sae.b_dec.copy_(geometric_median(xn).to(sae.b_dec.dtype))
    elif b_dec_init == "mean":
        sae.b_dec.copy_(xn.mean(0).to(sae.b_dec.dtype))
    else:
        sae.b_dec.zero_()
