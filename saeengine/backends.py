"""The registry of op implementations, and the one place that decides which runs.

Every op lists its implementations by algorithm, fastest first (:data:`IMPLEMENTATIONS`).
Each :class:`Implementation` declares what it needs (Triton, the CUDA extension, CUDA
tensors), which optional flags it honours (sparse weight gradients, reading fp32 master
weights), its limits (largest k, float64), and the source files its GPU validation is
keyed on.

How a name is resolved (README.md, "Backends", lists the names and the variables):
- ``backend="auto"`` (default): ``SAEENGINE_BACKEND`` replaces it when set (for the ops
  that have that name); otherwise the first implementation that can run here and whose
  current sources passed the GPU tests (:mod:`saeengine.validation`) is used. CPU tensors
  get the first torch implementation that can run the call: ``"cpu"`` where the op has
  one (torch ops with the sparse backward), else ``"reference"``. What auto passes over
  is logged once per reason.
- An implementation name (``"fused"``, ``"chunked"``, ``"radix"``, ...) or a family name
  (``"torch"`` = ``"reference"``, the oracle; ``"triton"``; ``"cuda"``: the op's
  implementation in that language) is an explicit choice: if it cannot run, or cannot honour a flag the call asks
  for, :class:`BackendUnavailableError` says why. Explicit choices skip the validation gate.
- Triton kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

The plans of the ops with several parts (``saeengine.ops.topk_encode.plan``,
``saeengine.ops.sparse_decode.plan``) build on :func:`choose`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from saeengine._native import load_extension
from saeengine.errors import SAEEngineError

log = logging.getLogger("saeengine")

FAMILIES = ("torch", "triton", "cuda")
# Flags an implementation may honour (a call that asks for one it does not honour raises).
FLAGS = ("sparse_grad", "master_weights")

_KERNELS = ("kernels/_common.py",)
_SEGMENT_SUM = ("kernels/latent_rowsum.py", "kernels/sparse_decode.py", "saeengine/ops/latent_index.py")
_CSRC = ("csrc/common.cuh", "csrc/launchers.h", "csrc/torch_glue.h", "csrc/bindings.cpp")


@dataclass(frozen=True)
class Implementation:
    """One implementation of one op.

    op, name: e.g. ("topk_encode", "fused"). family: "torch", "triton" or "cuda" (what the
    family names select). needs: "triton" (the package, and CUDA tensors or the
    interpreter), "extension" (saeengine._C), "cuda" (CUDA tensors), "cpu" (CPU
    tensors). flags: the optional
    flags of :data:`FLAGS` it honours. max_k: the largest k it selects (None: any).
    float64: whether it takes float64 inputs. sources: repository paths whose content
    the GPU validation record is keyed on (empty for pure torch code, which needs none).
    """

    op: str
    name: str
    family: str
    needs: tuple[str, ...] = ()
    flags: frozenset[str] = frozenset(FLAGS)
    max_k: int | None = None
    float64: bool = True
    sources: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"

    @property
    def needs_validation(self) -> bool:
        return bool(self.sources)


def _impl(op, name, family, needs=(), flags=FLAGS, max_k=None, float64=True, sources=()):
    return Implementation(op, name, family, tuple(needs), frozenset(flags), max_k, float64, tuple(sources))


TOPK_SELECT_MAX_K = 1024  # kTopkSelectMaxK in csrc/launchers.h

# Fastest first: "auto" takes the first that can run and is validated.
IMPLEMENTATIONS: dict[str, tuple[Implementation, ...]] = {
    "topk_encode": (
        # One Triton kernel: GEMM tiles and the top-k selection; the same sparse backward.
        _impl("topk_encode", "fused", "triton", needs=("triton",), sources=(
            "kernels/topk_encode.py", "saeengine/ops/topk_encode/autograd.py", *_SEGMENT_SUM, *_KERNELS)),
        # cuBLAS chunks + a select per chunk; the sparse Triton backward.
        _impl("topk_encode", "chunked", "cuda", needs=("triton",), sources=(
            "saeengine/ops/topk_encode/chunked.py", "saeengine/ops/topk_encode/autograd.py",
            *_SEGMENT_SUM, *_KERNELS)),
        # torch ops: row blocks of the GEMM, a two-level top-k, the sparse backward (CPU only).
        _impl("topk_encode", "cpu", "torch", needs=("cpu",), flags=("sparse_grad",)),
        _impl("topk_encode", "reference", "torch", flags=("sparse_grad",)),
    ),
    "sparse_decode": (
        _impl("sparse_decode", "triton", "triton", needs=("triton",), sources=(
            "saeengine/ops/sparse_decode/triton.py", *_SEGMENT_SUM, *_KERNELS)),
        # Its backward is dense (torch.library autograd) and it reads a compute-dtype copy.
        _impl("sparse_decode", "cuda", "cuda", needs=("extension", "cuda"), flags=(), float64=False, sources=(
            "csrc/sparse_decode.cu", "csrc/sparse_decode_op.cpp", "saeengine/ops/_cuda_ops.py", *_CSRC)),
        # embedding_bag + the sparse backward in torch ops (CPU only).
        _impl("sparse_decode", "cpu", "torch", needs=("cpu",), flags=("sparse_grad",)),
        _impl("sparse_decode", "reference", "torch", flags=("sparse_grad",)),
    ),
    "topk_select": (
        _impl("topk_select", "radix", "cuda", needs=("extension", "cuda"), max_k=TOPK_SELECT_MAX_K, float64=False,
              sources=("csrc/topk_select.cu", "csrc/topk_select_op.cpp", *_CSRC)),
        _impl("topk_select", "reference", "torch"),
    ),
    "row_sparse_adam": (
        _impl("row_sparse_adam", "cuda", "cuda", needs=("extension", "cuda"),
              sources=("csrc/row_sparse_adam.cu", "csrc/optim_ops.cpp", *_CSRC)),
        _impl("row_sparse_adam", "reference", "torch"),
    ),
    "resample_dead": (
        _impl("resample_dead", "cuda", "cuda", needs=("extension", "cuda"),
              sources=("csrc/dead_latents.cu", "csrc/optim_ops.cpp", *_CSRC)),
        _impl("resample_dead", "reference", "torch"),
    ),
    "mark_fired": (
        _impl("mark_fired", "cuda", "cuda", needs=("extension", "cuda"),
              sources=("csrc/dead_latents.cu", "csrc/optim_ops.cpp", *_CSRC)),
        _impl("mark_fired", "reference", "torch"),
    ),
}


class BackendUnavailableError(SAEEngineError, RuntimeError):
    """An explicitly requested implementation cannot run here; the message says why."""


def implementation(op: str, name: str) -> Implementation:
    """The implementation ``name`` of ``op`` (KeyError-free: ValueError naming the choices)."""
    for impl in _implementations(op):
        if impl.name == name:
            return impl
    raise ValueError(f"{op} has no implementation {name!r}; choose one of {names(op)}")


def names(op: str) -> tuple[str, ...]:
    return tuple(impl.name for impl in _implementations(op))


def _implementations(op: str) -> tuple[Implementation, ...]:
    if op not in IMPLEMENTATIONS:
        raise ValueError(f"unknown op {op!r}; ops: {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[op]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_problem() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err}); pip install triton"
    return ""


def _need_problem(need: str, device: torch.device) -> str:
    if need == "triton":
        problem = _triton_import_problem()
        if problem:
            return problem
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return ""
        return f"triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to interpret them on CPU"
    if need == "extension":
        loaded, reason = load_extension()
        return "" if loaded else reason
    if need == "cuda":
        return "" if device.type == "cuda" else f"it needs CUDA tensors (got {device})"
    if need == "cpu":
        return "" if device.type == "cpu" else f"it runs on CPU tensors (got {device})"
    raise AssertionError(need)


def unavailable_reason(impl: Implementation, device: torch.device, *, k: int | None = None,
                       dtype: torch.dtype | None = None, flags: tuple[str, ...] = ()) -> str:
    """Why ``impl`` cannot run this call on ``device``; "" when it can. ``k`` and
    ``dtype`` describe the call where the implementation has limits; ``flags`` are the
    optional flags the call asks for."""
    for need in impl.needs:
        problem = _need_problem(need, device)
        if problem:
            return problem
    if k is not None and impl.max_k is not None and k > impl.max_k:
        return f"it selects at most k={impl.max_k} (asked k={k})"
    if dtype == torch.float64 and not impl.float64:
        return "it takes float32, float16 and bfloat16 inputs, not float64"
    missing = [flag for flag in flags if flag not in impl.flags]
    if missing:
        return f"it does not honour {', '.join(missing)}"
    return ""


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info("saeengine: %s", message)


def _requested(requested: str, op: str) -> str:
    """The name that applies to ``op``: "auto", or an implementation name of ``op``."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    requested = requested.strip().lower()
    if requested == "auto":
        override = os.environ.get("SAEENGINE_BACKEND", "").strip().lower()
        if not override or override == "auto":
            return "auto"
        if not _known_anywhere(override):
            raise ValueError(f"SAEENGINE_BACKEND={override!r} names no implementation; use 'auto', a family "
                             f"({', '.join(FAMILIES)}) or an implementation name ({', '.join(implementation_names())})")
        # An override applies to the ops that have that name; the others choose automatically.
        return _name_for(override, op) or "auto"
    name = _name_for(requested, op)
    if name is None and requested in FAMILIES:
        raise BackendUnavailableError(f"{op} has no {requested} implementation (its implementations: "
                                      f"{', '.join(names(op))})")
    if name is None:
        raise ValueError(f"backend={requested!r} is not an implementation of {op}: use 'auto', "
                         f"{', '.join(map(repr, names(op)))} or a family ({', '.join(FAMILIES)})")
    return name


def _name_for(requested: str, op: str) -> str | None:
    if requested in names(op):
        return requested
    if requested == "torch":  # the family names the reference, the oracle (every op has one)
        return "reference"
    if requested in FAMILIES:
        family = [impl.name for impl in _implementations(op) if impl.family == requested]
        if family:
            return family[0]
    return None


def implementation_names() -> list[str]:
    """Every implementation name of every op, sorted (the names a backend= may give)."""
    return sorted({impl.name for impls in IMPLEMENTATIONS.values() for impl in impls})


def _known_anywhere(name: str) -> bool:
    return name in FAMILIES or name in implementation_names()


def choose(requested: str, op: str, device: torch.device | str, *, k: int | None = None,
           dtype: torch.dtype | None = None, flags: tuple[str, ...] = (),
           candidates: tuple[str, ...] | None = None) -> Implementation:
    """The implementation of ``op`` that runs this call (see the module docstring).

    ``k``, ``dtype`` and ``flags`` describe the call (limits and optional flags);
    ``candidates`` restricts what "auto" may take (a plan's own rule, e.g. no fused
    selection of wide subset codes), in that order.
    """
    device = torch.device(device)
    name = _requested(requested, op)
    if name != "auto":
        impl = implementation(op, name)
        reason = unavailable_reason(impl, device, k=k, dtype=dtype, flags=flags)
        if reason:
            raise BackendUnavailableError(f"{op}: implementation {name!r} is unavailable: {reason}")
        return impl
    if device.type != "cuda":  # the interpreter is a testing tool, far slower than torch on CPU
        for impl in _implementations(op):
            if impl.family == "torch" and not unavailable_reason(impl, device, k=k, dtype=dtype, flags=flags):
                return impl
        return implementation(op, "reference")
    from saeengine.validation import cached_validation_problem as validation_problem

    order = [implementation(op, n) for n in candidates] if candidates is not None else list(_implementations(op))
    for impl in order:
        if "cpu" in impl.needs:  # a CPU implementation: not a candidate on a GPU
            continue
        reason = unavailable_reason(impl, device, k=k, dtype=dtype, flags=flags) or validation_problem(impl)
        if not reason:
            return impl
        _log_once(f"{op}: auto passes over {impl.name!r} ({reason})")
    return implementation(op, "reference")


def resolve_backend(requested: str, op: str, device: torch.device | str, **call) -> str:
    """The name of the implementation :func:`choose` picks (for the single-part ops)."""
    return choose(requested, op, device, **call).name


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """Implementations of ``op`` that can run on ``device`` now (validated or not)."""
    device = torch.device(device)
    return [impl.name for impl in _implementations(op) if not unavailable_reason(impl, device)]
