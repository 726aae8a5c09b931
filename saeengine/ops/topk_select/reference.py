"""Torch reference of topk_select: the CPU path, the test oracle and the benchmark baseline."""

from __future__ import annotations

import torch


def topk_select_ref(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, F] -> (values [N, k], indices [N, k] int64), each row sorted descending."""
    return torch.topk(x, k, dim=1, largest=True, sorted=True)
