"""Dead-latent resampling (Bricken et al. 2023, as in the issue): give dead latents new
directions taken from inputs the SAE reconstructs badly.

The torch reference. Issue 4's CUDA op does the same in one launch.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def resample_dead_latents_(sae, optimizer, dead: torch.Tensor, x: torch.Tensor, losses: torch.Tensor,
                           generator: torch.Generator | None = None) -> int:
    """Resample the dead latents of ``sae`` in place; returns how many were resampled.

    dead [F] bool; x [N, d_in] inputs (in the SAE's normalized space); losses [N] their
    reconstruction losses.
    - Inputs are drawn with probability proportional to loss^2.
    - Each dead latent j gets W_dec[j] = x / |x|, W_enc[j] = x * 0.2 * (mean norm of the
      alive encoder rows), and b_enc[j] = 0.
    - Those rows' optimizer moments are zeroed.
    - Every other row is left untouched.

    ``optimizer`` is a RowSparseAdam (zero_rows_), a torch.optim optimizer over the SAE's
    parameters, or None.
    """
    rows = torch.nonzero(dead).squeeze(1)
    if rows.numel() == 0:
        return 0
    weights = losses.double().pow(2)
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    picks = torch.multinomial(weights.cpu(), rows.numel(), replacement=True, generator=generator).to(x.device)
    chosen = x[picks].float()
    chosen = chosen / chosen.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    enc_norm = sae.W_enc[alive].float().norm(dim=1).mean() if bool(alive.any()) else torch.tensor(1.0)
    sae.W_dec[rows] = chosen.to(sae.W_dec.dtype)
    sae.W_enc[rows] = (chosen * 0.2 * enc_norm).to(sae.W_enc.dtype)
    sae.b_enc[rows] = 0
    if hasattr(optimizer, "zero_rows_"):
        optimizer.zero_rows_(rows)
    elif optimizer is not None:
        for p in (sae.W_enc, sae.b_enc, sae.W_dec):
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][rows] = 0
    return int(rows.numel())
