"""Backend choice for every op: "torch" (reference), "triton" (kernels/), "cuda" (csrc/).

Rules (README.md lists the environment variables):
- ``backend="auto"`` (default): ``SAEENGINE_BACKEND`` overrides it when set (for the ops
  that have that backend); otherwise the
  fastest available backend for the op and device is used, falling back towards
  "torch" and logging the reason once. Kernels still awaiting their first GPU test run
  (``AWAITING_GPU_VALIDATION``) are used only when asked for by name.
- An explicit backend (argument or ``SAEENGINE_BACKEND``) that cannot run raises
  :class:`BackendUnavailableError` with the reason.
- Triton kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from saeengine._native import load_extension

log = logging.getLogger("saeengine")

BACKENDS = ("torch", "triton", "cuda")

# Which backends implement each op, fastest first ("auto" takes the first that runs).
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "topk_encode": ("triton", "cuda", "torch"),
    "sparse_decode": ("triton", "cuda", "torch"),
    "topk_select": ("cuda", "torch"),
    "row_sparse_adam": ("cuda", "torch"),
    "resample_dead": ("cuda", "torch"),
    "mark_fired": ("cuda", "torch"),
}


# CUDA kernels whose GPU tests have not yet passed on a GPU: "auto" passes them over, and an
# explicit backend="cuda" (or SAEENGINE_BACKEND=cuda) still runs them. The first GPU session
# that sees their tests pass removes them from here, and orders OP_BACKENDS by the
# measurements (benchmarks/bench_cuda_ops.py, run_benchmarks.py).
AWAITING_GPU_VALIDATION: frozenset[tuple[str, str]] = frozenset({
    ("topk_encode", "cuda"), ("sparse_decode", "cuda"), ("topk_select", "cuda"),
    ("row_sparse_adam", "cuda"), ("resample_dead", "cuda"), ("mark_fired", "cuda"),
})

# Backends that lean on another one: the cuda encoder's backward runs the Triton kernels.
ALSO_NEEDS: dict[tuple[str, str], str] = {("topk_encode", "cuda"): "triton"}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_problem() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err}); pip install triton"
    return ""


def unavailable_reason(backend: str, op: str, device: torch.device) -> str:
    """Why ``backend`` cannot run ``op`` on ``device``; "" when it can."""
    if backend not in OP_BACKENDS[op]:
        return f"{op} has no {backend} implementation (available: {', '.join(OP_BACKENDS[op])})"
    if backend == "torch":
        return ""
    if backend == "triton":
        problem = _triton_import_problem()
        if problem:
            return problem
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return ""
        return f"triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to interpret them on CPU"
    if backend == "cuda":
        loaded, reason = load_extension()
        if not loaded:
            return reason
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got {device})"
        helper = ALSO_NEEDS.get((op, backend))
        return unavailable_reason(helper, op, device) if helper else ""
    raise AssertionError(backend)


@functools.lru_cache(maxsize=None)
def _log_fallback_once(op: str, backend: str, reason: str, chosen: str) -> None:
    log.info("saeengine: %s: %s backend unavailable (%s); using %s", op, backend, reason, chosen)


def resolve_backend(requested: str, op: str, device: torch.device) -> str:
    """Return the backend that will run ``op`` on ``device``; see the module docstring."""
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"backend={requested!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if requested == "auto":
        override = os.environ.get("SAEENGINE_BACKEND", "").strip().lower()
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(f"SAEENGINE_BACKEND={override!r} is not one of 'auto', {', '.join(BACKENDS)}")
            if override in OP_BACKENDS[op]:  # ops without that backend keep the automatic choice
                requested = override
    if requested != "auto":
        reason = unavailable_reason(requested, op, device)
        if reason:
            raise BackendUnavailableError(f"{op}: backend {requested!r} is unavailable: {reason}")
        return requested
    # Automatic choice: CPU tensors use the reference unless interpreting was asked for
    # explicitly (the interpreter is a testing tool, far slower than torch on CPU).
    candidates = OP_BACKENDS[op] if device.type == "cuda" else ("torch",)
    for backend in candidates:
        reason = ("its GPU tests have not run on a GPU yet; pass it explicitly to use it"
                  if (op, backend) in AWAITING_GPU_VALIDATION else unavailable_reason(backend, op, device))
        if not reason:
            return backend
        _log_fallback_once(op, backend, reason, "the next backend")
    raise AssertionError("the torch backend is always available")


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """Backends that can run ``op`` on ``device`` now (for docs, CLIs and tests)."""
    device = torch.device(device)
    return [b for b in OP_BACKENDS[op] if not unavailable_reason(b, op, device)]
