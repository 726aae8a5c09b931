"""Shared fixtures. Without a GPU, Triton kernels run under the interpreter
(TRITON_INTERPRET must be set before any @triton.jit function is defined)."""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs one pytest-xdist worker per core; torch's default of one thread per core
# in every worker would oversubscribe them, so each worker gets its share.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))

import pytest  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor  # noqa: E402

# @pytest.mark.validates("op/name") and the GPU validation record (SAEENGINE_RECORD_VALIDATION).
pytest_plugins = ["validation_plugin"]

HAS_CUDA = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; the CPU counterpart runs the interpreter")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where Triton kernels run in this session: the GPU, else the interpreter on CPU."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


POISON_CANARY = 64  # elements past the end of each fresh allocation, checked after the test


def _poison_value(dtype):
    return float("nan") if dtype.is_floating_point else -7


def _canary_value(dtype):
    return 1234.5 if dtype.is_floating_point else -99


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every test: fill each fresh allocation from torch.empty, torch.empty_like and
    Tensor.new_empty with NaN (floats) or -7 (ints), so a kernel that leaves part of its
    output unwritten fails loudly; and give plain torch.empty allocations a canary of
    POISON_CANARY elements past their end, checked after the test, so a kernel that
    writes out of bounds fails too."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    canaries = _Canaries()

    def poison(t):
        if t.dtype != torch.bool and not t.is_complex() and t.layout == torch.strided:
            with torch.no_grad():
                t.fill_(_poison_value(t.dtype))
        return t

    def with_canary(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        plain = (all(isinstance(s, int) for s in shape) and kwargs.get("out") is None
                 and not kwargs.get("requires_grad") and kwargs.get("layout", torch.strided) == torch.strided
                 and kwargs.get("memory_format", torch.contiguous_format) == torch.contiguous_format)
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        if not plain or dtype == torch.bool or dtype.is_complex:
            return poison(empty(*size, **kwargs))
        numel = 1
        for s in shape:
            numel *= s
        kwargs.pop("memory_format", None)
        buffer = empty(numel + POISON_CANARY, **kwargs)
        if buffer.is_meta or isinstance(buffer, FakeTensor):  # shapes only (fake kernels, meta init)
            return empty(*size, **kwargs)
        poison(buffer)
        with torch.no_grad():
            buffer[numel:] = _canary_value(dtype)
        canaries.append((buffer, numel))
        return buffer[:numel].view(shape)

    monkeypatch.setattr(torch, "empty", with_canary)
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(new_empty(self, *a, **k)))
    yield canaries
    monkeypatch.undo()
    canaries.check()


class _Canaries(list):
    """(buffer, numel) of each canaried allocation of a test."""

    def check(self) -> None:
        for buffer, numel in self:
            tail = buffer[numel:]
            assert bool((tail == _canary_value(tail.dtype)).all()), \
                f"something wrote past the end of a fresh [{numel}] {tail.dtype} allocation"


def pre_activations64(x, W_enc, b_enc, b_pre=None):
    """relu((x - b_pre) W_enc^T + b_enc) in float64: the formula every encoder must meet."""
    x64 = x.double() - (b_pre.double() if b_pre is not None else 0.0)
    return torch.relu(x64 @ W_enc.double().T + b_enc.double())


def assert_valid_topk(values, indices, pre64, k, tol):
    """values/indices [N, k] are a correct top-k of pre64 [N, F] up to ``tol``:
    indices distinct per row; each value equals pre64 at its index; rows sorted
    descending; and nothing left out beats the chosen k-th value by more than tol
    (so an index may differ from another top-k only where values tie within tol)."""
    n, f = pre64.shape
    assert values.shape == indices.shape == (n, k)
    assert indices.dtype == torch.int64
    assert torch.isfinite(values.float()).all(), "non-finite values (unwritten output?)"
    assert int(indices.min()) >= 0 and int(indices.max()) < f, "indices out of range"
    assert (indices.sort(1).values.diff(dim=1) != 0).all(), "repeated latent in a row"
    values, indices, pre64 = values.double().cpu(), indices.cpu(), pre64.cpu()
    at_chosen = pre64.gather(1, indices)
    torch.testing.assert_close(values, at_chosen, atol=tol, rtol=tol)
    assert (values.diff(dim=1) <= tol).all(), "values not sorted descending"
    true_kth = pre64.topk(k, dim=1).values[:, -1]
    assert (at_chosen[:, -1] >= true_kth - tol).all(), "a larger activation was left out"


def grads_through(run, *inputs):
    """Autograd through ``run``: the inputs are cloned as leaves, ``run(*leaves)`` returns
    (outputs, loss), and the loss is backpropagated. Returns (outputs, the leaves'
    gradients, sparse ones made dense)."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    outputs, loss = run(*leaves)
    loss.backward()
    return outputs, [t.grad.to_dense() if t.grad.is_sparse else t.grad for t in leaves]


def sae_grads(sae, x, dead, backend, sparse_grad=False):
    """One forward + backward of ``sae`` (AuxK over ``dead``): (output, {name: gradient}),
    sparse gradients made dense. Without sparse_grad every gradient must be dense."""
    sae.zero_grad(set_to_none=True)
    out = sae(x, dead_mask=dead, backend=backend, sparse_grad=sparse_grad)
    out.loss.backward()
    if not sparse_grad:  # dense optimizers need dense gradients, whatever the AuxK path adds
        assert not any(p.grad.is_sparse for p in sae.parameters())
    return out, {name: p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad.clone()
                 for name, p in sae.named_parameters()}


def assert_same_saved_sae(sae, loaded):
    """``loaded`` (an SAE read back) has ``sae``'s config and every tensor of its state
    bit for bit (NaN == NaN here: a fresh batchtopk threshold is NaN)."""
    assert loaded.cfg == sae.cfg
    a, b = sae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on n CPU threads inside the block, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """Run the test on one torch thread (bitwise comparisons with single-threaded children)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_torch_thread_module():
    """A whole test module on one torch thread (small shapes: threads only add overhead; use
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread_module")``)."""
    with torch_threads(1):
        yield
