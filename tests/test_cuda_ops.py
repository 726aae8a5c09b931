"""The csrc/ extension: it is built and registered; CPU tensors get a clear error;
on a GPU the op matches the reference and passes torch.library.opcheck."""

import pytest
import torch

import saeengine
from saeengine import ops
from saeengine._native import load_extension

from conftest import requires_gpu

built, why = load_extension()
requires_extension = pytest.mark.skipif(not built, reason=f"saeengine._C not built: {why}")


@requires_extension
def test_op_is_registered_with_schema():
    op = torch.ops.saeengine.sparse_decode.default
    assert "Tensor? bias" in str(op._schema)


@requires_extension
def test_cuda_op_on_cpu_tensors_raises_clear_error():
    v, i, w = torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.long), torch.rand(5, 4)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors.*backend=\"torch\""):
        torch.ops.saeengine.sparse_decode(v, i, w, None)
    with pytest.raises(saeengine.BackendUnavailableError, match="needs CUDA tensors"):
        ops.sparse_decode(v, i, w, backend="cuda")


@requires_extension
def test_fake_kernel_gives_output_shape():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        v = torch.empty(6, 3)
        i = torch.empty(6, 3, dtype=torch.long)
        w = torch.empty(10, 7)
        out = torch.ops.saeengine.sparse_decode(v, i, w, None)
    assert tuple(out.shape) == (6, 7)


@requires_gpu
@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,d,f", [(1, 1, 72, 100), (4096, 32, 1024, 2**16), (37, 5, 70, 333)])
@pytest.mark.validates("sparse_decode/cuda")
def test_cuda_sparse_decode_matches_reference(dtype, n, k, d, f):
    values = torch.rand(n, k, device="cuda").to(dtype)
    indices = torch.randint(0, f, (n, k), device="cuda")
    W = torch.randn(f, d, device="cuda").to(dtype)
    b = torch.randn(d, device="cuda").to(dtype)
    out = ops.sparse_decode(values, indices, W, b, backend="cuda")
    ref = ops.sparse_decode_ref(values.double(), indices, W.double(), b.double())
    low = ops.sparse_decode_ref(values, indices, W, b)  # torch in the same dtype
    base_err = (low.double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * base_err + 1e-6


@requires_gpu
@requires_extension
@pytest.mark.validates("sparse_decode/cuda")
def test_cuda_sparse_decode_opcheck():
    values = torch.rand(8, 4, device="cuda", requires_grad=True)
    indices = torch.randint(0, 20, (8, 4), device="cuda")
    W = torch.randn(20, 16, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.saeengine.sparse_decode.default, (values, indices, W, b))


# ----- every op: CPU errors and fake kernels (run in CI) --------------------------------
CPU_CALLS = {
    "sparse_decode_backward": lambda: (torch.rand(3, 4), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.long),
                                       torch.rand(5, 4), *ops.build_latent_index(torch.zeros(3, 2, dtype=torch.long))),
    "topk_select": lambda: (torch.rand(3, 5), 2),
    "row_sparse_adam_": lambda: (torch.rand(5, 4), torch.rand(5, 4), torch.zeros(5, 4), torch.zeros(5, 4),
                                 torch.tensor([1, 3]), 1e-3, 0.9, 0.999, 1e-8, 1, True, False),
    "mark_fired_": lambda: (torch.zeros(5, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2), 7),
    "resample_dead_": lambda: (torch.rand(5, 4), torch.rand(5), torch.rand(5, 4), torch.zeros(5, dtype=torch.bool),
                               torch.rand(3, 4), torch.rand(3).double(), torch.ones(1), 0,
                               None, None, None, None, None, None),
}


@requires_extension
@pytest.mark.parametrize("name", sorted(CPU_CALLS))
def test_every_op_on_cpu_tensors_names_the_fix(name):
    with pytest.raises(RuntimeError, match=rf"saeengine::{name} \(cuda backend\) needs CUDA tensors.*backend=\"torch\""):
        getattr(torch.ops.saeengine, name)(*CPU_CALLS[name]())


@requires_extension
def test_fake_kernels_of_the_new_ops():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        values, indices = torch.empty(6, 3, dtype=torch.bfloat16), torch.empty(6, 3, dtype=torch.long)
        W, g = torch.empty(10, 7, dtype=torch.bfloat16), torch.empty(6, 7, dtype=torch.bfloat16)
        index = [torch.empty(18, dtype=torch.long)] * 2 + [torch.empty(19, dtype=torch.long), torch.empty(1, dtype=torch.long)]
        gv, gw = torch.ops.saeengine.sparse_decode_backward(g, values, indices, W, *index)
        v, i = torch.ops.saeengine.topk_select(torch.empty(6, 40, dtype=torch.float16), 5)
    assert (tuple(gv.shape), gv.dtype, tuple(gw.shape), gw.dtype) == ((6, 3), torch.bfloat16, (10, 7), torch.float32)
    assert (tuple(v.shape), v.dtype, i.dtype) == ((6, 5), torch.float16, torch.int64)


def test_cuda_backend_on_cpu_is_refused_with_reason():
    with pytest.raises(saeengine.BackendUnavailableError, match="topk_select"):
        ops.topk_select(torch.rand(3, 5), 2, backend="cuda")
    with pytest.raises(ValueError, match=r"k=6 must lie in \[1, F=5\]"):
        ops.topk_select(torch.rand(3, 5), 6)


# ----- GPU: each kernel against its reference -------------------------------------------
@requires_gpu
@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,d,f", [(1, 1, 72, 100), (4096, 32, 1024, 2**16), (37, 5, 70, 333)])
@pytest.mark.validates("sparse_decode/cuda")
def test_cuda_sparse_decode_backward_matches_reference_and_repeats(dtype, n, k, d, f):
    values = torch.rand(n, k, device="cuda").to(dtype)
    indices = torch.randint(0, f, (n, k), device="cuda")
    W = torch.randn(f, d, device="cuda").to(dtype)
    grad_out = torch.randn(n, d, device="cuda").to(dtype)
    index = ops.build_latent_index(indices)
    gv, gw = torch.ops.saeengine.sparse_decode_backward(grad_out, values, indices, W, *index)
    ref_v, ref_w = ops.sparse_decode_backward_ref(grad_out.double(), values.double(), indices, W.double())
    low_v, low_w = ops.sparse_decode_backward_ref(grad_out, values, indices, W)
    for ours, ref, low in ((gv, ref_v, low_v), (gw, ref_w, low_w)):
        base = (low.double() - ref).abs().max().item()
        assert (ours.double() - ref).abs().max().item() <= 2 * base + 1e-5
    gv2, gw2 = torch.ops.saeengine.sparse_decode_backward(grad_out, values, indices, W, *index)
    assert torch.equal(gv, gv2) and torch.equal(gw, gw2)


@requires_gpu
@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,f,k", [(1, 1, 1), (7, 333, 333), (64, 5000, 32), (5, 5001, 300), (4096, 2**18, 32),
                                   (3, 70_000, 1024)])
@pytest.mark.validates("topk_select/radix")
def test_cuda_topk_select_matches_torch(dtype, n, f, k):
    x = torch.randn(n, f, device="cuda").to(dtype)
    values, indices = ops.topk_select(x, k, backend="cuda")
    ref_values, _ = torch.topk(x, k, dim=1)
    assert torch.equal(values, ref_values)
    assert torch.equal(torch.gather(x, 1, indices), values)
    assert (indices.sort(1).values.diff(dim=1) > 0).all()  # distinct columns
    again = ops.topk_select(x, k, backend="cuda")
    assert torch.equal(again[0], values) and torch.equal(again[1], indices)


@requires_gpu
@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [32, 700])
@pytest.mark.validates("topk_select/radix")
def test_cuda_topk_select_heavy_ties_pick_the_lower_columns(dtype, k):
    """Integer data: hundreds of ties at the k-th place, so both the threshold fast path and
    the radix fallback run; the answer must be the stable descending order's first k."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randint(0, 60, (9, 10_001), device="cuda", generator=gen).to(dtype)
    x[3, :2500] = 59  # a row whose ties alone overflow the shared-memory capacity
    values, indices = ops.topk_select(x, k, backend="cuda")
    expected = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(indices, expected)
    assert torch.equal(values, torch.gather(x, 1, expected))


@requires_gpu
@requires_extension
@pytest.mark.validates("topk_select/radix")
def test_cuda_topk_select_ties_nan_and_many_equal_values():
    x = torch.zeros(3, 10_000, device="cuda")
    x[1, 17] = float("nan")
    x[2, 5000:] = 1.0  # 5000 exact ties at the k-th place, beyond the shared-memory capacity
    values, indices = ops.topk_select(x, 5, backend="cuda")
    assert indices[0].tolist() == [0, 1, 2, 3, 4]  # ties go to the lower columns
    assert indices[1].tolist() == [17, 0, 1, 2, 3] and torch.isnan(values[1, 0])
    assert indices[2].tolist() == [5000, 5001, 5002, 5003, 5004]


@requires_gpu
@requires_extension
@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.validates("row_sparse_adam/cuda")
def test_cuda_row_sparse_adam_matches_reference(moment_dtype):
    from saeengine import SAE, SAEConfig
    from saeengine.optim import RowSparseAdam

    saes = [SAE(SAEConfig(d_in=72, d_sae=3000, k=4), device="cuda", seed=0) for _ in range(2)]
    opts = [RowSparseAdam(s, lr=1e-2, moment_dtype=moment_dtype, backend=b) for s, b in zip(saes, ("cuda", "torch"))]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(3):
        rows = torch.randperm(3000, device="cuda", generator=gen)[:500]
        for p, q in zip(*(s.parameters() for s in saes)):
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            q.grad = p.grad.clone()
        before = saes[0].W_enc.detach().clone()
        for opt in opts:
            opt.step(rows)
        untouched = torch.ones(3000, dtype=torch.bool, device="cuda")
        untouched[rows] = False
        assert torch.equal(saes[0].W_enc[untouched], before[untouched])
    for (name, p), q in zip(saes[0].named_parameters(), saes[1].parameters()):
        tol = 1e-5 if moment_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)


@requires_gpu
@requires_extension
@pytest.mark.validates("resample_dead/cuda", "mark_fired/cuda")
def test_cuda_resample_and_mark_fired_match_reference():
    from saeengine import SAE, SAEConfig
    from saeengine.optim import RowSparseAdam, mark_fired_, resample_dead_latents_

    saes = [SAE(SAEConfig(d_in=70, d_sae=5000, k=4), device="cuda", seed=0) for _ in range(2)]
    opts = [RowSparseAdam(s, lr=1e-2, backend="torch") for s in saes]
    for opt in opts:
        for state in opt.state.values():
            state["m"].fill_(1.0)
            state["v"].fill_(1.0)
    dead = torch.rand(5000, device="cuda") < 0.1
    x, losses = torch.randn(512, 70, device="cuda"), torch.rand(512, device="cuda")
    before = saes[0].W_dec.detach().clone()
    for sae, opt, backend in zip(saes, opts, ("cuda", "torch")):
        assert int(resample_dead_latents_(sae, opt, dead, x, losses, seed=11, backend=backend)) == int(dead.sum())
    torch.testing.assert_close(saes[0].W_dec, saes[1].W_dec, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(saes[0].W_enc, saes[1].W_enc, rtol=1e-6, atol=1e-6)
    assert torch.equal(saes[0].W_dec[~dead], before[~dead]) and not saes[0].b_enc[dead].any()
    assert not opts[0].state["W_dec"]["m"][dead].any() and opts[0].state["W_dec"]["m"][~dead].all()
    fired = [torch.zeros(5000, dtype=torch.long, device="cuda") for _ in range(2)]
    indices = torch.randint(0, 5000, (256, 8), device="cuda")
    values = torch.randn(256, 8, device="cuda")
    for counter, backend in zip(fired, ("cuda", "torch")):
        mark_fired_(counter, indices, values, 4096, backend=backend)
    assert torch.equal(fired[0], fired[1]) and fired[0].max() == 4096


@requires_gpu
@requires_extension
@pytest.mark.validates("sparse_decode/cuda", "topk_select/radix", "row_sparse_adam/cuda", "mark_fired/cuda",
                        "resample_dead/cuda")
def test_cuda_ops_pass_opcheck():
    values = torch.rand(8, 4, device="cuda")
    indices = torch.randint(0, 20, (8, 4), device="cuda")
    W, g = torch.randn(20, 16, device="cuda"), torch.randn(8, 16, device="cuda")
    index = ops.build_latent_index(indices)
    torch.library.opcheck(torch.ops.saeengine.sparse_decode_backward.default, (g, values, indices, W, *index))
    torch.library.opcheck(torch.ops.saeengine.topk_select.default, (torch.randn(8, 300, device="cuda"), 7))
    p, grad = torch.randn(20, 16, device="cuda"), torch.randn(20, 16, device="cuda")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    rows = torch.tensor([1, 4, 9], device="cuda")
    torch.library.opcheck(torch.ops.saeengine.row_sparse_adam_.default,
                          (p, grad, m, v, rows, 1e-3, 0.9, 0.999, 1e-8, 1, True, True))
    torch.library.opcheck(torch.ops.saeengine.mark_fired_.default,
                          (torch.zeros(20, dtype=torch.long, device="cuda"), indices, values, 5))
    x = torch.randn(6, 16, device="cuda")
    torch.library.opcheck(torch.ops.saeengine.resample_dead_.default,
                          (p, torch.randn(20, device="cuda"), torch.randn(20, 16, device="cuda"),
                           torch.rand(20, device="cuda") < 0.3, x, torch.arange(1, 7, device="cuda").double(),
                           torch.ones(1, device="cuda"), 3, m, v, None, None, None, None))


@requires_gpu
@requires_extension
@pytest.mark.validates("topk_select/radix")
def test_relu_sae_codes_use_cuda_select_and_keep_gradients():
    from saeengine import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=64, d_sae=4096, architecture="relu"), device="cuda", seed=0)
    x = torch.randn(128, 64, device="cuda")
    out_cuda = sae(x, backend="cuda")
    out_torch = sae(x, backend="torch")
    assert torch.equal(out_cuda.code.values, out_torch.code.values)
    out_cuda.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
