"""Top-k select over an existing dense matrix [N, F]: for the places where the
pre-activations exist anyway (BatchTopK over a batch, JumpReLU-to-TopK conversion, dense
codes at inference).

Layers: torch reference :func:`topk_select_ref` (torch.topk) | CUDA op
``torch.ops.saeengine.topk_select`` (csrc/topk_select.cu: a threshold from per-thread
maxima, or radix select when ties crowd it, then a sort in shared memory) | functional
:func:`topk_select`.
"""

from __future__ import annotations

import torch

from saeengine.backends import resolve_backend

from . import _checks

CUDA_MAX_K = 1024  # kTopkSelectMaxK in csrc/launchers.h


def topk_select_ref(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, F] -> (values [N, k], indices [N, k] int64), each row sorted descending."""
    return torch.topk(x, k, dim=1, largest=True, sorted=True)


def _kernel_takes(x: torch.Tensor, k: int) -> bool:
    """Whether the CUDA kernel handles this selection's k and dtype at all."""
    return k <= CUDA_MAX_K and x.dtype != torch.float64


def fastest_select_backend(x: torch.Tensor, k: int) -> str:
    """"cuda" where the kernel can run this selection (CUDA tensor, k <= 1024, not float64,
    extension built), else "torch": for callers that asked for the CUDA path by name (the
    chunked "cuda" encoder), which "auto" would not give while the kernel awaits its GPU
    validation (saeengine.backends)."""
    from saeengine.backends import unavailable_reason

    return "cuda" if _kernel_takes(x, k) and not unavailable_reason("cuda", "topk_select", x.device) else "torch"


def topk_select(x: torch.Tensor, k: int, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of x, sorted descending.

    Args:
        x: [N, F] float32, float16 or bfloat16 (float64 on the torch backend).
        k: 1 <= k <= F (the cuda backend takes k <= 1024; "auto" uses torch beyond).
        backend: "auto", "torch" or "cuda". The cuda kernel breaks ties towards the lower
            column and ranks NaN above every number (as torch.topk does); its output is the
            same on every run.
    Returns:
        (values [N, k] in x's dtype, indices [N, k] int64).
    """
    _checks.check_matrix("x", x, what="[N, F]")
    _checks.check_float("x", x)
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"k={k} must lie in [1, F={x.shape[1]}]")
    if backend == "auto" and not _kernel_takes(x, k):  # beyond the kernel
        backend = "torch"
    backend = resolve_backend(backend, "topk_select", x.device)
    if backend == "cuda":
        return torch.ops.saeengine.topk_select(x, k)
    return topk_select_ref(x, k)
