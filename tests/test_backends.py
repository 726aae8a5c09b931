"""The implementation registry: names and families, explicit choices that cannot run raise,
the environment override, auto falls back past what is missing or unvalidated and logs once."""

import logging

import pytest
import torch

import saeengine.backends as backends
import saeengine.validation as validation
from saeengine import BackendUnavailableError, ops
from saeengine.backends import choose, resolve_backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing here allocates on it


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device where triton imports and the extension loads (simulated)."""
    monkeypatch.delenv("SAEENGINE_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_triton_import_problem", lambda: "")
    monkeypatch.setattr(backends, "load_extension", lambda: (True, ""))
    backends._log_once.cache_clear()
    return monkeypatch


def test_auto_on_cpu_is_the_cpu_implementation_else_the_reference(monkeypatch):
    monkeypatch.delenv("SAEENGINE_BACKEND", raising=False)
    for op in backends.IMPLEMENTATIONS:
        expected = "cpu" if op in ("topk_encode", "sparse_decode") else "reference"
        assert resolve_backend("auto", op, CPU) == expected
        assert resolve_backend("torch", op, CPU) == "reference"  # the family names the oracle
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is for tests: auto stays on torch
    assert resolve_backend("auto", "topk_encode", CPU) == "cpu"


def test_the_cpu_implementations_run_on_cpu_tensors_only(fake_gpu):
    fake_gpu.setattr(validation, "cached_validation_problem", lambda impl: "")
    with pytest.raises(BackendUnavailableError, match="runs on CPU tensors"):
        resolve_backend("cpu", "topk_encode", CUDA)
    assert resolve_backend("auto", "topk_encode", CUDA) == "fused"
    fake_gpu.setattr(backends, "_triton_import_problem", lambda: "triton is not installed (test)")
    assert resolve_backend("auto", "sparse_decode", CUDA, flags=("sparse_grad",)) == "reference"


def test_families_name_each_ops_implementation_in_that_language(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("torch", "topk_encode", CPU) == "reference"
    assert resolve_backend("triton", "topk_encode", CPU) == "fused"
    assert resolve_backend("cuda", "topk_encode", CPU) == "chunked"  # cuBLAS chunks; its backward is Triton
    assert resolve_backend("triton", "sparse_decode", CPU) == "triton"


def test_explicit_unavailable_implementation_raises_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="triton kernels need CUDA tensors.*TRITON_INTERPRET"):
        resolve_backend("fused", "topk_encode", CPU)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors|saeengine._C is not built"):
        resolve_backend("cuda", "sparse_decode", CPU)
    with pytest.raises(BackendUnavailableError, match="triton kernels need CUDA tensors"):
        resolve_backend("chunked", "topk_encode", CPU)
    with pytest.raises(BackendUnavailableError, match="mark_fired has no triton implementation"):
        resolve_backend("triton", "mark_fired", CPU)
    with pytest.raises(ValueError, match="backend='fast' is not an implementation of topk_encode.*'fused'"):
        resolve_backend("fast", "topk_encode", CPU)
    with pytest.raises(ValueError, match="backend='radix' is not an implementation of topk_encode"):
        resolve_backend("radix", "topk_encode", CPU)  # a name of another op


def test_env_override_applies_to_auto_only_and_to_the_ops_that_have_the_name(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SAEENGINE_BACKEND", "fused")
    assert resolve_backend("auto", "topk_encode", CPU) == "fused"
    assert resolve_backend("auto", "sparse_decode", CPU) == "cpu"  # no "fused" decoder: automatic
    assert resolve_backend("torch", "topk_encode", CPU) == "reference"  # an explicit argument wins
    monkeypatch.setenv("SAEENGINE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError):  # an override is explicit: it raises
        resolve_backend("auto", "sparse_decode", CPU)
    monkeypatch.setenv("SAEENGINE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SAEENGINE_BACKEND='bogus'"):
        resolve_backend("auto", "sparse_decode", CPU)


def test_chunked_encoder_needs_triton_for_its_backward(fake_gpu):
    """Without triton the chunked encoder is unavailable and says so, while the pure CUDA
    ops stay available; auto then ends at the reference."""
    fake_gpu.setattr(backends, "_triton_import_problem", lambda: "triton is not installed (test)")
    fake_gpu.setattr(validation, "cached_validation_problem", lambda impl: "")
    assert resolve_backend("radix", "topk_select", CUDA) == "radix"
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        resolve_backend("chunked", "topk_encode", CUDA)
    assert resolve_backend("auto", "topk_encode", CUDA) == "reference"


def test_auto_passes_over_unvalidated_kernels_and_logs_once(fake_gpu, caplog):
    """An implementation whose current sources have not passed the GPU tests runs only
    when named; once validated, auto takes it."""
    fake_gpu.setattr(validation, "cached_validation_problem",
                     lambda impl: "its GPU tests have never passed on a GPU" if impl.needs_validation else "")
    with caplog.at_level(logging.INFO, logger="saeengine"):
        assert resolve_backend("auto", "mark_fired", CUDA) == "reference"
        assert resolve_backend("auto", "mark_fired", CUDA) == "reference"
    skipped = [r.getMessage() for r in caplog.records if "passes over 'cuda'" in r.getMessage()]
    assert len(skipped) == 1 and "never passed" in skipped[0]
    assert resolve_backend("cuda", "mark_fired", CUDA) == "cuda"
    fake_gpu.setenv("SAEENGINE_BACKEND", "cuda")  # an override names it too
    assert resolve_backend("auto", "mark_fired", CUDA) == "cuda"
    fake_gpu.delenv("SAEENGINE_BACKEND")
    fake_gpu.setattr(validation, "cached_validation_problem", lambda impl: "")
    assert resolve_backend("auto", "mark_fired", CUDA) == "cuda"
    assert resolve_backend("auto", "topk_encode", CUDA) == "fused"


def test_limits_and_flags_steer_auto_and_refuse_named(fake_gpu):
    fake_gpu.setattr(validation, "cached_validation_problem", lambda impl: "")
    assert choose("auto", "topk_select", CUDA, k=2000).name == "reference"  # past the radix kernel's k
    assert choose("auto", "topk_select", CUDA, k=8, dtype=torch.float64).name == "reference"
    assert choose("auto", "sparse_decode", CUDA, flags=("sparse_grad",)).name == "triton"
    fake_gpu.setattr(backends, "_triton_import_problem", lambda: "triton is not installed (test)")
    # without triton, the cuda decoder cannot give sparse gradients: auto ends at the reference
    assert choose("auto", "sparse_decode", CUDA, flags=("sparse_grad",)).name == "reference"
    assert choose("auto", "sparse_decode", CUDA).name == "cuda"
    with pytest.raises(BackendUnavailableError, match="does not honour sparse_grad"):
        choose("cuda", "sparse_decode", CUDA, flags=("sparse_grad",))


def test_auto_falls_back_when_nothing_is_built(fake_gpu, caplog):
    """On a CUDA device with neither triton nor the extension, auto ends at the reference."""
    fake_gpu.setattr(backends, "_triton_import_problem", lambda: "triton is not installed (test)")
    fake_gpu.setattr(backends, "load_extension", lambda: (False, "extension missing (test)"))
    with caplog.at_level(logging.INFO, logger="saeengine"):
        assert resolve_backend("auto", "sparse_decode", CUDA) == "reference"
        assert resolve_backend("auto", "sparse_decode", CUDA) == "reference"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("passes over 'triton' (triton is not installed" in m for m in messages) == 1
    assert sum("passes over 'cuda' (extension missing" in m for m in messages) == 1


def test_available_backends_lists_what_runs_here(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backends.available_backends("topk_encode", "cpu") == ["cpu", "reference"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.available_backends("topk_encode", "cpu") == ["fused", "chunked", "cpu", "reference"]


def test_functional_ops_honour_backend_argument(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, W, b = torch.randn(3, 8), torch.randn(16, 8), torch.zeros(16)
    with pytest.raises(BackendUnavailableError):
        ops.topk_encode(x, W, b, 2, backend="fused")
    assert ops.topk_encode(x, W, b, 2, backend="reference").values.shape == (3, 2)
