"""Per-latent "last fired" counters, updated on the device from each step's code.

Two backends: the torch reference (a scatter of max) and the CUDA op
``torch.ops.saeengine.mark_fired_`` (csrc/dead_latents.cu, one launch). Neither
synchronizes with the host. A latent is dead once ``tokens_seen - last_fired`` reaches the
dead threshold.
"""

from __future__ import annotations

import torch

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
