"""Loads the optional CUDA extension ``saeengine._C`` once and remembers why it failed.

Importing ``saeengine._C`` registers the ``torch.ops.saeengine.*`` CUDA ops.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load_extension() -> tuple[bool, str]:
    """Return (loaded, reason). ``reason`` says why the CUDA backend is missing."""
    try:
        from saeengine import _C  # noqa: F401
    except ImportError as err:
        return False, (
            f"the CUDA extension saeengine._C is not built or does not import ({err}); "
            "reinstall with nvcc and a CUDA build of torch present: "
            "SAEENGINE_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e ."
        )
    # Fake (meta) kernels and autograd for the registered ops live in Python.
    from saeengine.ops import _cuda_ops  # noqa: F401

    return True, ""
