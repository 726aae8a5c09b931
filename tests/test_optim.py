"""Row-sparse Adam against torch.optim.Adam on the same rows; untouched rows stay bitwise
equal; resampling writes exactly the prescribed rows and zeroes their moments."""

import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.ops import SparseCode
from saeengine.optim import (DenseAdam, RowSparseAdam, clip_grad_norm_, dead_latents_later, fired_rows,
                             latent_grad_rows, resample_dead_latents_)
from saeengine.syncs import count_host_syncs


def make_sae(f=40, d=12, seed=0):
    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=4), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=gen)
        sae.b_dec.normal_(0, 0.1, generator=gen)
    return sae


def random_grads(sae, rows, gen):
    for name, p in sae.named_parameters():
        g = torch.randn(p.shape, generator=gen)
        if name in ("W_enc", "b_enc", "W_dec"):
            mask = torch.zeros(p.shape[0], dtype=torch.bool)
            mask[rows] = True
            g[~mask] = 0  # rows that did not fire get no gradient
        p.grad = g


def test_row_sparse_adam_matches_torch_adam_on_its_rows():
    gen = torch.Generator().manual_seed(0)
    ours, ref = make_sae(), make_sae()
    opt = RowSparseAdam(ours, lr=1e-2)
    torch_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    rows = torch.tensor([1, 5, 6, 30])
    for _ in range(4):  # the same rows every step: lazy Adam and Adam coincide there
        random_grads(ours, rows, gen)
        for p, q in zip(ref.parameters(), ours.parameters()):
            p.grad = q.grad.clone()
        opt.step(rows)
        with torch.no_grad():  # the decoder constraints, written out
            ref.W_dec.grad -= (ref.W_dec.grad * ref.W_dec).sum(1, keepdim=True) * ref.W_dec
            torch_opt.step()
            ref.W_dec /= ref.W_dec.norm(dim=1, keepdim=True)
    for name in ("W_enc", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(ours, name)[rows] if name != "b_dec" else ours.b_dec,
                                   getattr(ref, name)[rows] if name != "b_dec" else ref.b_dec,
                                   rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(ours.W_dec[rows], ref.W_dec[rows], rtol=1e-5, atol=1e-6)


def test_rows_without_gradient_are_untouched_and_keep_their_moments():
    gen = torch.Generator().manual_seed(1)
    sae = make_sae()
    opt = RowSparseAdam(sae, lr=1e-2)
    random_grads(sae, torch.arange(40), gen)
    opt.step(torch.arange(40))  # every row has moments now
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    moments = {name: {k: v.clone() for k, v in s.items()} for name, s in opt.state.items()}
    rows = torch.tensor([2, 3])
    random_grads(sae, rows, gen)
    opt.step(rows)
    others = torch.ones(40, dtype=torch.bool)
    others[rows] = False
    for name in ("W_enc", "b_enc", "W_dec"):
        assert torch.equal(getattr(sae, name)[others], before[name][others]), name
        assert not torch.equal(getattr(sae, name)[rows], before[name][rows]), name
        for key in ("m", "v"):
            assert torch.equal(opt.state[name][key][others], moments[name][key][others]), (name, key)
    assert torch.allclose(sae.W_dec[rows].norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("use_row_sparse", [True, False])
def test_resampling_sets_exactly_the_dead_rows(use_row_sparse):
    gen = torch.Generator().manual_seed(2)
    sae = make_sae()
    opt = RowSparseAdam(sae, lr=1e-2) if use_row_sparse else DenseAdam(sae, lr=1e-2)
    random_grads(sae, torch.arange(40), gen)
    opt.step(torch.arange(40)) if use_row_sparse else opt.step()
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    dead = torch.zeros(40, dtype=torch.bool)
    dead[[0, 7, 8]] = True
    x = torch.randn(64, 12, generator=gen)
    losses = torch.zeros(64)
    losses[13] = 5.0  # the only input with a loss: every dead latent must take it
    n = resample_dead_latents_(sae, opt, dead, x, losses, seed=5)
    assert int(n) == 3
    direction = x[13] / x[13].norm()
    enc_norm = before["W_enc"][~dead].norm(dim=1).mean()
    for j in (0, 7, 8):
        torch.testing.assert_close(sae.W_dec[j], direction)
        torch.testing.assert_close(sae.W_enc[j], direction * 0.2 * enc_norm)
        assert float(sae.b_enc[j].detach()) == 0.0
    for name in ("W_enc", "b_enc", "W_dec"):
        assert torch.equal(getattr(sae, name)[~dead], before[name][~dead]), name
    assert torch.equal(sae.b_dec, before["b_dec"])
    if use_row_sparse:
        for name in ("W_enc", "b_enc", "W_dec"):
            assert not opt.state[name]["m"][dead].any() and not opt.state[name]["v"][dead].any()
            assert opt.state[name]["v"][~dead].all()
    else:
        for p in (sae.W_enc, sae.b_enc, sae.W_dec):
            state = opt.adam.state[p]
            assert not state["exp_avg"][dead].any() and not state["exp_avg_sq"][dead].any()
            assert state["exp_avg_sq"][~dead].all()
    with pytest.raises(TypeError, match="wrap torch.optim.Adam as saeengine.optim.DenseAdam"):
        resample_dead_latents_(sae, torch.optim.Adam(sae.parameters()), dead, x, losses)


def test_row_sparse_adam_state_round_trip():
    gen = torch.Generator().manual_seed(3)
    a, b = make_sae(), make_sae()
    opt_a, opt_b = RowSparseAdam(a, lr=1e-2), RowSparseAdam(b, lr=1e-2)
    random_grads(a, torch.tensor([1, 2]), gen)
    opt_a.step(torch.tensor([1, 2]))
    opt_b.load_state_dict(opt_a.state_dict())
    assert opt_b.step_count == 1
    for name in opt_a.state:
        assert torch.equal(opt_a.state[name]["m"], opt_b.state[name]["m"])


def _mix32_reference(x: int) -> int:
    """mix32 of csrc/dead_latents.cu in plain Python integers (uint32 semantics)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_resample_draws_mirror_the_cuda_hash():
    from saeengine.optim import resample_uniform

    seed = (123 << 32) + 0xDEADBEEF
    latents = torch.tensor([0, 1, 7, 2**31 - 1, 2**32 + 5])
    expected = [_mix32_reference((seed & 0xFFFFFFFF) ^ _mix32_reference((f & 0xFFFFFFFF) ^ _mix32_reference(seed >> 32)))
                / 2**32 for f in latents.tolist()]
    assert resample_uniform(seed, latents).tolist() == expected
    draws = resample_uniform(3, torch.arange(100_000))
    assert 0 <= float(draws.min()) and float(draws.max()) < 1 and abs(float(draws.mean()) - 0.5) < 0.01


def test_resampling_follows_loss_squared_and_is_seeded():
    sae = make_sae(f=4000, d=12)
    dead = torch.ones(4000, dtype=torch.bool)
    x = torch.eye(12)[:3] * torch.tensor([[1.0], [2.0], [3.0]])   # three inputs, told apart by direction
    losses = torch.tensor([0.0, 1.0, 3.0])                         # loss^2 weights 0 : 1 : 9
    resample_dead_latents_(sae, None, dead, x, losses, seed=1, backend="torch")
    picked = sae.W_dec.detach().argmax(dim=1)
    counts = torch.bincount(picked, minlength=12)[:3].tolist()
    assert counts[0] == 0 and abs(counts[2] / 4000 - 0.9) < 0.03, counts
    first = sae.W_dec.detach().clone()
    resample_dead_latents_(sae, None, dead, x, losses, seed=1, backend="torch")
    assert torch.equal(sae.W_dec, first)


def test_mark_fired_reference():
    from saeengine.optim import mark_fired_

    last = torch.tensor([0, 5, 5, 5, 0])
    indices = torch.tensor([[1, 3], [3, 4], [2, 2]])
    values = torch.tensor([[0.5, 0.0], [2.0, -1.0], [0.0, 0.0]])  # only positive values count
    mark_fired_(last, indices, values, 9, backend="torch")
    expected = [0, 5, 5, 5, 0]
    for n in range(3):
        for j in range(2):
            if values[n, j] > 0:
                expected[indices[n, j]] = 9
    assert last.tolist() == expected == [0, 9, 5, 9, 0]
    with pytest.raises(ValueError, match="int64"):
        mark_fired_(last.float(), indices, values, 9)


def test_row_sparse_adam_bf16_moments_track_fp32():
    gen = torch.Generator().manual_seed(4)
    a, b = make_sae(), make_sae()
    opt_a, opt_b = RowSparseAdam(a, lr=1e-2), RowSparseAdam(b, lr=1e-2, moment_dtype=torch.bfloat16)
    rows = torch.tensor([0, 3, 9])
    for _ in range(3):
        random_grads(a, rows, gen)
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = p.grad.clone()
        opt_a.step(rows)
        opt_b.step(rows)
    assert opt_b.state["W_enc"]["m"].dtype == torch.bfloat16
    torch.testing.assert_close(b.W_enc, a.W_enc, rtol=0.02, atol=0.02)
    with pytest.raises(ValueError, match="moment_dtype"):
        RowSparseAdam(a, lr=1e-2, moment_dtype=torch.float16)


def _as_sparse_rows(dense: torch.Tensor, rows: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """dense's rows ``rows`` plus ``extra`` rows (zero gradient) as an uncoalesced COO
    tensor in two pieces, the way the main and AuxK codes produce it."""
    first, second = rows[: len(rows) // 2], torch.cat([rows[len(rows) // 2:], extra])
    pieces = [(first, dense[first]), (second, dense[second])]
    return torch.sparse_coo_tensor(torch.cat([p[0] for p in pieces]).unsqueeze(0),
                                   torch.cat([p[1] for p in pieces]), dense.shape, check_invariants=True)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cuda", marks=[pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; the torch backend is the CPU counterpart"),
    pytest.mark.validates("row_sparse_adam/cuda")])])
def test_row_sparse_adam_takes_sparse_weight_gradients(backend):
    """Sparse COO weight gradients (no [F, d] buffer) give the same step as dense ones,
    clipping included; rows listed but absent from the sparse gradient count as zero."""
    device = "cuda" if backend == "cuda" else "cpu"
    saes = [make_sae().to(device) for _ in range(2)]
    opts = [RowSparseAdam(s, lr=1e-2, backend=backend) for s in saes]
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        rows = torch.randperm(40, generator=gen)[:9].sort().values
        random_grads(saes[0], rows, gen)
        for p, q in zip(saes[0].parameters(), saes[1].parameters()):
            p.grad = p.grad.to(device)
            q.grad = p.grad.clone()
        for name in ("W_enc", "W_dec"):  # sparse in the second SAE, one listed row left out
            p = dict(saes[1].named_parameters())[name]
            unlisted = torch.tensor([r for r in range(40) if r not in rows.tolist()][-1:], device=device)
            p.grad = _as_sparse_rows(p.grad, rows[1:].to(device), unlisted)
            dict(saes[0].named_parameters())[name].grad[rows[0]] = 0
        norms = [clip_grad_norm_(s.parameters(), 0.5) for s in saes]
        torch.testing.assert_close(norms[0], norms[1])
        for opt in opts:
            opt.step(rows.to(device))
        for p, q in zip(saes[0].parameters(), saes[1].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_latent_grad_rows_gathers_from_dense_and_sparse():
    dense = torch.randn(10, 3)
    dense[[2, 5]] = 0
    rows = torch.tensor([1, 2, 7, 9])
    sparse = torch.sparse_coo_tensor(torch.tensor([[9, 1, 7]]), dense[[9, 1, 7]], dense.shape, check_invariants=True)
    torch.testing.assert_close(latent_grad_rows(sparse, rows), dense[rows], rtol=0, atol=0)
    torch.testing.assert_close(latent_grad_rows(dense, rows), dense[rows], rtol=0, atol=0)
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0, 3), dense.shape,
                                    check_invariants=True)
    assert latent_grad_rows(empty, rows).abs().sum() == 0
    # Uncoalesced, as the sparse backward gives it: a latent once per code (summed), zero
    # padding rows naming latent 0, and an unlisted latent's entry (dropped).
    a, b, c, unlisted = torch.randn(4, 3).unbind()
    entries = torch.tensor([[9, 1, 0, 9, 0, 4]])
    values = torch.stack([a, b, torch.zeros(3), c, torch.zeros(3), unlisted])
    messy = torch.sparse_coo_tensor(entries, values, dense.shape, check_invariants=True)
    assert not messy.is_coalesced()
    expected = torch.stack([b, torch.zeros(3), torch.zeros(3), a + c])
    assert torch.equal(latent_grad_rows(messy, rows), expected)
    assert torch.equal(latent_grad_rows(messy, rows), latent_grad_rows(messy.coalesce(), rows))
    shuffled = torch.tensor([9, 2, 1, 7])  # rows in any order: the gathered rows follow it
    assert torch.equal(latent_grad_rows(messy, shuffled), expected[[3, 1, 0, 2]])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grads", "sparse_grads"])
def test_row_sparse_adam_fused_clipping_matches_clip_then_step(sparse):
    """step(rows) with max_grad_norm clips over the gathered rows: the same step as
    clip_grad_norm_ followed by step(rows) when the unlisted rows have no gradient, with
    the norm returned; without clipping it returns None."""
    gen = torch.Generator().manual_seed(7)
    fused, ref = make_sae(), make_sae()
    opts = RowSparseAdam(fused, lr=1e-2, max_grad_norm=0.5), RowSparseAdam(ref, lr=1e-2)
    for step in range(3):
        rows = torch.randperm(40, generator=gen)[:11].sort().values
        random_grads(ref, rows, gen)
        for name, p in ref.named_parameters():
            p.grad.mul_(5.0)  # well above the clip norm
            grad = p.grad.clone()
            if sparse and name in ("W_enc", "W_dec"):
                grad = _as_sparse_rows(grad, rows, torch.tensor([0]) if 0 not in rows else torch.tensor([], dtype=torch.long))
            dict(fused.named_parameters())[name].grad = grad
        norm_ref = clip_grad_norm_(ref.parameters(), 0.5)
        opts[1].step(rows)
        norm = opts[0].step(rows)
        torch.testing.assert_close(norm, norm_ref)
        assert float(norm) > 0.5
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert opts[1].step(rows) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned asynchronous count); the CPU case runs the same math"))])
def test_fired_rows_and_dead_latents_are_listed_without_a_sync(device):
    gen = torch.Generator().manual_seed(2)
    f = 50
    code = SparseCode(torch.rand(6, 4, generator=gen) - 0.3, torch.randint(0, f, (6, 4), generator=gen))
    code.aux = SparseCode(torch.rand(6, 9, generator=gen) - 0.5, torch.randint(0, f, (6, 9), generator=gen))
    code = SparseCode(code.values.to(device), code.indices.to(device), aux=SparseCode(
        code.aux.values.to(device), code.aux.indices.to(device)))
    expected = torch.cat([code.indices[code.values > 0], code.aux.indices[code.aux.values > 0]]).unique()
    dead = torch.rand(f, generator=gen).to(device) < 0.3
    with count_host_syncs() as syncs:
        found = fired_rows(code, f)
        dead_later = dead_latents_later(dead)
    assert syncs.total == 0, dict(syncs.by_op)
    assert torch.equal(dead_later.get(), torch.nonzero(dead).squeeze(1))
    for mask in (torch.zeros_like(dead), torch.ones_like(dead)):
        assert torch.equal(dead_latents_later(mask).get(), torch.nonzero(mask).squeeze(1))
    rows = found.get()
    assert torch.equal(rows, expected) and 0 < rows.numel() < f
    assert torch.equal(fired_rows(code, f).get(), rows)
    none_fired = SparseCode(-code.values.abs(), code.indices)
    assert fired_rows(none_fired, f).get().numel() == 0


def test_dense_adam_is_torch_adam_with_the_constraints_written_out():
    """DenseAdam's step: parallel-gradient removal on the decoder, clipping over every
    parameter, torch Adam, unit-norm decoder rows; bit for bit that sequence by hand."""
    gen = torch.Generator().manual_seed(5)
    ours, ref = make_sae(), make_sae()
    opt = DenseAdam(ours, lr=1e-2, betas=(0.8, 0.99), max_grad_norm=0.5)
    torch_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.8, 0.99), fused=True)  # DenseAdam's on CPU
    for _ in range(3):
        random_grads(ours, torch.arange(40), gen)
        for p, q in zip(ref.parameters(), ours.parameters()):
            p.grad = q.grad.clone() * 3.0
            q.grad.mul_(3.0)
        norm = opt.step()
        with torch.no_grad():
            ref.W_dec.grad -= (ref.W_dec.grad * ref.W_dec).sum(1, keepdim=True) * ref.W_dec
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            torch_opt.step()
            ref.W_dec /= ref.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        assert float(norm) > 0.5 and torch.equal(norm, ref_norm)
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), name
    assert DenseAdam(ours, lr=1e-2).step() is None  # no clipping: no norm


class _Renamed(torch.nn.Module):
    """An SAE-shaped module whose parameters have other names: optimizers must find the
    decoder by its role."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.atoms = torch.nn.Parameter(torch.eye(4)[torch.arange(10) % 4])     # decoder rows (unit, axis-aligned)
        self.probe = torch.nn.Parameter(torch.eye(4)[torch.arange(10) % 4])     # encoder rows, the same values
        self.offset = torch.nn.Parameter(torch.randn(4, generator=gen))         # dense

    def parameter_roles(self):
        return {"atoms": "decoder_rows", "probe": "encoder_rows", "offset": "dense"}


@pytest.mark.parametrize("kind", ["dense", "row_sparse"])
def test_optimizers_apply_the_constraints_by_role_not_by_name(kind):
    module = _Renamed()
    opt = DenseAdam(module, lr=0.1) if kind == "dense" else RowSparseAdam(module, lr=0.1)
    rows = torch.arange(10)
    before = module.atoms.detach().clone()
    # A gradient along each row (exactly removable: rows are axis-aligned) to both matrices.
    along = before * torch.arange(1.0, 11.0)[:, None]
    module.atoms.grad, module.probe.grad, module.offset.grad = along.clone(), along.clone(), torch.ones(4)
    opt.step(rows)
    assert torch.equal(module.atoms.detach(), before)      # the decoder's parallel gradient was removed
    assert not torch.equal(module.probe.detach(), before)  # the encoder's was not
    gen = torch.Generator().manual_seed(1)
    module.atoms.grad, module.probe.grad = torch.randn(10, 4, generator=gen), torch.randn(10, 4, generator=gen)
    opt.step(rows)
    torch.testing.assert_close(module.atoms.norm(dim=1), torch.ones(10))   # decoder rows projected back
    assert (module.probe.norm(dim=1) - 1).abs().max() > 0.05               # encoder rows left alone
    bad = _Renamed()
    bad.parameter_roles = lambda: {"atoms": "decoder", "probe": "encoder_rows", "offset": "dense"}
    with pytest.raises(ValueError, match="roles"):
        DenseAdam(bad, lr=0.1)


@pytest.mark.parametrize("kind", ["dense", "row_sparse"])
def test_reset_rows_zeroes_the_flagged_latents_state_without_a_sync(kind):
    gen = torch.Generator().manual_seed(6)
    sae = make_sae()
    opt = DenseAdam(sae, lr=1e-2) if kind == "dense" else RowSparseAdam(sae, lr=1e-2)
    random_grads(sae, torch.arange(40), gen)
    opt.step(torch.arange(40))
    before = {name: [t.clone() for t in opt.row_moments(name)] for name in ("W_enc", "b_enc", "W_dec")}
    dead = torch.zeros(40, dtype=torch.bool)
    dead[[3, 17, 39]] = True
    with count_host_syncs() as syncs:
        opt.reset_rows_(dead)
    assert syncs.total == 0, dict(syncs.by_op)
    for name, moments in before.items():
        assert len(moments) == 2
        for old, new in zip(moments, opt.row_moments(name)):
            assert not new[dead].any() and torch.equal(new[~dead], old[~dead]) and old[dead].all(), name
    with pytest.raises(ValueError, match=r"\[40\] bool mask"):
        opt.reset_rows_(torch.zeros(39, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["dense", "row_sparse"])
def test_optimizer_state_round_trip_resumes_bit_for_bit(kind):
    def build(sae):
        return (DenseAdam(sae, lr=1e-2, max_grad_norm=1.0) if kind == "dense"
                else RowSparseAdam(sae, lr=1e-2, max_grad_norm=1.0))

    def steps(sae, opt, seeds):
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            rows = torch.randperm(40, generator=gen)[:7]
            random_grads(sae, rows, gen)
            opt.step(rows)

    straight, resumed = make_sae(), make_sae()
    opt = build(straight)
    steps(straight, opt, range(3))
    saved_sae, saved_opt = {k: v.clone() for k, v in straight.state_dict().items()}, opt.state_dict()
    steps(straight, opt, range(3, 6))
    resumed.load_state_dict(saved_sae)
    fresh = build(resumed)
    fresh.load_state_dict(saved_opt)
    steps(resumed, fresh, range(3, 6))
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_row_sparse_adam_needs_the_fired_rows():
    opt = RowSparseAdam(make_sae(), lr=1e-2)
    assert opt.needs_rows and opt.sparse_grad and not RowSparseAdam(make_sae(), lr=1e-2, sparse_grad=False).sparse_grad
    with pytest.raises(ValueError, match="needs rows"):
        opt.step()
