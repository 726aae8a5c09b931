"""The chunked GEMM + top-k select encoder (backend "cuda" of topk_encode): on CPU with the
torch select (every chunking, subsets, the sparse backward under the Triton interpreter),
on a GPU with the CUDA select against the fused Triton path."""

import pytest
import torch

from saeengine import SAE, SAEConfig, ops
from saeengine.ops.topk_encode.autograd import Selection, encode_selections
from saeengine.ops.topk_encode.chunked import chunk_columns, chunked_topk_encode

from conftest import assert_valid_topk, grads_through, pre_activations64, requires_gpu, sae_grads


def _inputs(n, d, f, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    W = torch.randn(f, d, generator=gen)
    b = 0.1 * torch.randn(f, generator=gen)
    return x.to(device), W.to(device), b.to(device)


def test_chunk_columns_bounds_the_buffer():
    assert chunk_columns(4096, 2**18, 2, 256 * 2**20) == 2**15
    assert chunk_columns(4096, 100, 2, 256 * 2**20) == 100  # never wider than F
    assert chunk_columns(10**9, 100, 4, 16) == 1  # at least one column


# chunk_bytes in units of one row's bytes (n * 4): 1 column per chunk, k wider than a chunk,
# chunks that do not divide F, and one chunk.
@pytest.mark.parametrize("n,d,f,k,chunk_cols", [
    (1, 72, 100, 1, 1),
    (16, 72, 130, 8, 3),
    (9, 40, 64, 64, 7),
    (5, 24, 33, 5, 64),
])
def test_gemm_topk_is_exact_topk_for_any_chunking(poison_empty, n, d, f, k, chunk_cols):
    x, W, b = _inputs(n, d, f, seed=n * 100 + f)
    values, indices = chunked_topk_encode(x, W, b, k, chunk_bytes=n * 4 * chunk_cols, select_backend="torch")
    assert_valid_topk(values, indices, pre_activations64(x, W, b), k, tol=1e-4)


def test_gemm_topk_subset_chooses_only_subset_latents(poison_empty):
    n, d, f, k = 6, 24, 90, 10
    x, W, b = _inputs(n, d, f, seed=3)
    subset = torch.arange(1, f, 3)
    values, indices = chunked_topk_encode(x, W, b, k, subset, chunk_bytes=n * 4 * 4, select_backend="torch")
    assert bool(torch.isin(indices, subset).all())
    pre = pre_activations64(x, W, b)[:, subset]
    assert_valid_topk(values, torch.searchsorted(subset, indices), pre, k, tol=1e-4)


def test_gemm_topk_values_are_relu_when_fewer_than_k_are_positive():
    """Rows with fewer than k positive pre-activations get zeros, as relu-then-top-k does."""
    x, W, _ = _inputs(3, 8, 20, seed=4)
    b = torch.full((20,), -100.0)
    b[:2] = 100.0
    values, _ = chunked_topk_encode(x, W, b, 5, chunk_bytes=3 * 4 * 6, select_backend="torch")
    assert (values[:, :2] > 0).all() and (values[:, 2:] == 0).all()


@pytest.mark.validates("topk_encode/chunked")
def test_gemm_forward_with_sparse_backward_matches_reference(kernel_device):
    """The "chunked" selection wired through the shared autograd node (main + AuxK codes):
    same codes and gradients as autograd through the reference. The backward kernels run
    under the Triton interpreter on CPU."""
    n, d, f, k, k_aux = 12, 40, 150, 6, 10  # k_aux < the positive entries among 38 dead: no zero ties
    x, W, b = _inputs(n, d, f, seed=8, device=kernel_device)
    dead = torch.arange(0, f, 4, device=kernel_device)
    weights = [torch.randn(n, k, device=kernel_device), torch.randn(n, k_aux, device=kernel_device)]

    def weighted(codes):
        return codes, sum((code.values * w).sum() for code, w in zip(codes, weights))

    def ours(x, W, b):
        return weighted(encode_selections(x, W, W.detach(), b, [Selection(k, None, "chunked", "reference"),
                                                                Selection(k_aux, dead, "chunked", "reference")]))

    def reference(x, W, b):
        return weighted([ops.SparseCode(*ops.topk_encode_ref(x, W, b, k)),
                         ops.SparseCode(*ops.topk_encode_ref(x, W, b, k_aux, latent_subset=dead))])

    got_codes, got = grads_through(ours, x, W, b)
    ref_codes, ref = grads_through(reference, x, W, b)
    for code, ref_code in zip(got_codes, ref_codes):
        assert torch.equal(code.indices, ref_code.indices)
        torch.testing.assert_close(code.values, ref_code.values, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("x", "W_enc", "b_enc"), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.validates("topk_encode/chunked")
def test_gemm_topk_gpu_real_shapes_and_overlap_is_bitwise_equal(dtype):
    """Tolerance from the precision baseline (twice torch's own error in the dtype); the
    two-stream overlap gives the same bits as the serial loop."""
    n, d, f, k = 4096, 1024, 2**16 + 77, 32
    x = torch.randn(n, d, device="cuda").to(dtype)
    W = (torch.randn(f, d, device="cuda") / d**0.5).to(dtype)
    b = (0.01 * torch.randn(f, device="cuda")).to(dtype)
    chunk = n * x.element_size() * 10_000
    values, indices = chunked_topk_encode(x, W, b, k, chunk_bytes=chunk)
    pre64 = pre_activations64(x, W, b)
    tol = 2 * (torch.relu(x @ W.T + b).double() - pre64).abs().max().item() + 1e-6
    assert_valid_topk(values, indices, pre64, k, tol=tol)
    v2, i2 = chunked_topk_encode(x, W, b, k, chunk_bytes=chunk, overlap=True)
    torch.cuda.synchronize()
    assert torch.equal(values, v2) and torch.equal(indices, i2)


@requires_gpu
@pytest.mark.validates("topk_encode/chunked", "sparse_decode/cuda")
def test_sae_cuda_backend_matches_triton_and_repeats():
    sae = SAE(SAEConfig(d_in=1024, d_sae=2**14, k=32), device="cuda", seed=0)
    x = torch.randn(2048, 1024, device="cuda")
    dead = torch.rand(2**14, device="cuda") < 0.1

    def grads(backend):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return sae_grads(sae, x, dead, backend)[1]

    ref, got, again = grads("triton"), grads("cuda"), grads("cuda")
    for name in ref:
        err = (got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert err < 3e-2, (name, float(err))
        assert torch.equal(got[name], again[name]), name
