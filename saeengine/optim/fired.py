"""Per-latent "last fired" counters, updated on the device from each step's code.

Two backends: the torch reference (a scatter of max) and the CUDA op
``torch.ops.saeengine.mark_fired_`` (csrc/dead_latents.cu, one launch). Neither
synchronizes with the host. A latent is dead once ``tokens_seen - last_fired`` reaches the
dead threshold.
"""

from __future__ import annotations

import torch

from saeengine._host_read import HostRead
from saeengine.ops.latent_index import run_starts
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


class DeferredLatents:
    """A list of latents found on the device in a buffer of a size the host knows, with
    its length copied to the host without waiting (:class:`saeengine._host_read.HostRead`).
    Make it before queueing more work and call ``get()`` after: the GPU keeps that work
    while the host waits for the length alone."""

    def __init__(self, buffer: torch.Tensor, count: HostRead):
        self._buffer, self._count = buffer, count

    def get(self) -> torch.Tensor:
        """[R] int64 ascending distinct latents."""
        return self._buffer[: self._count.tolist()]


def _flagged_first(values: torch.Tensor, flags: torch.Tensor) -> DeferredLatents:
    """values [M] with flags [M] bool -> the flagged values in their order, deferred. A
    stable partition by a permutation (flagged to the front, the rest to the back in
    reverse): no two writes meet, so the result is the same on every run."""
    n_flagged = torch.cumsum(flags, 0)
    position = torch.arange(values.numel(), device=values.device)
    slot = torch.where(flags, n_flagged - 1, values.numel() - 1 - (position - n_flagged))
    return DeferredLatents(torch.empty_like(values).scatter_(0, slot, values), HostRead(n_flagged[-1]))


@torch.no_grad()
def fired_rows(code, n_latents: int) -> DeferredLatents:
    """code: a SparseCode (values, indices [N, k]) with its AuxK code in ``code.aux`` or
    None, or a DenseCode -> the latents with a positive value in either (the rows that get
    gradient), deferred: found before the backward is queued, read after it. Reads each
    code's ``fired_pairs()`` (a dense code's is one pair per latent)."""
    codes = [code] + ([code.aux] if code.aux is not None else [])
    keys = torch.cat([torch.where(values > 0, indices, n_latents).reshape(-1)
                      for indices, values in (c.fired_pairs() for c in codes)])
    ordered = torch.sort(keys).values  # not fired -> n_latents, sorted to the end
    return _flagged_first(ordered, run_starts(ordered) & (ordered < n_latents))


@torch.no_grad()
def dead_latents_later(dead_mask: torch.Tensor) -> DeferredLatents:
    """dead_mask [F] bool -> its True positions (ascending), deferred: the trainer lists the
    next step's dead latents before this step's backward is queued, and reads them when
    the next step starts, so AuxK never makes the GPU wait on the host."""
    return _flagged_first(torch.arange(dead_mask.numel(), device=dead_mask.device), dead_mask)
