"""train_sharded over real gloo processes against the single-process trainer (the oracle:
saeengine.train on the same tensor, started from the same SAE), resuming across meshes,
and the start-up refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from saeengine import SAE
from saeengine.distributed import LatentShardedSAE, Mesh, comm
from saeengine.distributed import checkpoint as ck
from saeengine.distributed._spawn import run
from saeengine.distributed.train import RUN_ID_FILE, train_sharded
from saeengine.errors import CheckpointError, ConfigError, InputError
from saeengine.store import ActivationWriter
from saeengine.trainer import TrainConfig, train
from saeengine.trainer.data import batch_source, init_sample
from saeengine.trainer.init import init_from_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")

D = 8
TIMEOUT = 90.0  # a hung collective fails the test instead of stalling the suite


def make_data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(256, D, generator=gen) @ torch.randn(D, D, generator=gen) + 0.5


def write_store(directory: Path, data: torch.Tensor) -> Path:
    with ActivationWriter(directory, d_in=data.shape[1], dtype="float32", shard_tokens=64) as writer:
        writer.add(data, np.arange(data.shape[0]) // 16, np.arange(data.shape[0]) % 16)
    return directory


def make_cfg(out_dir, **kw) -> TrainConfig:
    """6 steps of 16 tokens; AuxK on from step 2 (dead after 32 tokens), clipping on, no lr
    decay (so a run resumed with a larger total_tokens follows the same schedule)."""
    base = dict(d_sae=32, k=4, batch_size=16, total_tokens=96, lr=3e-3, warmup_steps=2, decay_start=1.0,
                dead_after_tokens=32, k_aux=4, clip_grad_norm=1.0, out_dir=str(out_dir), progress=False,
                log_every=1, device="cpu", checkpoint_every_tokens=32)
    return TrainConfig(**{**base, **kw})


def oracle(data, cfg: TrainConfig, folder: Path) -> tuple[SAE, list[dict]]:
    """The single-process trainer from the SAE a fresh sharded run starts from: the
    mesh-independent LatentShardedSAE init of cfg.seed, normalization and b_dec fitted by the
    trainer's own pieces on the trainer's init sample."""
    source = batch_source(data, cfg.batch_size, cfg.seed, torch.device("cpu"))
    sae_cfg = cfg.sae_config(source.d_in)
    start = SAE(sae_cfg)
    start.load_state_dict(LatentShardedSAE(sae_cfg, Mesh.single(), seed=cfg.seed).full_state_dict())
    init_from_sample(start, init_sample(source, cfg.seed), cfg.b_dec_init)
    start.save(folder / "start")
    ref_cfg = dataclasses.replace(cfg, init_from=str(folder / "start"), out_dir=str(folder / "oracle"))
    sae = train(data, ref_cfg)
    return sae, metrics(ref_cfg)


def metrics(cfg: TrainConfig) -> list[dict]:
    path = Path(cfg.out_dir) / cfg.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_sae(state: dict, ref: SAE, atol: float = 2e-5) -> None:
    for name, want in ref.state_dict().items():
        got = state[name]
        assert got.shape == want.shape, name
        assert torch.allclose(got, want, rtol=1e-4, atol=atol), (name, (got - want).abs().max().item())


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        for key in ("fvu", "auxk", "l0", "dead", "lr", "k"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key)


def _error(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the child returns what it raised
        return type(err).__name__, str(err)
    return None


# ----- world 2: meshes 1x2 and 2x1, the refusals ------------------------------------------------

def _world2(rank, world, data, tmp):
    import torch.distributed as dist

    tmp = Path(tmp)
    out = {}
    for mesh in ("data=1,latent=2", "data=2,latent=1"):
        cfg = make_cfg(tmp / mesh)
        with comm.counting() as log:
            sae = train_sharded(data, cfg, mesh)
        out[mesh] = None if sae is None else sae.state_dict()
        out[f"{mesh} collectives"] = log.by_label()
    # row-sparse Adam at 2x1 (only the rows fired anywhere in the global batch are updated)
    sae = train_sharded(data, make_cfg(tmp / "sparse", optimizer="row_sparse_adam"), "data=2,latent=1")
    out["sparse"] = None if sae is None else sae.state_dict()
    # an activation store: 6 steps at 2x1; and 3 steps at 2x1 resumed at 1x2 (the loader's global position)
    store = str(tmp / "store")
    sae = train_sharded(store, make_cfg(tmp / "store-whole"), "data=2,latent=1")
    out["store-whole"] = None if sae is None else sae.state_dict()
    train_sharded(store, make_cfg(tmp / "store-parts", total_tokens=48), "data=2,latent=1")
    sae = train_sharded(store, make_cfg(tmp / "store-parts"), "data=1,latent=2")
    out["store-parts"] = None if sae is None else sae.state_dict()
    # a finished run resumed with another lr: refused, naming the field
    out["lr"] = _error(lambda: train_sharded(data, make_cfg(tmp / "data=1,latent=2", lr=1e-3), "data=1,latent=2"))
    # another run's checkpoint put into this run's folder: refused by its run id
    other = make_cfg(tmp / "other", total_tokens=32)
    train_sharded(data, other, "data=1,latent=2")
    if rank == 0:
        mine = tmp / "data=1,latent=2" / "checkpoints"
        theirs = tmp / "other" / "checkpoints"
        for step_dir in theirs.glob("step-*"):
            shutil.rmtree(step_dir)
        shutil.copytree(mine / "step-000000006", theirs / "step-000000006")
        (theirs / ck.LATEST).write_text("step-000000006")
    dist.barrier()
    out["other"] = _error(lambda: train_sharded(data, dataclasses.replace(other, total_tokens=96), "data=1,latent=2"))
    # the ranks disagree on k
    out["k"] = _error(lambda: train_sharded(data, make_cfg(tmp / "k", k=4 + rank), "data=1,latent=2"))
    # a field that fails a local check on one rank only (architecture): named on both ranks
    out["arch"] = _error(lambda: train_sharded(data, make_cfg(tmp / "arch", architecture=("topk", "relu")[rank]),
                                               "data=1,latent=2"))
    # a global batch that leaves each data rank one token
    out["tiny"] = _error(lambda: train_sharded(data, make_cfg(tmp / "tiny", batch_size=2, total_tokens=8),
                                               "data=2,latent=1"))
    # a mesh of 4 processes in a world of 2
    out["world"] = _error(lambda: train_sharded(data, make_cfg(tmp / "w"), "data=2,latent=2"))
    return out


def test_world_of_2(tmp_path):
    """One spawn of 2 gloo processes for all of these (under pytest-xdist a module fixture
    would be built again in every worker that runs one of its tests)."""
    tmp = tmp_path / "runs"
    data = make_data()
    write_store(tmp / "store", data)
    results = run(_world2, 2, data, str(tmp), timeout=TIMEOUT, collective_timeout=30.0)
    check_meshes_match_single_process(tmp, data, results, tmp_path / "oracle")
    check_store_data_axis_and_resume_at_another_mesh(tmp, results, tmp_path / "store-oracle")
    check_changed_setting_and_other_run_refused(tmp, results)
    check_mismatched_configs_and_world_size(results)


def check_meshes_match_single_process(tmp, data, results, tmp_path):
    ref, ref_metrics = oracle(data, make_cfg(tmp_path), tmp_path)
    assert any(m["auxk"] > 0 for m in ref_metrics)  # AuxK had dead latents to work on
    for mesh in ("data=1,latent=2", "data=2,latent=1"):
        assert results[1][mesh] is None  # the SAE comes back on rank 0
        assert_same_sae(results[0][mesh], ref)
        cfg = make_cfg(tmp / mesh)
        assert_same_metrics(metrics(cfg), ref_metrics)
        saved = SAE.load(tmp / mesh / cfg.run_name)  # the export: a verified single-file SAE
        assert_same_sae(saved.state_dict(), ref)
        provenance = json.loads((tmp / mesh / cfg.run_name / "config.json").read_text())["provenance"]
        assert provenance["steps"] == 6 and provenance["mesh"] == mesh
        assert provenance["data"] == batch_source(data, 16, 0, torch.device("cpu")).identity()
        assert provenance["train_config"] == cfg.to_dict()
        counted = results[0][f"{mesh} collectives"]  # start-up decisions and init go through comm, counted
        assert {"world:broadcast_object:start", "world:broadcast:init_replicated",
                "world:all_gather_object:config_check", "world:all_gather_object:checkpoint_records"
                } <= set(counted), counted
        # the data replicas' fired stamps are MAX-reduced before a save, counted like the rest
        assert ("data:all_reduce:checkpoint_last_fired" in counted) == (mesh == "data=2,latent=1"), counted
    sparse_ref, _ = oracle(data, make_cfg(tmp_path / "s", optimizer="row_sparse_adam"), tmp_path / "s")
    assert_same_sae(results[0]["sparse"], sparse_ref)


def check_store_data_axis_and_resume_at_another_mesh(tmp, results, tmp_path):
    ref, ref_metrics = oracle(tmp / "store", make_cfg(tmp_path), tmp_path)
    assert_same_sae(results[0]["store-whole"], ref)
    assert_same_metrics(metrics(make_cfg(tmp / "store-whole")), ref_metrics)
    assert_same_sae(results[0]["store-parts"], ref)
    assert_same_metrics(metrics(make_cfg(tmp / "store-parts")), ref_metrics)
    provenance = json.loads((tmp / "store-whole" / make_cfg(tmp).run_name / "config.json").read_text())["provenance"]
    assert provenance["store"]["dir"] == str(tmp / "store")


def check_changed_setting_and_other_run_refused(tmp, results):
    for rank in (0, 1):  # every rank raises, none is left waiting
        kind, text = results[rank]["lr"]
        assert kind == "CheckpointError" and "TrainConfig.lr" in text and "0.001" in text and "0.003" in text
        kind, text = results[rank]["other"]
        assert kind == "CheckpointError" and "belongs to run" in text
    root = tmp / "other" / "checkpoints"  # the run id pinned at its start, not the copied manifest's
    saved = ck.read_manifest(root / "step-000000006")["run_id"]
    assert (root / RUN_ID_FILE).read_text() != saved


def check_mismatched_configs_and_world_size(results):
    for rank in (0, 1):
        kind, text = results[rank]["k"]
        assert kind == "ConfigError" and "k: 4 on rank 0; 5 on rank 1" in text
        kind, text = results[rank]["arch"]
        assert kind == "ConfigError" and 'architecture: "topk" on rank 0; "relu" on rank 1' in text
        kind, text = results[rank]["tiny"]
        assert kind == "ConfigError" and "batch_size=2" in text and "at least 2" in text
        kind, text = results[rank]["world"]
        assert kind == "InputError" and "data=2,latent=2" in text and "4" in text and "torchrun" in text


# ----- world 4: 2x2 uninterrupted; 2x2 -> 1x4 -> 1 process -------------------------------------

W4 = dict(d_sae=30, resample_every_tokens=48)  # uneven slices (15, 15 at 2x2; 8, 8, 7, 7 at 1x4), resampling


def _world4(rank, world, data, tmp):
    import torch.distributed as dist

    tmp = Path(tmp)
    out = {}
    sae = train_sharded(data, make_cfg(tmp / "whole", **W4), "data=2,latent=2")
    out["whole"] = None if sae is None else sae.state_dict()
    # the same run in three parts, each at another mesh (total_tokens may grow on resume)
    train_sharded(data, make_cfg(tmp / "parts", total_tokens=32, **W4), "data=2,latent=2")
    out["manifest"] = ck.read_manifest(ck.latest_sharded(tmp / "parts" / "checkpoints"))["mesh"]
    train_sharded(data, make_cfg(tmp / "parts", total_tokens=64, **W4), "data=1,latent=4")
    dist.barrier()
    if rank == 0:  # one process, no collectives, in the same folder
        sae = train_sharded(data, make_cfg(tmp / "parts", **W4), Mesh.single())
        out["parts"] = sae.state_dict()
    dist.barrier()
    return out


def test_2x2_and_resume_across_meshes(tmp_path):
    data = make_data()
    results = run(_world4, 4, data, str(tmp_path), timeout=TIMEOUT, collective_timeout=30.0)
    ref, ref_metrics = oracle(data, make_cfg(tmp_path / "ref", **W4), tmp_path / "ref")
    assert any(m["dead"] > 0 for m in ref_metrics[:3])  # resampling at step 2 has latents to replace
    assert_same_sae(results[0]["whole"], ref)
    assert_same_metrics(metrics(make_cfg(tmp_path / "whole", **W4)), ref_metrics)
    assert results[0]["manifest"] == {"data": 2, "latent": 2}
    assert_same_sae(results[0]["parts"], ref)
    assert_same_metrics(metrics(make_cfg(tmp_path / "parts", **W4)), ref_metrics)
    last = ck.read_manifest(ck.latest_sharded(tmp_path / "parts" / "checkpoints"))
    assert last["mesh"] == {"data": 1, "latent": 1} and last["step"] == 6


# ----- one process ------------------------------------------------------------------------------

def test_one_process_without_torchrun(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    data = make_data()
    with pytest.raises(InputError, match=r"torchrun --nproc-per-node 4 -m saeengine train"):
        train_sharded(data, make_cfg(tmp_path / "a"), "data=2,latent=2")
    cfg = make_cfg(tmp_path / "b", total_tokens=48)
    sae = train_sharded(data, cfg, "data=1,latent=1")
    ref, _ = oracle(data, cfg, tmp_path / "ref")
    assert_same_sae(sae.state_dict(), ref)
    with pytest.raises(ConfigError, match="architecture"):
        train_sharded(data, make_cfg(tmp_path / "c", architecture="relu"), "data=1,latent=1")


def test_single_process_checkpoint_not_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = make_data()
    cfg = make_cfg(tmp_path, total_tokens=48)
    train(data, cfg)
    with pytest.raises(CheckpointError, match="single-process trainer"):
        train_sharded(data, cfg, "data=1,latent=1")
