"""Dead-latent resampling (Bricken et al. 2023, as in the issue): give dead latents new
directions taken from inputs the SAE reconstructs badly.

Two backends with the same result: the torch reference, and the CUDA op
``torch.ops.saeengine.resample_dead_`` (csrc/dead_latents.cu) that edits every dead row
and its optimizer moments in one launch. Neither synchronizes with the host. The inputs
are drawn with a counter-based hash of (seed, latent) that both backends compute, so
they pick the same inputs.
"""

from __future__ import annotations

import torch

from saeengine.backends import resolve_backend

from .base import ROW_ROLES, SAEOptimizer

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return ((lo * c) + ((hi * c) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer hash of csrc/dead_latents.cu (mix32), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def resample_uniform(seed: int, latents: torch.Tensor) -> torch.Tensor:
    """The uniform draws in [0, 1) of the CUDA kernel for ``latents`` [R] int64 -> [R] float64."""
    seed &= 0xFFFFFFFFFFFFFFFF
    low, high = seed & _MASK32, seed >> 32
    inner = _mix32(torch.full_like(latents, high))
    h = _mix32((latents & _MASK32) ^ inner)
    h = _mix32(h ^ low)
    return h.double() / 2.0**32


def sampling_cdf(losses: torch.Tensor) -> torch.Tensor:
    """Cumulative loss^2 in float64; uniform weights when every loss is 0 (no host sync)."""
    weights = losses.double().pow(2)
    weights = torch.where(weights.sum() > 0, weights, torch.ones_like(weights))
    return torch.cumsum(weights, 0)


def _alive_encoder_norm(W_enc: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Mean norm of the live encoder rows as a [1] float32 tensor (1 when all are dead)."""
    alive = (~dead).float()
    count = alive.sum()
    mean = (W_enc.detach().float().norm(dim=1) * alive).sum() / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.ones_like(mean)).reshape(1)


# The parameters resampling rewrites, and the names the fused kernel gives their moments.
_REWRITTEN = (("W_enc", "enc"), ("W_dec", "dec"), ("b_enc", "bias"))


def _check_optimizer(optimizer) -> None:
    if optimizer is not None and not isinstance(optimizer, SAEOptimizer):
        raise TypeError(f"optimizer must be a saeengine.optim optimizer (DenseAdam, RowSparseAdam) or None, got "
                        f"{type(optimizer).__name__}; wrap torch.optim.Adam as saeengine.optim.DenseAdam(sae, lr)")


def _fused_moments(optimizer) -> dict[str, torch.Tensor | None]:
    """The (m, v) moments of the rewritten parameters, by the CUDA op's argument names
    (None where the optimizer holds none)."""
    out = {}
    for name, short in _REWRITTEN:
        moments = optimizer.row_moments(name) if optimizer is not None else ()
        out[f"{short}_m"], out[f"{short}_v"] = moments if len(moments) == 2 else (None, None)
    return out


def resample_picks(seed: int, latents: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """The input each of ``latents`` [R] int64 (global latent ids) is resampled from:
    [R] int64 positions into the inputs whose cumulative weights are ``cdf`` [N]."""
    target = resample_uniform(seed, latents) * cdf[-1]
    return torch.searchsorted(cdf, target, right=True).clamp_max(cdf.numel() - 1)


@torch.no_grad()
def write_resampled_rows_(module, rows: torch.Tensor, chosen: torch.Tensor, enc_norm: torch.Tensor) -> None:
    """Rows ``rows`` [R] of module.W_dec / W_enc / b_enc from the chosen inputs [R, d_in]:
    W_dec = x / |x|, W_enc = x / |x| * 0.2 * enc_norm, b_enc = 0 (a whole SAE, or a latent
    slice of one: saeengine.distributed.step)."""
    chosen = chosen / chosen.norm(dim=1, keepdim=True).clamp_min(1e-12)
    module.W_dec[rows] = chosen.to(module.W_dec.dtype)
    module.W_enc[rows] = (chosen * (0.2 * enc_norm)).to(module.W_enc.dtype)
    module.b_enc[rows] = 0


@torch.no_grad()
def _resample_ref(sae, dead: torch.Tensor, x: torch.Tensor, cdf: torch.Tensor, enc_norm: torch.Tensor,
                  seed: int) -> None:
    rows = torch.nonzero(dead).squeeze(1)
    write_resampled_rows_(sae, rows, x[resample_picks(seed, rows, cdf)], enc_norm)


@torch.no_grad()
def resample_dead_latents_(sae, optimizer, dead: torch.Tensor, x: torch.Tensor, losses: torch.Tensor,
                           seed: int = 0, *, backend: str = "auto") -> torch.Tensor:
    """Resample the dead latents of ``sae`` in place; returns how many, as a 0-d tensor.

    dead [F] bool; x [N, d_in] inputs (in the SAE's normalized space); losses [N] their
    reconstruction losses; seed: the draw (the same seed gives the same picks on both
    backends).
    - Inputs are drawn with probability proportional to loss^2 (uniformly when all are 0).
    - Each dead latent j gets W_dec[j] = x / |x|, W_enc[j] = x / |x| * 0.2 * (mean norm
      of the live encoder rows), and b_enc[j] = 0.
    - Those latents' optimizer state is zeroed in every latent-row parameter
      (``optimizer.reset_rows_``; the CUDA op zeroes W_enc's, W_dec's and b_enc's moments
      in its own launch).
    - Every other row is left untouched.

    ``optimizer``: a :class:`saeengine.optim.SAEOptimizer` (DenseAdam, RowSparseAdam), or
    None. backend: "auto", "torch" or "cuda" (one kernel launch for the edit).
    """
    if dead.dtype != torch.bool or dead.shape != (sae.cfg.d_sae,):
        raise ValueError(f"dead must be a [{sae.cfg.d_sae}] bool mask, got {dead.dtype} {tuple(dead.shape)}")
    if x.dim() != 2 or x.shape[1] != sae.cfg.d_in or losses.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"x must be [N >= 1, {sae.cfg.d_in}] and losses [N]; got {tuple(x.shape)} and "
                         f"{tuple(losses.shape)}")
    _check_optimizer(optimizer)
    backend = resolve_backend(backend, "resample_dead", sae.W_dec.device)
    x = x.detach().float().contiguous()
    cdf = sampling_cdf(losses)
    enc_norm = _alive_encoder_norm(sae.W_enc, dead)
    if backend == "cuda":
        moments = _fused_moments(optimizer)
        torch.ops.saeengine.resample_dead_(sae.W_enc, sae.b_enc, sae.W_dec, dead, x, cdf, enc_norm, seed,
                                           **moments)
        rest = tuple(name for name, _ in optimizer.named_with_role(*ROW_ROLES)
                     if name not in dict(_REWRITTEN)) if optimizer is not None else ()
        if rest:  # latent-row parameters the kernel does not know (JumpReLU's threshold)
            optimizer.reset_rows_(dead, names=rest)
    else:
        _resample_ref(sae, dead, x, cdf, enc_norm, seed)
        if optimizer is not None:
            optimizer.reset_rows_(dead)
    return dead.sum()
