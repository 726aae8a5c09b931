"""Per-latent "last fired" counters, updated on the device from each step's code.

Two backends: the torch reference (a scatter of max) and the CUDA op
``torch.ops.saeengine.mark_fired_`` (csrc/dead_latents.cu, one launch). Neither
synchronizes with the host. A latent is dead once ``tokens_seen - last_fired`` reaches the
dead threshold.
"""

from __future__ import annotations

import torch

from saeengine._host_read import HostRead
from saeengine.backends import resolve_backend


@torch.no_grad()
def mark_fired_(last_fired: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, token_count: int, *,
                backend: str = "auto") -> None:
    """Set ``last_fired[f] = token_count`` for every latent f with a positive value in the code.

    last_fired [F] int64 (token counts, non-decreasing); indices [N, k] int64 and values
    [N, k] of the step's code; token_count: tokens seen including this step's.
    """
    if last_fired.dtype != torch.int64 or last_fired.dim() != 1:
        raise ValueError(f"last_fired must be a [F] int64 tensor, got {last_fired.dtype} {tuple(last_fired.shape)}")
    if indices.shape != values.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must have one shape")
    backend = resolve_backend(backend, "mark_fired", last_fired.device)
    if backend == "cuda":
        torch.ops.saeengine.mark_fired_(last_fired, indices, values, token_count)
        return
    stamp = torch.where(values > 0, token_count, -1).reshape(-1).to(torch.int64)
    last_fired.scatter_reduce_(0, indices.reshape(-1), stamp, reduce="amax")


class FiredRows:
    """The distinct latents with a positive value in a step's codes (the rows that get
    gradient), found with no host sync: :func:`fired_rows` sorts the step's pairs into a
    buffer of one slot per pair, and copies the distinct count to the host without waiting.
    ``get()`` (after the backward is queued, so the GPU is busy meanwhile) returns them."""

    def __init__(self, buffer: torch.Tensor, count: HostRead):
        self._buffer, self._count = buffer, count

    def get(self) -> torch.Tensor:
        """[R] int64 ascending distinct latents."""
        return self._buffer[: self._count.tolist()]


@torch.no_grad()
def fired_rows(code, n_latents: int) -> FiredRows:
    """code: a SparseCode (values, indices [N, k]) with its AuxK code in ``code.aux`` or
    None -> :class:`FiredRows` of the latents with a positive value in either."""
    codes = [code] + ([code.aux] if code.aux is not None else [])
    keys = torch.cat([torch.where(c.values > 0, c.indices, n_latents).reshape(-1) for c in codes])
    ordered = torch.sort(keys).values  # not fired -> n_latents, sorted to the end
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    first &= ordered < n_latents
    # A permutation: the u-th distinct latent to slot u, the other entries to the end,
    # backwards (no two writes to one slot, so the result is the same on every run).
    n_first = torch.cumsum(first, 0)
    position = torch.arange(ordered.numel(), device=keys.device)
    slot = torch.where(first, n_first - 1, ordered.numel() - 1 - (position - n_first))
    buffer = torch.empty_like(ordered).scatter_(0, slot, ordered)
    return FiredRows(buffer, HostRead(first.sum()))
