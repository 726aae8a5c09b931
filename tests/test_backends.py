"""Backend dispatch: explicit unavailable raises, the env override, auto falls back."""

import logging

import pytest
import torch

import saeengine.backends as backends
from saeengine import BackendUnavailableError, ops
from saeengine.backends import resolve_backend

CPU = torch.device("cpu")


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("SAEENGINE_BACKEND", raising=False)
    assert resolve_backend("auto", "topk_encode", CPU) == "torch"
    assert resolve_backend("auto", "sparse_decode", CPU) == "torch"


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="triton kernels need CUDA tensors.*TRITON_INTERPRET"):
        resolve_backend("triton", "topk_encode", CPU)
    with pytest.raises(BackendUnavailableError, match="cuda backend needs CUDA tensors|saeengine._C is not built"):
        resolve_backend("cuda", "sparse_decode", CPU)
    with pytest.raises(BackendUnavailableError, match="cuda backend needs CUDA tensors|saeengine._C is not built"):
        resolve_backend("cuda", "topk_encode", CPU)
    with pytest.raises(BackendUnavailableError, match="mark_fired has no triton implementation"):
        resolve_backend("triton", "mark_fired", CPU)
    with pytest.raises(ValueError, match="backend='fast'"):
        resolve_backend("fast", "topk_encode", CPU)


def test_env_override_applies_to_auto_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SAEENGINE_BACKEND", "triton")
    assert resolve_backend("auto", "topk_encode", CPU) == "triton"
    assert resolve_backend("torch", "topk_encode", CPU) == "torch"  # explicit argument wins
    monkeypatch.setenv("SAEENGINE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError):  # an override is explicit: it raises
        resolve_backend("auto", "sparse_decode", CPU)
    monkeypatch.setenv("SAEENGINE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SAEENGINE_BACKEND='bogus'"):
        resolve_backend("auto", "sparse_decode", CPU)


def test_cuda_encoder_needs_triton_for_its_backward(monkeypatch):
    """The cuda encoder's backward runs Triton kernels: without triton it is unavailable
    and says so, while the pure CUDA ops stay available."""
    monkeypatch.delenv("SAEENGINE_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_triton_import_problem", lambda: "triton is not installed (test)")
    monkeypatch.setattr(backends, "load_extension", lambda: (True, ""))
    cuda = torch.device("cuda")
    assert backends.unavailable_reason("cuda", "topk_select", cuda) == ""
    assert "triton is not installed" in backends.unavailable_reason("cuda", "topk_encode", cuda)
    assert resolve_backend("auto", "topk_encode", cuda) == "torch"


def test_auto_passes_over_kernels_awaiting_gpu_validation(monkeypatch):
    """A CUDA kernel whose GPU tests have not run yet is used only when named."""
    monkeypatch.delenv("SAEENGINE_BACKEND", raising=False)
    monkeypatch.setattr(backends, "load_extension", lambda: (True, ""))
    cuda = torch.device("cuda")
    assert ("mark_fired", "cuda") in backends.AWAITING_GPU_VALIDATION
    assert resolve_backend("auto", "mark_fired", cuda) == "torch"
    assert resolve_backend("cuda", "mark_fired", cuda) == "cuda"
    monkeypatch.setenv("SAEENGINE_BACKEND", "cuda")  # an override names it too
    assert resolve_backend("auto", "mark_fired", cuda) == "cuda"
    monkeypatch.delenv("SAEENGINE_BACKEND")
    monkeypatch.setattr(backends, "AWAITING_GPU_VALIDATION", frozenset())
    assert resolve_backend("auto", "mark_fired", cuda) == "cuda"


def test_auto_falls_back_and_logs_once(monkeypatch, caplog):
    """On a CUDA device with neither triton nor the extension, auto ends at torch."""
    monkeypatch.delenv("SAEENGINE_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_triton_import_problem", lambda: "triton is not installed (test)")
    monkeypatch.setattr(backends, "load_extension", lambda: (False, "extension missing (test)"))
    backends._log_fallback_once.cache_clear()
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="saeengine"):
        assert resolve_backend("auto", "sparse_decode", cuda) == "torch"
        assert resolve_backend("auto", "sparse_decode", cuda) == "torch"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("triton backend unavailable" in m for m in messages) == 1
    assert sum("cuda backend unavailable" in m for m in messages) == 1


def test_functional_ops_honour_backend_argument(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, W, b = torch.randn(3, 8), torch.randn(16, 8), torch.zeros(16)
    with pytest.raises(BackendUnavailableError):
        ops.topk_encode(x, W, b, 2, backend="triton")
    assert ops.topk_encode(x, W, b, 2, backend="torch").values.shape == (3, 2)
