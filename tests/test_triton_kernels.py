"""Triton kernels against the torch reference: interpreter on CPU (small odd shapes),
real shapes on a GPU. Outputs are NaN-poisoned before each call; the sparse backward
must be bitwise repeatable."""

import pytest
import torch

from saeengine import SAE, SAEConfig, ops
from saeengine.kernels.latent_rowsum import latent_weighted_rowsum
from saeengine.kernels.sparse_decode import sparse_decode_forward, sparse_decode_grad_values
from saeengine.kernels.topk_encode import EncodeTiling, topk_encode_forward
from saeengine.ops.latent_index import build_latent_index, latent_weighted_rowsum_ref
from saeengine.ops.topk_encode import dense_auxk as dense_auxk_module

from conftest import assert_valid_topk, pre_activations64, requires_gpu, sae_grads

# The GPU validation of the Triton path (tests/validation_plugin.py).
TRITON_PATH = pytest.mark.validates("topk_encode/fused", "sparse_decode/triton")

# (N, d, F, k, splits): N=1, d=72, F not a power of two, k=1, k=F, several F-splits.
ENCODE_SHAPES = [
    (1, 72, 100, 1, None),
    (16, 72, 130, 8, 3),
    (5, 40, 64, 64, 2),
]


@pytest.mark.parametrize("n,d,f,k,splits", ENCODE_SHAPES)
@pytest.mark.validates("topk_encode/fused")
def test_topk_encode_kernel_is_exact_topk(kernel_device, poison_empty, n, d, f, k, splits):
    gen = torch.Generator().manual_seed(n * 1000 + f)
    x = torch.randn(n, d, generator=gen).to(kernel_device)
    W = torch.randn(f, d, generator=gen).to(kernel_device)
    b = (0.1 * torch.randn(f, generator=gen)).to(kernel_device)
    tiling = EncodeTiling(16, 32, 32, 4, 1) if kernel_device.type == "cpu" else EncodeTiling()
    values, indices = topk_encode_forward(x, W, b, k, splits=splits, tiling=tiling)
    assert_valid_topk(values.cpu(), indices.cpu(), pre_activations64(x.cpu(), W.cpu(), b.cpu()), k, tol=1e-4)


@pytest.mark.validates("topk_encode/fused")
def test_topk_encode_kernel_subset_and_ties(kernel_device, poison_empty):
    """Only latents of the subset are chosen; exact ties resolve to the lower latent."""
    n, d, f, k = 4, 24, 70, 6
    x = torch.randn(n, d).to(kernel_device)
    W = torch.randn(f, d)
    W[41] = W[40]  # identical rows: equal activations for latents 40 and 41
    W = W.to(kernel_device)
    b = torch.zeros(f, device=kernel_device)
    subset = torch.cat([torch.arange(0, f, 2), torch.tensor([41])]).sort().values
    tiling = EncodeTiling(16, 32, 32, 4, 1) if kernel_device.type == "cpu" else EncodeTiling()
    values, indices = topk_encode_forward(x, W, b, k, latent_subset=subset.to(kernel_device), splits=2,
                                          tiling=tiling)
    values, indices = values.cpu(), indices.cpu()
    assert bool(torch.isin(indices, subset).all())
    pre = pre_activations64(x.cpu(), W.cpu(), b.cpu())[:, subset]
    assert_valid_topk(values, torch.searchsorted(subset, indices), pre, k, tol=1e-4)
    for r in range(n):
        row = indices[r].tolist()
        if 41 in row:  # 41 may appear only together with 40 (ties prefer the lower latent)
            assert 40 in row


@pytest.mark.parametrize("n,k,d,f", [(1, 1, 72, 100), (9, 7, 72, 130), (4, 33, 40, 50)])
@pytest.mark.validates("sparse_decode/triton")
def test_sparse_decode_kernels_match_reference(kernel_device, poison_empty, n, k, d, f):
    values = torch.rand(n, k).to(kernel_device)
    indices = torch.randint(0, f, (n, k)).to(kernel_device)
    W = torch.randn(f, d).to(kernel_device)
    bias = torch.randn(d).to(kernel_device)
    out = sparse_decode_forward(values, indices, W, bias)
    torch.testing.assert_close(out.cpu(), ops.sparse_decode_ref(values, indices, W, bias).cpu(), atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(n, d).to(kernel_device)
    gv = sparse_decode_grad_values(grad_out, indices, W)
    gv_ref, _ = ops.sparse_decode_backward_ref(grad_out, values, indices, W)
    torch.testing.assert_close(gv.cpu(), gv_ref.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.validates("topk_encode/fused", "topk_encode/chunked", "sparse_decode/triton")
def test_latent_rowsum_kernel_matches_reference_and_is_bitwise_repeatable(kernel_device, poison_empty):
    n, k, d, f = 12, 5, 40, 23  # few latents: long segments with many repeats
    indices = torch.randint(0, f, (n, k)).to(kernel_device)
    coef, rows = torch.randn(n, k).to(kernel_device), torch.randn(n, d).to(kernel_device)
    index = build_latent_index(indices)
    out, sums = latent_weighted_rowsum(index, coef, rows, k, f, with_sums=True)
    out_ref, sums_ref = latent_weighted_rowsum_ref(indices, coef, rows, f)
    torch.testing.assert_close(out.cpu(), out_ref.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums.cpu(), sums_ref.cpu(), atol=1e-5, rtol=1e-5)
    out2, sums2 = latent_weighted_rowsum(build_latent_index(indices), coef, rows, k, f, with_sums=True)
    assert torch.equal(out, out2) and torch.equal(sums, sums2)
    # A second code (overlapping latents) adds into the first one's buffers in place.
    indices_b = torch.randint(0, f, (n, 3)).to(kernel_device)
    coef_b = torch.randn(n, 3).to(kernel_device)
    total, total_sums = latent_weighted_rowsum(build_latent_index(indices_b), coef_b, rows, 3, f, with_sums=True,
                                               out=out2, sums=sums2)
    assert total is out2 and total_sums is sums2
    out_b, sums_b = latent_weighted_rowsum_ref(indices_b, coef_b, rows, f)
    torch.testing.assert_close(total.cpu(), (out_ref + out_b).cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total_sums.cpu(), (sums_ref + sums_b).cpu(), atol=1e-5, rtol=1e-5)
    # Compact: one row per distinct latent, in the index's (ascending) order, same bits.
    n_unique = int(index.n_unique)
    rows_c, sums_c = latent_weighted_rowsum(index, coef, rows, k, f, with_sums=True, compact_rows=n_unique)
    latents = index.unique_latents[:n_unique]
    assert rows_c.shape == (n_unique, d) and bool((latents.diff() > 0).all())
    assert torch.equal(rows_c, out[latents]) and torch.equal(sums_c, sums[latents])
    # Sized by a bound the host knows: the kernel zeroes the rows past the distinct count
    # (the buffers start as NaN here), so the sum by latent is unchanged.
    few = torch.tensor([2, 7, 7, 19, 2]).to(kernel_device)[torch.randint(0, 5, (n, k))]
    few_index = build_latent_index(few)
    rows_p, sums_p = latent_weighted_rowsum(few_index, coef, rows, k, f, with_sums=True, compact_rows=f)
    assert rows_p.shape == (f, d) and int(few_index.n_unique) == 3
    full, full_sums = latent_weighted_rowsum_ref(few, coef, rows, f)
    assert torch.equal(rows_p[3:], torch.zeros_like(rows_p[3:])) and torch.equal(sums_p[3:], torch.zeros_like(sums_p[3:]))
    torch.testing.assert_close(rows_p[:3].cpu(), full[[2, 7, 19]].cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums_p[:3].cpu(), full_sums[[2, 7, 19]].cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense_auxk", [True, False], ids=["auxk_dense", "auxk_sparse"])
@pytest.mark.parametrize("f,k_aux,n_dead", [(130, 16, 13), (300, 130, 150)])
@pytest.mark.validates("topk_encode/fused", "sparse_decode/triton")
def test_sae_forward_backward_triton_matches_torch_and_repeats(kernel_device, monkeypatch, f, k_aux, n_dead,
                                                               dense_auxk):
    """Full TopK forward + AuxK + sparse backward through the Triton path, with the AuxK
    code through dense GEMMs over the dead latents or through the sparse kernels (k_aux=130
    there takes the dense selection of wide subset codes)."""
    if not dense_auxk:
        monkeypatch.setattr(dense_auxk_module, "DENSE_AUXK_MAX_SUBSET_PER_K", 0)
    torch.manual_seed(5)
    sae = SAE(SAEConfig(d_in=72, d_sae=f, k=8, k_aux=k_aux), device=kernel_device, seed=5)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    # The interpreter runs the wide case (k_aux > 128) on fewer rows: same code paths, a
    # third of the CPU time.
    n_rows = 6 if kernel_device.type == "cpu" and k_aux > 128 else 16
    x = torch.randn(n_rows, 72, device=kernel_device)
    dead = torch.zeros(f, dtype=torch.bool, device=kernel_device)
    dead[torch.randperm(f)[:n_dead]] = True
    ref_out, ref_grads = sae_grads(sae, x, dead, "torch")
    out, grads = sae_grads(sae, x, dead, "triton")
    assert torch.equal(out.code.indices, ref_out.code.indices)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.auxk_loss, ref_out.auxk_loss, rtol=1e-4, atol=1e-6)
    assert float(out.auxk_loss.detach()) > 0
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    _, grads_again = sae_grads(sae, x, dead, "triton")
    for name in grads:
        assert torch.equal(grads[name], grads_again[name]), f"{name} gradient is not bitwise repeatable"
    # Sparse weight gradients: the same bits, with no [F, d] buffer.
    sparse_out, sparse_grads = sae_grads(sae, x, dead, "triton", sparse_grad=True)
    # The rows of the chosen latents, nothing else (the dense AuxK path gives all dead rows).
    aux_rows = torch.nonzero(dead).squeeze(1) if dense_auxk else sparse_out.code.aux.indices.flatten()
    rows = torch.cat([sparse_out.code.indices.flatten(), aux_rows]).unique()
    for W in (sae.W_enc, sae.W_dec):
        assert W.grad.is_sparse
        listed = W.grad.coalesce()
        latents, values = listed.indices()[0], listed.values()
        assert bool(torch.isin(rows, latents).all())
        padding = ~torch.isin(latents, rows)  # the padding entries name latent 0, with zero rows
        assert bool((latents[padding] == 0).all()) and not values[padding].any()
        # Sized by bounds the host knows: min(N*k, F) rows for the main code, and for the
        # AuxK code at most the dead latents (all of them on the dense path). Less where
        # the CPU's sparse add merged the two codes' gradients.
        aux_bound = n_dead if dense_auxk else min(n_rows * k_aux, n_dead)
        assert W.grad._nnz() <= min(n_rows * 8, f) + aux_bound
    for name in grads:
        assert torch.equal(grads[name], sparse_grads[name]), f"sparse {name} gradient differs"


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,f", [(4096, 2**16), (333, 50_000)])
@pytest.mark.validates("topk_encode/fused")
def test_topk_encode_gpu_real_shapes(dtype, n, f):
    """Tolerance from the precision baseline: the kernel's error against fp64 may be at most
    twice torch's own error in the same dtype (plus a tiny floor)."""
    d, k = 1024, 32
    x = torch.randn(n, d, device="cuda").to(dtype)
    W = (torch.randn(f, d, device="cuda") / d**0.5).to(dtype)
    b = torch.zeros(f, device="cuda", dtype=dtype)
    values, indices = topk_encode_forward(x, W, b, k)
    pre64 = pre_activations64(x, W, b)
    torch_err = (torch.relu(x @ W.T + b).double() - pre64).abs().max().item()
    tol = 2 * torch_err + 1e-6
    assert_valid_topk(values, indices, pre64, k, tol=tol)


@requires_gpu
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=TRITON_PATH),
                                     pytest.param("cuda", marks=pytest.mark.validates("topk_encode/chunked"))])
def test_sae_without_weight_copies_gpu_matches_torch(backend):
    """bf16 autocast with the kernels reading the fp32 weights (no bf16 copies): the fused
    kernel rounds W tiles as it loads them, the chunked path casts a chunk at a time."""
    sae = SAE(SAEConfig(d_in=1024, d_sae=2**14, k=32), device="cuda", seed=0)
    x = torch.randn(2048, 1024, device="cuda")
    dead = torch.rand(2**14, device="cuda") < 0.1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, ref = sae_grads(sae, x, dead, "torch")
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead_mask=dead, backend=backend, weight_copies=False)
        out.loss.backward()
    assert out.recon.dtype == torch.float32 and out.code.values.dtype == torch.bfloat16
    for name, p in sae.named_parameters():
        err = (p.grad - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert err < 3e-2, (name, float(err))


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.validates("topk_encode/fused", "sparse_decode/triton")
def test_sae_backward_gpu_matches_torch_and_repeats(dtype):
    sae = SAE(SAEConfig(d_in=1024, d_sae=2**14, k=32), device="cuda", seed=0)
    x = torch.randn(2048, 1024, device="cuda")
    dead = torch.rand(2**14, device="cuda") < 0.1
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        _, ref = sae_grads(sae, x, dead, "torch")
        _, got = sae_grads(sae, x, dead, "triton")
        _, again = sae_grads(sae, x, dead, "triton")
    for name in ref:
        err = (got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert err < (3e-2 if dtype == torch.bfloat16 else 1e-3), (name, float(err))
        assert torch.equal(got[name], again[name]), name


@pytest.mark.parametrize("backend,copies", [("torch", True), pytest.param("triton", True, marks=TRITON_PATH),
                                            pytest.param("triton", False, marks=TRITON_PATH)])
def test_master_weights_get_fp32_gradients(kernel_device, backend, copies):
    """fp16 compute with fp32 parameters: outputs in fp16, parameter gradients in fp32 and
    equal (to fp16 rounding) to those of the fp32 computation. Without copies the kernels
    read the fp32 weights themselves."""
    torch.manual_seed(3)
    n, d, f, k = 8, 40, 50, 4
    x = torch.randn(n, d).to(kernel_device)
    params = [torch.randn(f, d), 0.1 * torch.randn(f), torch.randn(f, d) / d**0.5]
    grads = {}
    for dtype in (torch.float32, torch.float16):
        W_enc, b_enc, W_dec = [p.to(kernel_device).requires_grad_() for p in params]
        code = ops.topk_encode(x.to(dtype), W_enc, b_enc, k, backend=backend,
                               weight_compute=None if copies else W_enc.detach())
        out = ops.sparse_decode(code.values, code.indices, W_dec, None, backend=backend,
                                latent_index=code.latent_index, weight_compute=None if copies else W_dec.detach())
        assert out.dtype == dtype and code.values.dtype == dtype
        out.float().pow(2).sum().backward()
        assert W_enc.grad.dtype == W_dec.grad.dtype == b_enc.grad.dtype == torch.float32
        grads[dtype] = (code.indices, W_enc.grad, b_enc.grad, W_dec.grad)
    assert torch.equal(grads[torch.float32][0], grads[torch.float16][0])
    for g32, g16 in zip(grads[torch.float32][1:], grads[torch.float16][1:]):
        torch.testing.assert_close(g16, g32, rtol=2e-2, atol=2e-2 * float(g32.abs().max()))
