"""Boundary checks shared by the functional ops: each error names the argument and the fix."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_matrix(name: str, t: torch.Tensor, cols: int | None = None, what: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {what}, got shape {tuple(t.shape)}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} has {t.shape[1]} columns but {cols} are expected {what}".rstrip())


def check_vector(name: str, t: torch.Tensor | None, size: int) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != size:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape [{size}], got {shape}")


def check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 rows); pass at least one row")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; use float32, float16 or bfloat16")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors are on different devices ({listing}); move them to one device with .to(device)")


def check_compute_dtype(name: str, t: torch.Tensor, **params: torch.Tensor | None) -> None:
    """Each parameter is in t's dtype (the compute dtype) or float32 (master weights)."""
    for key, p in params.items():
        if p is not None and p.dtype not in (t.dtype, torch.float32):
            raise TypeError(f"{key} is {p.dtype} but {name} is {t.dtype}; parameters must be in {name}'s "
                            "dtype or float32 (master weights): cast them, or run under torch.autocast")


def check_finite(name: str, t: torch.Tensor,
                 fix: str = "clean the activations, or pass check=False to skip this check") -> None:
    """NonFiniteError naming the count and the first row of t [N, d] holding NaN or inf.

    One reduction and one host sync when all is finite; callers on the hot path pass
    check=False.
    """
    if bool(torch.isfinite(t).all()):
        return
    bad = ~torch.isfinite(t)
    rows = bad.reshape(t.shape[0], -1).any(1) if t.dim() > 1 else bad
    row = int(rows.nonzero()[0, 0])
    first = t[row][bad[row]].flatten()[0].item() if t.dim() > 1 else t[row].item()
    raise NonFiniteError(f"{name} has {int(bad.sum())} non-finite values (NaN or inf), the first in row {row} "
                         f"({first}); {fix}")


def check_k(k: int, d_sae: int, name: str = "k") -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1 or k > d_sae:
        raise ValueError(f"{name}={k} is out of range: it must satisfy 1 <= {name} <= d_sae={d_sae}")


def check_latent_list(name: str, t: torch.Tensor | None, n_latents: int) -> None:
    """A 1-D int64 list of latent ids in [0, n_latents), or None (one host sync)."""
    if t is None:
        return
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D [S] tensor of latent ids, got shape {tuple(t.shape)}")
    check_indices(t, n_latents)


def check_indices(indices: torch.Tensor, n_latents: int) -> None:
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}; use indices.long()")
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n_latents:
        raise IndexError(f"indices hold values in [{lo}, {hi}] but must lie in [0, {n_latents - 1}] (W_dec has {n_latents} rows)")
