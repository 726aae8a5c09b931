"""The mesh, the latent slices, the candidate keys and the closed-form arithmetic, in one
process (no torch.distributed): tests/test_distributed_latent.py spawns the real ranks."""

from __future__ import annotations

import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.distributed import (LatentShardedSAE, Mesh, comm, ddp_bytes, init_mesh, latent_axis_bytes,
                                   latent_slice, latent_slices, memory_per_rank, pack_keys, parse_mesh, unpack_keys,
                                   widest_fitting)
from saeengine.distributed.latent_shard import _init_rows, topk_keys
from saeengine.errors import ConfigError, InputError


@pytest.mark.parametrize("text, data, latent", [("data=2,latent=2", 2, 2), ("latent=4", 1, 4), ("data=3", 3, 1),
                                                ("latent=2, data=1", 1, 2)])
def test_parse_mesh(text, data, latent):
    spec = parse_mesh(text)
    assert (spec.data, spec.latent, spec.world_size) == (data, latent, data * latent)
    assert parse_mesh(str(spec)) == spec


@pytest.mark.parametrize("text, words", [("data=2,model=2", "unknown axis 'model'"), ("data=0", ">= 1"),
                                         ("data=2,data=2", "given twice"), ("", "data=D,latent=L"),
                                         ("data:2", "cannot read")])
def test_parse_mesh_refuses(text, words):
    with pytest.raises(InputError, match=words):
        parse_mesh(text)


@pytest.mark.parametrize("f, p", [(32, 2), (30, 4), (7, 7), (1000, 3), (2**20, 8)])
def test_latent_slices_cover_contiguously(f, p):
    slices = latent_slices(f, p)
    assert slices[0][0] == 0 and slices[-1][1] == f
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    sizes = [hi - lo for lo, hi in slices]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    # the rule of torch.tensor_split
    assert sizes == [len(c) for c in torch.arange(f).tensor_split(p)]


def test_latent_slice_refuses():
    with pytest.raises(InputError, match="at most 3"):
        latent_slice(3, 0, 4)
    with pytest.raises(InputError, match="latent_rank"):
        latent_slice(8, 2, 2)


def test_init_mesh_without_processes():
    assert init_mesh("data=1,latent=1").world_size == 1
    with pytest.raises(InputError, match="torchrun --nproc-per-node 4"):
        init_mesh("data=2,latent=2")


def test_keys_order_by_value_then_lower_latent():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (50, 40), generator=gen).float() / 4  # many ties, zeros included
    latents = torch.stack([torch.randperm(1000, generator=gen)[:40] for _ in range(50)])
    keys = pack_keys(values, latents)
    top = topk_keys(keys, 7)
    v, i = unpack_keys(top)
    for n in range(50):
        want = sorted(zip(values[n].tolist(), latents[n].tolist()), key=lambda t: (-t[0], t[1]))[:7]
        assert list(zip(v[n].tolist(), i[n].tolist())) == want
    pad_v, pad_i = unpack_keys(torch.full((1, 2), -1, dtype=torch.int64))
    assert pad_v.tolist() == [[0.0, 0.0]] and pad_i.tolist() == [[0, 0]]
    assert (pack_keys(torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64)) > -1).all()


def test_init_rows_do_not_depend_on_the_mesh():
    whole = _init_rows(0, 9000, 5, seed=7)
    parts = torch.cat([_init_rows(lo, hi, 5, seed=7) for lo, hi in latent_slices(9000, 3)])
    assert torch.equal(whole, parts)
    torch.testing.assert_close(whole.norm(dim=1), torch.ones(9000))


def test_single_mesh_equals_the_sae_with_auxk():
    """A 1 x 1 mesh runs the same code path without any collective: the oracle check
    that needs no processes (the spawned tests cover the real groups)."""
    cfg = SAEConfig(d_in=10, d_sae=24, k=3, k_aux=5, normalization="mean_norm")
    sae = SAE(cfg, seed=1)
    x = torch.randn(9, 10, generator=torch.Generator().manual_seed(2))
    sae.fit_normalization(x)
    with torch.no_grad():  # most latents far below zero: tokens with fewer than k positive values (zero ties)
        sae.b_enc.fill_(-4.0)
        sae.b_enc[::5] = 0.0
    dead = torch.zeros(24, dtype=torch.bool)
    dead[::3] = True
    shard = LatentShardedSAE.from_sae(sae, Mesh.single())
    ref = sae(x, dead_mask=dead)
    ref.loss.backward()
    with comm.counting() as log:
        out = shard(x, dead)
        out.loss.backward()
    assert len(log) == 0
    keep = ref.code.values > 0  # the CPU reference leaves the order of equal (zero) values open
    assert torch.equal(out.code.indices[keep], ref.code.indices[keep])
    torch.testing.assert_close(out.recon, ref.recon)
    torch.testing.assert_close(out.loss, ref.loss)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(shard, name).grad, getattr(sae, name).grad)
    # The dense torch selection (backend="reference") chooses the same, zero ties included.
    grads = {name: getattr(shard, name).grad.clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    shard.zero_grad(set_to_none=True)
    dense = shard(x, dead, backend="reference")
    dense.loss.backward()
    assert torch.equal(dense.code.indices, out.code.indices)
    assert torch.equal(dense.code.aux.indices, out.code.aux.indices)
    for name, grad in grads.items():
        torch.testing.assert_close(getattr(shard, name).grad, grad)
    # Zero ties went to the lower latents (the fused GPU encoder's rule).
    zero = out.code.values == 0
    assert zero.any(1).sum() >= 3
    pre = torch.relu(sae.normalize(x) @ sae.W_enc.T + sae.b_enc).detach()
    for n in range(x.shape[0]):
        want = sorted(range(24), key=lambda j: (-float(pre[n, j]), j))[:3]
        assert out.code.indices[n].tolist() == want


def test_sharding_refuses_other_architectures():
    with pytest.raises(ConfigError, match="topk"):
        LatentShardedSAE(SAEConfig(d_in=4, d_sae=8, architecture="relu"), Mesh.single())


def test_closed_forms():
    # The example: d=1024, F=2^20, N=16384, k=32 on 8 latent ranks.
    lat = latent_axis_bytes(16384, 1024, 32, 8)
    assert lat["topk_candidates"] == 16384 * 32 * 8 and lat["partial_recon"] == 16384 * 1024 * 4
    assert 50e6 < lat["total"] < 80e6  # tens of MB
    assert ddp_bytes(2**20, 1024) == (2 * 2**20 * 1024 + 2**20 + 1024) * 4  # ~8.6 GB
    assert latent_axis_bytes(16384, 1024, 32, 1)["total"] == 0
    one = memory_per_rank(2**20, 1024, 16384, 32, latent=1)
    eight = memory_per_rank(2**20, 1024, 16384, 32, latent=8)
    assert eight["weights"] * 8 == pytest.approx(one["weights"], rel=1e-3)
    assert eight["adam"] == 2 * eight["weights"]
    f8 = widest_fitting(80e9, 1024, 16384, 32, latent=8)
    f1 = widest_fitting(80e9, 1024, 16384, 32, latent=1)
    assert f8 == 8 * f1
    assert memory_per_rank(f8, 1024, 16384, 32, latent=8)["total"] <= 0.9 * 80e9 < \
        memory_per_rank(2 * f8, 1024, 16384, 32, latent=8)["total"]


def test_collective_record_wire_bytes():
    r = comm.CollectiveRecord("all_reduce", "latent", 1000, 4, "x")
    assert r.wire_bytes == 1500
    assert comm.CollectiveRecord("all_gather", "latent", 1000, 4, "x").wire_bytes == 3000
