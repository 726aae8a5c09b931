"""Every plan a public call can reach is exercised: on CPU (the Triton kernels under the
interpreter) when all its parts run there, else on a GPU. The plans come from
saeengine.ops.plans, which enumerates the requests, call shapes and (simulated)
environments; each is run here against an fp64 oracle, gradients included."""

import pytest
import torch

from saeengine import BackendUnavailableError, ops
from saeengine.ops.plans import (ENVIRONMENTS, MetaTensor, simulated, sparse_decode_plans, topk_encode_plans,
                                 topk_select_plans)
from saeengine.ops.sparse_decode import SparseDecodePlan
from saeengine.ops.topk_encode.plan import plan_topk_encode
from saeengine.ops.topk_select import select_implementation

from conftest import HAS_CUDA, assert_valid_topk, pre_activations64, requires_gpu

ENCODE_PLANS, ENCODE_REFUSED = topk_encode_plans()
DECODE_PLANS, DECODE_REFUSED = sparse_decode_plans()
SELECT_PLANS, _ = topk_select_plans()


def _needs_gpu(plan) -> bool:
    if isinstance(plan, SparseDecodePlan):
        return plan.implementation == "cuda"
    return "radix" in (plan.main_select, plan.auxk_select)


def _validates(plan) -> list[str]:
    """The implementation keys a GPU run of ``plan`` validates."""
    if isinstance(plan, SparseDecodePlan):
        return [] if plan.implementation in ("reference", "cpu") else [f"sparse_decode/{plan.implementation}"]
    parts = {f"topk_encode/{name}" for name in (plan.main, plan.auxk) if name in ("fused", "chunked")}
    return sorted(parts | {f"topk_select/{s}" for s in (plan.main_select, plan.auxk_select) if s == "radix"})


def _on_cpu_only(plan) -> bool:
    """A plan of the "cpu" implementations: it runs on CPU tensors, GPU or not."""
    return (plan.implementation if isinstance(plan, SparseDecodePlan) else plan.main) == "cpu"


def _params(plans):
    """One test per plan: on the GPU when there is one (every plan but the "cpu" ones),
    else on CPU under the interpreter (the plans whose parts all run there; the others
    skip with a reason)."""
    params = []
    for plan in sorted(plans, key=str):
        marks = [pytest.mark.validates(*keys)] if (keys := _validates(plan)) else []
        if _needs_gpu(plan):
            marks.append(requires_gpu)
        device = torch.device("cuda" if HAS_CUDA and not _on_cpu_only(plan) else "cpu")
        params.append(pytest.param(plan, device, marks=marks, id=str(plan)))
    return params


ENCODE_GPU = [p for p in ENCODE_PLANS if _needs_gpu(p)]
DECODE_GPU = [p for p in DECODE_PLANS if _needs_gpu(p)]


def test_the_plan_space_reaches_every_implementation_and_refuses_what_cannot_run():
    mains = {p.main for p in ENCODE_PLANS}
    auxks = {p.auxk for p in ENCODE_PLANS}
    assert mains == {"reference", "cpu", "fused", "chunked"}
    assert auxks == {None, "reference", "cpu", "fused", "chunked", "dense"}
    assert {p.weight_read for p in ENCODE_PLANS} == {"as-is", "copy", "master"}
    assert {p.implementation for p in DECODE_PLANS} == {"reference", "cpu", "triton", "cuda"}
    # the cpu implementations reach no GPU environment and never read master weights
    assert {p.weight_read for p in ENCODE_PLANS if p.main == "cpu"} <= {"as-is", "copy"}
    assert SELECT_PLANS == {"reference", "radix"}
    # the cuda decoder never carries a sparse gradient: no plan pairs them
    assert not any(p.implementation == "cuda" and p.sparse_grad for p in DECODE_PLANS)
    assert ENCODE_REFUSED > 0 and DECODE_REFUSED > 0
    print(f"\ntopk_encode: {len(ENCODE_PLANS)} plans ({len(ENCODE_GPU)} need a GPU); "
          f"sparse_decode: {len(DECODE_PLANS)} ({len(DECODE_GPU)}); topk_select: {len(SELECT_PLANS)}")


def test_named_implementations_that_cannot_honour_a_flag_raise():
    with simulated(ENVIRONMENTS[2]) as gpu:  # a GPU with everything built and validated
        weight = MetaTensor(torch.float32, gpu)
        with pytest.raises(BackendUnavailableError, match="does not honour sparse_grad"):
            ops.plan_sparse_decode("cuda", weight, torch.float32, needs_grad=True, sparse_grad=True)
        assert ops.plan_sparse_decode("auto", weight, torch.float32, needs_grad=True,
                                      sparse_grad=True).implementation == "triton"
        with pytest.raises(BackendUnavailableError, match="selects at most k=1024"):
            select_implementation("radix", MetaTensor(torch.float32, gpu), 1500)
        assert select_implementation("auto", MetaTensor(torch.float32, gpu), 1500) == "reference"
    with pytest.raises(BackendUnavailableError, match="has no triton implementation"):
        ops.topk_select(torch.randn(2, 20), 3, backend="triton")


def test_auto_plan_on_cpu_is_the_cpu_implementation_and_prints_every_part():
    plan = plan_topk_encode("auto", "cpu", dtype=torch.float32, k=4, k_aux=3, n_subset=10, needs_grad=True)
    assert (plan.main, plan.auxk, plan.backward) == ("cpu", "cpu", "segment-sum")
    assert str(plan) == ("topk_encode(main=cpu, auxk=cpu, backward=segment-sum, weights=as-is, "
                         "sparse_grad=False)")
    # an SAE (which decodes too) runs a narrow subset's AuxK code densely, as on a GPU
    assert plan_topk_encode("auto", "cpu", dtype=torch.float32, k=4, k_aux=3, n_subset=10, needs_grad=True,
                            allow_dense_auxk=True).auxk == "dense"
    torch_plan = plan_topk_encode("torch", "cpu", dtype=torch.float32, k=4, k_aux=3, n_subset=10, needs_grad=True)
    assert (torch_plan.main, torch_plan.backward) == ("reference", "autograd")  # the oracle, by its family


def _encode_inputs(plan, device):
    gen = torch.Generator().manual_seed(len(str(plan)))
    n, d, f = 5, 8, 40
    dtype = torch.float32 if plan.weight_read == "as-is" else torch.bfloat16
    x = torch.randn(n, d, generator=gen).to(device, dtype)
    W = (torch.randn(f, d, generator=gen) / d**0.5).to(device)
    b = (0.2 * torch.randn(f, generator=gen)).to(device)
    W_dec = torch.nn.functional.normalize(torch.randn(f, d, generator=gen), dim=1).to(device)
    dead = torch.arange(1, f, 3, device=device)
    return x, W, b, W_dec, dead


def _oracle_values(x, W, b, indices):
    """relu(x . W[i] + b[i]) at the chosen indices, in fp64: the values and (through
    autograd) the gradients every plan must give."""
    return torch.relu(torch.einsum("nd,nkd->nk", x.double(), W.double()[indices]) + b.double()[indices])


def _run_encode_plan(plan, device):
    x, W, b, W_dec, dead = _encode_inputs(plan, device)
    k, k_aux = 3, (4 if plan.auxk else 0)
    grad = plan.backward is not None
    leaves = [t.clone().requires_grad_(grad) for t in (x, W, b)]
    xl, Wl, bl = leaves
    code = ops.topk_encode(xl, Wl, bl, k,
                           dead_latents=dead if k_aux else None, k_aux=k_aux, plan=plan, check=False)
    codes = [code]
    if plan.auxk == "dense":
        assert code.aux is None  # the caller's part
        aux, _ = ops.auxk_dense(xl, Wl, bl, W_dec, dead, k_aux, select=plan.auxk_select)
        codes.append(aux)
    elif plan.auxk:
        codes.append(code.aux)
    tol = 1e-4 if x.dtype == torch.float32 else 6e-2
    pre = pre_activations64(x.float(), W.to(x.dtype).float(), b.to(x.dtype).float())
    assert_valid_topk(code.values, code.indices, pre, k, tol)
    if plan.auxk:
        aux = codes[1]
        assert bool(torch.isin(aux.indices, dead).all())
        assert_valid_topk(aux.values, torch.searchsorted(dead, aux.indices), pre[:, dead], k_aux, tol)
    if not grad:
        return
    weights = [torch.linspace(0.5, 1.5, c.values.numel(), device=device).reshape(c.values.shape) for c in codes]
    sum(((c.values.float() * w).sum() for c, w in zip(codes, weights))).backward()
    oracle = [t.detach().double().requires_grad_() for t in (x, W, b)]
    sum(((_oracle_values(*oracle, c.indices) * w.double()).sum() for c, w in zip(codes, weights))).backward()
    assert Wl.grad.is_sparse == plan.sparse_grad or (plan.auxk == "dense" and Wl.grad.is_sparse)
    for mine, ref in zip(leaves, oracle):
        got = mine.grad.to_dense() if mine.grad.is_sparse else mine.grad
        torch.testing.assert_close(got.double().cpu(), ref.grad.cpu(), atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("plan,device", _params(ENCODE_PLANS))
def test_topk_encode_plan(plan, device):
    _run_encode_plan(plan, device)


def _run_decode_plan(plan, device):
    gen = torch.Generator().manual_seed(len(str(plan)))
    n, k, d, f = 6, 3, 8, 30
    dtype = torch.float32 if plan.weight_read == "as-is" else torch.bfloat16
    values = torch.rand(n, k, generator=gen).to(device, dtype)
    indices = torch.stack([torch.randperm(f, generator=gen)[:k] for _ in range(n)]).to(device)
    W = torch.randn(f, d, generator=gen).to(device, torch.float32 if dtype == torch.bfloat16 else dtype)
    b = torch.randn(d, generator=gen).to(device, W.dtype)
    Wl, vl = W.clone().requires_grad_(True), values.clone().requires_grad_(True)
    out = ops.sparse_decode(vl, indices, Wl, b, plan=plan)
    ref = torch.einsum("nk,nkd->nd", values.double(), W.double()[indices]) + b.double()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=tol * 10, rtol=tol * 10)
    out.float().pow(2).sum().backward()
    assert Wl.grad.is_sparse == plan.sparse_grad
    W64 = W.detach().double().requires_grad_()
    (torch.einsum("nk,nkd->nd", values.double(), W64[indices]) + b.double()).pow(2).sum().backward()
    torch.testing.assert_close(Wl.grad.to_dense().double().cpu() if plan.sparse_grad else Wl.grad.double().cpu(),
                               W64.grad.cpu(), atol=tol * 100, rtol=tol * 100)


@pytest.mark.parametrize("plan,device", _params(DECODE_PLANS))
def test_sparse_decode_plan(plan, device):
    _run_decode_plan(plan, device)


@pytest.mark.skipif(not HAS_CUDA, reason="the radix select needs a CUDA GPU; its CPU counterpart is the reference")
@pytest.mark.validates("topk_select/radix")
def test_radix_select_matches_the_reference_on_gpu():
    x = torch.randn(33, 517, device="cuda")
    values, indices = ops.topk_select(x, 17, backend="radix")
    ref_values, _ = ops.topk_select(x, 17, backend="reference")
    assert torch.equal(values, ref_values)
    assert torch.equal(x.gather(1, indices), values)
