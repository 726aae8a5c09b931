"""Shared fixtures. Without a GPU, Triton kernels run under the interpreter
(TRITON_INTERPRET must be set before any @triton.jit function is defined)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; the CPU counterpart runs the interpreter")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where Triton kernels run in this session: the GPU, else the interpreter on CPU."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill every torch.empty allocation with NaN (floats) or -7 (ints), so a kernel that
    leaves part of its output unwritten fails loudly."""
    original = torch.empty

    def poisoned(*args, **kwargs):
        t = original(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    yield


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
