"""Top-k select over an existing dense matrix [N, F]: for the places where the
pre-activations exist anyway (BatchTopK over a batch, the chunks of the chunked encoder,
dense AuxK).

Implementations (saeengine.backends): ``reference`` (torch.topk, :mod:`.reference`) and
``radix`` (CUDA op ``torch.ops.saeengine.topk_select``, csrc/topk_select.cu: a threshold
from per-thread maxima, or radix select when ties crowd it, then a sort in shared memory;
k <= 1024, no float64).
"""

from __future__ import annotations

import torch

from saeengine.backends import choose

from .. import _checks
from .reference import topk_select_ref

__all__ = ["topk_select", "topk_select_ref", "select_implementation"]


def select_implementation(backend: str, x: torch.Tensor, k: int) -> str:
    """The topk_select implementation a call with this request, x [N, F] and k runs."""
    return choose(backend, "topk_select", x.device, k=k, dtype=x.dtype).name


def topk_select(x: torch.Tensor, k: int, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of x, sorted descending.

    Args:
        x: [N, F] float32, float16 or bfloat16 (float64 on the reference).
        k: 1 <= k <= F ("radix" takes k <= 1024; "auto" uses the reference beyond).
        backend: "auto", "reference" or "radix" (or the families "torch", "cuda"). The
            radix kernel breaks ties towards the lower column and ranks NaN above every
            number (as torch.topk does); its output is the same on every run.
    Returns:
        (values [N, k] in x's dtype, indices [N, k] int64).
    """
    _checks.check_matrix("x", x, what="[N, F]")
    _checks.check_float("x", x)
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"k={k} must lie in [1, F={x.shape[1]}]")
    if select_implementation(backend, x, k) == "radix":
        return torch.ops.saeengine.topk_select(x, k)
    return topk_select_ref(x, k)
