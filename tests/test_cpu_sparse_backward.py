"""The "cpu" implementations of topk_encode and sparse_decode (torch ops, the sparse
backward from the chosen pairs) against the dense-autograd reference: values, every
gradient within fp32 tolerance on random and odd shapes (N = 1, k = F, F prime, d odd,
ties), bitwise repeatable, under poisoned allocations; and a training step of each
optimizer against the reference path."""

import pytest
import torch

import saeengine
from saeengine import ops
from saeengine.ops.pairs_cpu import latent_rowsum_cpu, pair_dots_cpu
from saeengine.ops.topk_encode.cpu import cpu_topk_select, two_level_topk
from saeengine.trainer import TrainStep

from conftest import assert_valid_topk, pre_activations64

# (N, d, F, k): random, and the odd shapes
SHAPES = [(64, 32, 512, 8), (1, 16, 40, 5), (9, 7, 13, 13), (33, 5, 97, 4), (17, 31, 211, 30), (3, 3, 1000, 1)]


def _inputs(n, d, f, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    W = torch.randn(f, d, generator=gen) / d**0.5
    if ties:  # duplicate latents: equal pre-activations everywhere
        W[1::2] = W[0::2][: f // 2]
        x[1:] = x[:1]  # equal rows too
    b = 0.1 * torch.randn(f, generator=gen)
    b_pre = 0.1 * torch.randn(d, generator=gen)
    W_dec = torch.nn.functional.normalize(torch.randn(f, d, generator=gen), dim=1)
    return x, W, b, b_pre, W_dec


def _forward(backend, leaves, k, sparse_grad, indices=None, dead=None, k_aux=0, check=True):
    """Encode + decode + a loss on both; the reference can be forced to ``indices`` (the
    cpu choice among ties) so that the gradients compare pair for pair."""
    x, W, b, b_pre, W_dec = leaves
    if indices is None:
        code = ops.topk_encode(x, W, b, k, b_pre=b_pre, backend=backend, sparse_grad=sparse_grad,
                               dead_latents=dead, k_aux=k_aux, check=check)
    else:  # the dense reference at given indices: relu(pre).gather, pre through autograd
        pre = torch.relu((x - b_pre) @ W.T + b)
        code = ops.SparseCode(pre.gather(1, indices), indices)
    out = ops.sparse_decode(code.values, code.indices, W_dec, b_pre, backend=backend, sparse_grad=sparse_grad,
                            latent_index=code.latent_index, check=check)
    weights = torch.linspace(0.5, 1.5, code.values.numel()).reshape(code.values.shape)
    loss = out.pow(2).sum() + (code.values * weights).sum()
    if code.aux is not None:
        loss = loss + (code.aux.values * 0.3).sum()
    return code, out, loss


def _grads(leaves):
    return [t.grad.to_dense() if t.grad.is_sparse else t.grad for t in leaves]


def _leaves(tensors, dtype=torch.float32):
    return [t.to(dtype).clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n,d,f,k", SHAPES)
def test_cpu_gradients_match_the_dense_reference(poison_empty, n, d, f, k, ties, sparse_grad):
    tensors = _inputs(n, d, f, seed=n * 31 + f, ties=ties)
    mine = _leaves(tensors)
    code, out, loss = _forward("cpu", mine, k, sparse_grad)
    loss.backward()
    x, W, b, b_pre, _ = tensors
    assert_valid_topk(code.values, code.indices, pre_activations64(x, W, b, b_pre), k, 1e-4)
    ref = _leaves(tensors, torch.float64)
    _, ref_out, ref_loss = _forward("reference", ref, k, False, indices=code.indices)
    ref_loss.backward()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert mine[1].grad.is_sparse == sparse_grad and mine[4].grad.is_sparse == sparse_grad
    for name, got, want in zip(("x", "W_enc", "b_enc", "b_dec", "W_dec"), _grads(mine), _grads(ref)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


def test_cpu_matches_the_reference_exactly_where_nothing_ties():
    """Without ties the cpu choice is the reference's, and so is every gradient (fp32)."""
    tensors = _inputs(50, 24, 300, seed=3)
    grads = {}
    for backend in ("cpu", "reference"):
        leaves = _leaves(tensors)
        code, _, loss = _forward(backend, leaves, 7, False)
        loss.backward()
        grads[backend] = (code, _grads(leaves))
    assert torch.equal(grads["cpu"][0].indices, grads["reference"][0].indices)
    assert torch.equal(grads["cpu"][0].values, grads["reference"][0].values)
    for got, want in zip(grads["cpu"][1], grads["reference"][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_cpu_backward_is_bitwise_repeatable(sparse_grad):
    tensors = _inputs(200, 40, 700, seed=4)
    runs = []
    for _ in range(2):
        leaves = _leaves(tensors)
        code, out, loss = _forward("cpu", leaves, 16, sparse_grad, dead=torch.arange(0, 700, 5), k_aux=12)
        loss.backward()
        runs.append([code.values, code.indices, code.aux.values, out, *_grads(leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cpu_auxk_code_and_its_gradients_match_the_reference():
    tensors = _inputs(20, 12, 90, seed=5)
    dead = torch.arange(1, 90, 3)
    got = {}
    for backend in ("cpu", "reference"):
        leaves = _leaves(tensors, torch.float64)
        code, _, loss = _forward(backend, leaves, 5, False, dead=dead, k_aux=6)
        loss.backward()
        got[backend] = (code, _grads(leaves))
    (mine, g_mine), (ref, g_ref) = got["cpu"], got["reference"]
    assert torch.equal(mine.aux.indices, ref.aux.indices) and bool(torch.isin(mine.aux.indices, dead).all())
    for a, b in zip(g_mine, g_ref):  # the reference decoder accumulates in fp32 even for fp64
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_two_level_topk_is_torch_topk_and_chunking_changes_nothing(poison_empty):
    gen = torch.Generator().manual_seed(6)
    for r, f, k in ((5, 1000, 8), (7, 1003, 30), (3, 64, 4), (2, 17, 17)):
        pre = torch.randn(r, f, generator=gen)
        values, indices = two_level_topk(pre, k)
        ref_values, ref_indices = pre.topk(k, dim=1)
        assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)
    pre = torch.zeros(4, 800)  # all tied: the values still are
    assert torch.equal(two_level_topk(pre, 10)[0], torch.zeros(4, 10))
    x, W, b, _, _ = _inputs(37, 9, 500, seed=7)
    pre = pre_activations64(x, W, b)
    # blocks of 37 rows x 1 column, x 13 columns, 5 rows, all at once (the GEMM's rounding may move)
    for chunk_bytes in (1, 37 * 4 * 13, 500 * 4 * 5, 10**9):
        values, indices = cpu_topk_select(x, W, b, 6, chunk_bytes=chunk_bytes)
        assert_valid_topk(values, indices, pre, 6, 1e-5)
    subset = torch.arange(3, 500, 4)
    values, indices = cpu_topk_select(x, W, b, 6, subset, chunk_bytes=37 * 4 * 13)
    assert bool(torch.isin(indices, subset).all())
    assert_valid_topk(values, torch.searchsorted(subset, indices), pre[:, subset], 6, 1e-5)
    assert torch.equal(*(cpu_topk_select(x, W, b, 6, chunk_bytes=2000)[1] for _ in range(2)))


def test_pair_primitives_against_their_definitions():
    gen = torch.Generator().manual_seed(8)
    n, k, d, f = 11, 4, 6, 25
    indices = torch.stack([torch.randperm(f, generator=gen)[:k] for _ in range(n)])
    coef, rows, W = torch.randn(n, k, generator=gen), torch.randn(n, d, generator=gen), torch.randn(f, d)
    index = ops.build_latent_index(indices, f)
    ref_out, ref_sums = ops.latent_weighted_rowsum_ref(indices, coef, rows, f)
    _, out, sums = latent_rowsum_cpu(index, coef, rows, f, with_sums=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(sums, ref_sums)
    latents, compact, _ = latent_rowsum_cpu(index, coef, rows, f, compact=True)
    dense = torch.zeros(f, d).index_add_(0, latents, compact)
    torch.testing.assert_close(dense, ref_out)
    assert compact.shape[0] == min(n * k, f)
    torch.testing.assert_close(pair_dots_cpu(rows, indices, W), torch.einsum("nd,nkd->nk", rows, W[indices]))


def test_cpu_forward_and_backward_make_no_host_sync():
    from saeengine.syncs import count_host_syncs

    leaves = _leaves(_inputs(30, 8, 120, seed=9))
    with count_host_syncs() as syncs:
        _, _, loss = _forward("cpu", leaves, 4, True, dead=torch.arange(0, 120, 7), k_aux=3, check=False)
        loss.backward()
    assert syncs.total == 0, dict(syncs.by_op)


@pytest.mark.parametrize("optimizer", ["adam", "row_sparse_adam"])
def test_a_training_step_on_the_cpu_path_matches_the_reference_path(optimizer, tmp_path):
    """Three TrainSteps (AuxK over planted dead latents included) on backend "cpu" and
    "torch" from the same SAE: the same parameters within fp32 tolerance."""
    cfg = saeengine.TrainConfig(d_sae=160, k=6, k_aux=10, batch_size=48, total_tokens=48 * 3, optimizer=optimizer,
                                out_dir=str(tmp_path), progress=False, lr=1e-3)
    gen = torch.Generator().manual_seed(10)
    batches = [torch.randn(48, 20, generator=gen) for _ in range(3)]
    saes = {}
    for backend in ("cpu", "torch"):
        run_cfg = saeengine.TrainConfig(**{**cfg.__dict__, "backend": backend})
        sae = saeengine.SAE(run_cfg.sae_config(20), seed=0)
        step = TrainStep(sae, run_cfg)
        step.tokens_seen = run_cfg.dead_after_tokens
        step.last_fired[::2] = run_cfg.dead_after_tokens  # the odd latents are dead: AuxK runs
        metrics = [step(x) for x in batches]
        assert float(metrics[0]["auxk"]) > 0
        saes[backend] = sae
    for name, p in saes["cpu"].named_parameters():
        torch.testing.assert_close(p, saes["torch"].get_parameter(name), rtol=1e-4, atol=1e-5, msg=name)
