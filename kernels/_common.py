"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(cast operands to fp32 before tl.dot, tl.dot input_precision).

    The interpreter multiplies the raw bits of bf16 operands in tl.dot (triton issue
    11584), so interpreted dots run in fp32. fp32 operands use TF32 only when torch
    allows it for matmuls, so the kernel matches what torch would compute.
    """
    if interpreting():
        return True, "ieee"
    if dtype == torch.float32:
        return False, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, "ieee"


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: a few waves of its multiprocessors."""
    if device.type != "cuda":
        return 4  # interpreter: enough to exercise the split-and-merge path
    return 4 * multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())
