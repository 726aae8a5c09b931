"""Loads the optional CUDA extension ``saeengine._C`` once and remembers why it failed.

Importing ``saeengine._C`` registers the ``torch.ops.saeengine.*`` CUDA ops.
"""

from __future__ import annotations

import functools
import importlib.util

REINSTALL = "SAEENGINE_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e ."


@functools.lru_cache(maxsize=None)
def load_extension() -> tuple[bool, str]:
    """Return (loaded, reason). ``reason`` says why the CUDA backend is missing."""
    if importlib.util.find_spec("saeengine._C") is None:
        return False, ("the CUDA extension saeengine._C is not built (no nvcc or a CPU-only torch at install "
                       f"time, or SAEENGINE_SKIP_CUDA_BUILD=1); to build it, reinstall with: {REINSTALL}")
    try:
        from saeengine import _C  # noqa: F401
    except ImportError as err:
        return False, f"saeengine._C is built but does not import ({err}); rebuild it with: {REINSTALL}"
    # Fake (meta) kernels and autograd for the registered ops live in Python.
    from saeengine.ops import _cuda_ops  # noqa: F401

    return True, ""
