"""Latent-sharded and data-parallel TopK training on real gloo processes (CPU), against
the single-process SAE as the oracle.

Spawning costs seconds per process, so each test spawns one group and runs every check
of its world size inside it: world 2 runs meshes 1x2 and 2x1, the tie rule, the
start-up config check and a world that does not match the mesh; world 4 runs 2x2 and
1x4 with an uneven split (F = 30 over 4 latent ranks).
"""

from __future__ import annotations

import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.distributed import _spawn

D, K, K_AUX = 12, 4, 6


def _data(seed: int, n: int, d: int = D) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * 2 + 0.5


def _dead_mask(f: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(f, generator=gen) < 0.5


def _sae(f: int, normalization: str = "none") -> SAE:
    sae = SAE(SAEConfig(d_in=D, d_sae=f, k=K, k_aux=K_AUX, normalization=normalization), seed=3)
    with torch.no_grad():  # a positive encoder bias: every token has >= k positive pre-activations
        sae.b_enc.copy_(torch.rand(f, generator=torch.Generator().manual_seed(4)) + 0.5)
    if normalization != "none":
        sae.fit_normalization(_data(99, 64))
    return sae


def _close(name, got, want, atol=2e-5, rtol=2e-5):
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        err = (got - want).abs().max().item()
        raise AssertionError(f"{name}: max |diff| {err:.3g} (atol {atol}, rtol {rtol})")


def _check_mesh(data: int, latent: int, f: int, normalization: str = "none") -> dict:
    """One mesh: forward (indices, values, recon, losses), the gradients of every slice,
    AuxK, and three DenseAdam steps, each against the single-process SAE on the global
    batch. Returns what was measured (bitwise flags, counted bytes)."""
    from saeengine.distributed import (LatentShardedSAE, MeshSpec, allreduce_data_grads_, comm, counting,
                                       init_mesh, train_step)
    from saeengine.optim import DenseAdam

    mesh = init_mesh(MeshSpec(data, latent))
    n_global = 8 * data
    full = _sae(f, normalization)
    shard = LatentShardedSAE.from_sae(full, mesh)
    lo, hi = shard.lo, shard.hi
    x = _data(1, n_global)
    rows = slice(mesh.data_rank * 8, (mesh.data_rank + 1) * 8)
    dead = _dead_mask(f, 2)
    report = {"lo": lo, "hi": hi}

    for with_aux in (False, True):
        full.zero_grad(set_to_none=True)
        shard.zero_grad(set_to_none=True)
        ref = full(x, dead_mask=dead if with_aux else None)
        ref.loss.backward()
        with counting() as log:
            out = shard(x[rows], dead[lo:hi] if with_aux else None)
            out.loss.backward()
            allreduce_data_grads_(shard)
        tag = "auxk" if with_aux else "main"
        # Same winners (every token has >= k positive values here: no zero ties).
        assert torch.equal(out.code.indices, ref.code.indices[rows]), f"{tag}: indices differ"
        _close(f"{tag} values", out.code.values, ref.code.values[rows])
        _close(f"{tag} recon", out.recon, ref.recon[rows])
        report[f"{tag}_recon_bitwise"] = bool(torch.equal(out.recon, ref.recon[rows]))
        if with_aux:
            assert ref.code.aux is not None and out.code.aux is not None
            assert torch.equal(out.code.aux.indices, ref.code.aux.indices[rows]), "auxk: aux indices differ"
            _close("auxk aux values", out.code.aux.values, ref.code.aux.values[rows])
        # Losses: each data rank holds its share of the global batch's.
        total = torch.stack([out.fvu.detach(), out.auxk_loss.detach(), out.loss.detach()])
        comm.all_reduce(total, mesh.data_group, axis="data", what="test")
        _close(f"{tag} fvu", total[0], ref.fvu.detach())
        _close(f"{tag} auxk loss", total[1], ref.auxk_loss.detach())
        _close(f"{tag} loss", total[2], ref.loss.detach())
        for name in ("W_enc", "b_enc", "W_dec"):
            _close(f"{tag} grad {name}", getattr(shard, name).grad, getattr(full, name).grad[lo:hi])
        _close(f"{tag} grad b_dec", shard.b_dec.grad, full.b_dec.grad)
        report[f"{tag}_bytes"] = log.by_label()

    if data == 1:  # the input gradient: the N x d all_reduce (x's own gradient, FVU denominator included)
        xg, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        full(xg, dead_mask=dead).loss.backward()
        with counting() as log:
            shard(xs, dead[lo:hi]).loss.backward()
        _close("input grad", xs.grad, xg.grad)
        report["input_grad_bytes"] = log.by_label()

    # Three Adam steps with AuxK, fresh batches, against the single process.
    full_opt, shard_opt = DenseAdam(full, lr=1e-2), DenseAdam(shard, lr=1e-2)
    for step in range(3):
        xs = _data(10 + step, n_global)
        full_opt.zero_grad()
        full(xs, dead_mask=dead).loss.backward()
        full_opt.step()
        train_step(shard, shard_opt, xs[rows], dead[lo:hi])
    for name in ("W_enc", "b_enc", "W_dec"):
        _close(f"after 3 steps {name}", getattr(shard, name).detach(), getattr(full, name).detach()[lo:hi], atol=1e-4)
    _close("after 3 steps b_dec", shard.b_dec.detach(), full.b_dec.detach(), atol=1e-4)
    gathered = shard.full_state_dict()
    _close("full_state_dict W_dec", gathered["W_dec"], full.W_dec.detach(), atol=1e-4)
    return report


def _check_ties(latent: int) -> None:
    """Equal pre-activations across slices: the winners are the lower global latents
    (the fused GPU encoder's rule), from a brute-force sort by (value desc, latent asc)."""
    from saeengine.distributed import LatentShardedSAE, MeshSpec, init_mesh

    mesh = init_mesh(MeshSpec(1, latent))
    f = 16
    sae = SAE(SAEConfig(d_in=D, d_sae=f, k=5), seed=0)
    with torch.no_grad():  # latents j and j + 8 identical: every value appears twice, across the two slices
        sae.W_enc[8:] = sae.W_enc[:8]
        sae.b_enc.zero_()
        sae.b_enc[8:] = sae.b_enc[:8]
    x = _data(5, 6)
    x[0] = -sae.W_enc[0] * 50  # a token with fewer than k positive values: ties at zero too
    shard = LatentShardedSAE.from_sae(sae, mesh)
    with torch.no_grad():
        out = shard(x)
        pre = torch.relu(x @ sae.W_enc.T + sae.b_enc)
    for n in range(x.shape[0]):
        order = sorted(range(f), key=lambda j: (-float(pre[n, j]), j))[:5]
        assert out.code.indices[n].tolist() == order, (n, out.code.indices[n].tolist(), order)


def _check_bad_input(world: int) -> dict:
    from saeengine.distributed import MeshSpec, check_same_config, init_mesh
    from saeengine.errors import ConfigError, InputError

    messages = {}
    try:
        init_mesh(MeshSpec(world, 2))
        raise AssertionError("a mesh bigger than the world was accepted")
    except InputError as err:
        messages["world"] = str(err)
    mesh = init_mesh(MeshSpec(1, world))
    rank = mesh.rank
    cfg = SAEConfig(d_in=D, d_sae=32, k=4 + (rank == 1), dtype="float32")
    try:
        check_same_config(mesh, cfg)
        raise AssertionError("mismatched configs were accepted")
    except ConfigError as err:
        messages["config"] = str(err)
    check_same_config(mesh, SAEConfig(d_in=D, d_sae=32, k=4))  # equal configs pass
    return messages


def _world2(rank, world):
    reports = {"1x2": _check_mesh(1, 2, 32), "2x1": _check_mesh(2, 1, 32, "mean_norm")}
    _check_ties(2)
    reports["bad"] = _check_bad_input(world)
    return reports


def _world4(rank, world):
    return {"2x2": _check_mesh(2, 2, 32), "1x4": _check_mesh(1, 4, 30, "mean_norm")}


def test_world2_meshes_1x2_and_2x1_ties_and_bad_input():
    reports = _spawn.run(_world2, 2, timeout=120)
    assert [r["1x2"]["lo"] for r in reports] == [0, 16]
    assert [r["2x1"]["hi"] for r in reports] == [32, 32]
    for r in reports:
        msg = r["bad"]["world"]
        assert "data x latent = 2 x 2 = 4" in msg and "the world has 2" in msg and "torchrun" in msg
        msg = r["bad"]["config"]
        assert "k: 4 on rank 0; 5 on rank 1" in msg, msg
    # Latent axis: the candidates gathered are N x k keys (8 bytes), the recon N x d fp32.
    main = reports[0]["1x2"]["main_bytes"]
    assert main["latent:all_gather:topk_candidates"] == 8 * K * 8
    assert main["latent:all_reduce:partial_recon"] == 8 * D * 4
    assert main["latent:all_reduce:b_dec_grad"] == D * 4
    aux = reports[0]["1x2"]["auxk_bytes"]
    assert aux["latent:all_gather:topk_candidates"] == 8 * (K + K_AUX) * 8
    assert aux["latent:all_reduce:partial_recon"] == 2 * 8 * D * 4
    # Data axis only: no latent traffic; one bucket of all gradients.
    data = reports[0]["2x1"]["main_bytes"]
    assert not any(key.startswith("latent:") for key in data)
    assert data["data:all_reduce:grads"] == (2 * 32 * D + 32 + D) * 4
    # One latent slice of size 1 has nothing to sum: the data-only recon is bitwise the single one.
    assert reports[0]["2x1"]["main_recon_bitwise"]


def test_world4_meshes_2x2_and_uneven_1x4():
    reports = _spawn.run(_world4, 4, timeout=150)
    assert reports[0]["1x4"]["input_grad_bytes"]["latent:all_reduce:input_grad"] == 8 * D * 4
    assert [(r["1x4"]["lo"], r["1x4"]["hi"]) for r in reports] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert [(r["2x2"]["lo"], r["2x2"]["hi"]) for r in reports] == [(0, 16), (16, 32), (0, 16), (16, 32)]
    b = reports[0]["2x2"]["main_bytes"]
    assert b["latent:all_gather:topk_candidates"] == 8 * K * 8
    assert b["data:all_reduce:grads"] == (2 * 16 * D + 16 + D) * 4


def test_failing_rank_is_reported():
    with pytest.raises(_spawn.SpawnError, match="rank 0 fails on purpose"):
        _spawn.run(_fail, 1, timeout=60)


def _fail(rank, world):
    raise ValueError(f"rank {rank} fails on purpose")
