"""The SAE's losses, in fp32 over the normalized input x~ [N, d_in] (engine-design.md).

- FVU = ||x~ - x^||^2 / ||x~ - mean(x~)||^2 over the batch (defined for N >= 2).
- AuxK (Gao et al. 2024) = min(S / k_aux, 1) * ||e - e^||^2 / ||x~ - mean(x~)||^2: e = x~ - x^
  is the residual of the full reconstruction (detached: AuxK trains the dead latents to
  explain it, not the main code to leave it), e^ the AuxK code's decode (no bias), S the
  number of dead latents. The factor min(S / k_aux, 1), the AuxK code's width over k_aux,
  keeps a handful of dead latents from carrying the loss's full weight.
- loss = the mean of the reconstructions' FVUs (one reconstruction for most architectures;
  one per prefix for Matryoshka) + aux_alpha * AuxK.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Losses(NamedTuple):
    fvu: torch.Tensor   # scalar: the FVU of the last (full) reconstruction
    auxk: torch.Tensor  # scalar: 0 without an AuxK code
    loss: torch.Tensor  # scalar: mean FVU of the reconstructions + aux_alpha * auxk


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """x [N, d] fp32 -> ||x - mean(x)||^2 (scalar, at least the smallest positive float)."""
    return (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


def fvu(x: torch.Tensor, x_hat: torch.Tensor, total_var: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, d] fp32, x_hat [N, d] (any float dtype) -> scalar FVU."""
    total_var = total_variance(x) if total_var is None else total_var
    return (x - x_hat.float()).pow(2).sum() / total_var


def auxk_loss(x: torch.Tensor, x_hat: torch.Tensor, e_hat: torch.Tensor, width: int, k_aux: int,
              total_var: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, d] fp32, x_hat [N, d] the full reconstruction, e_hat [N, d] the AuxK decode of
    a code ``width`` wide -> scalar AuxK loss."""
    total_var = total_variance(x) if total_var is None else total_var
    residual = (x - x_hat.float()).detach()
    return (width / k_aux) * (residual - e_hat.float()).pow(2).sum() / total_var


def sae_losses(x: torch.Tensor, recons: list[torch.Tensor], e_hat: torch.Tensor | None, aux_width: int,
               k_aux: int, aux_alpha: float) -> Losses:
    """x [N, d] fp32 normalized input; recons: [N, d] reconstructions, the last the full
    one; e_hat [N, d] AuxK's decode (or None) of a code ``aux_width`` wide."""
    total_var = total_variance(x)
    fvus = [fvu(x, r, total_var) for r in recons]
    auxk = (auxk_loss(x, recons[-1], e_hat, aux_width, k_aux, total_var) if e_hat is not None
            else torch.zeros((), device=x.device))
    return Losses(fvus[-1], auxk, sum(fvus) / len(fvus) + aux_alpha * auxk)
