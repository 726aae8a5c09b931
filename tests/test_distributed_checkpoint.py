"""Sharded training checkpoints (saeengine.distributed.checkpoint): a checkpoint saved at
data=2,latent=2 reloads at latent=4 and at one process with identical full tensors, into
full SAEs and into latent-sharded modules, resumes bit for bit, exports to a single-file
SAE; real gloo processes save it, and a rank SIGKILLed between its shard and the
manifest leaves the checkpoint before it loadable; bad input is refused naming the file.

The oracle is the single-process training state itself (state_dict slices), never the
checkpoint code.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.distributed import checkpoint as ck
from saeengine.distributed.mesh import Mesh, MeshSpec, latent_slices
from saeengine.errors import CheckpointError, ConfigError, InputError
from saeengine.optim import RowSparseAdam

F, D, RUN = 10, 6, "run-a"
CONFIG = {"d_sae": F, "k": 2, "lr": 1e-3, "mesh": "data=2,latent=2"}


# ----- states the tests compare against ---------------------------------------------------
def trained(optimizer: str = "row_sparse_adam", steps: int = 3):
    """A full SAE trained a few single-process steps, with its TrainStep (optimizer state,
    dead-latent counters): the reference every reload is compared with."""
    from saeengine.trainer.config import TrainConfig
    from saeengine.trainer.step import TrainStep

    cfg = TrainConfig(d_sae=F, k=2, batch_size=16, lr=1e-2, optimizer=optimizer, device="cpu", backend="torch",
                      dead_after_tokens=32, warmup_steps=0, auxk=True)
    sae = SAE(cfg.sae_config(D), seed=0)
    step = TrainStep(sae, cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        step(torch.randn(16, D, generator=gen))
    return cfg, sae, step


def seeded():
    """A full SAE, RowSparseAdam state and counters filled from seeded generators (the same
    bits in any process, whatever its thread count): the gloo test's reference."""
    gen = torch.Generator().manual_seed(5)
    sae = SAE(SAEConfig(d_in=D, d_sae=F, k=2, normalization="mean_norm"), seed=3)
    opt = RowSparseAdam(sae, lr=1e-3)
    with torch.no_grad():
        for p in (sae.b_enc, sae.b_dec, sae.norm_mean):
            p.copy_(torch.randn(p.shape, generator=gen))
        sae.norm_scale.fill_(2.5)
        for s in opt.state.values():
            s["m"].copy_(torch.randn(s["m"].shape, generator=gen))
            s["v"].copy_(torch.rand(s["v"].shape, generator=gen))
    opt.step_count = 7
    last_fired = torch.randint(0, 100, (F,), generator=gen)
    return sae, opt, last_fired


def full_state(sae, optimizer, last_fired) -> dict[str, torch.Tensor]:
    """Every tensor of a single-process training state, by a flat name (the oracle)."""
    out = {f"sae.{n}": t for n, t in sae.state_dict().items()}
    opt = optimizer.state_dict()
    if "param_groups" in opt:  # torch Adam: by parameter index
        names = [n for n, _ in sae.named_parameters()]
        for i, s in opt["state"].items():
            out.update({f"opt.{names[i]}.{k}": v for k, v in s.items()})
    else:
        out.update({f"opt.{n}.{k}": v for n, s in opt["state"].items() for k, v in s.items()})
    out["last_fired"] = last_fired
    return out


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def save_2x2(root: Path, sae, optimizer, last_fired, step: int = 3, config=CONFIG) -> Path:
    """The files four ranks of data=2,latent=2 write, made in this process (one shard per
    latent slice: the data replicas hold the same rows)."""
    shards = [ck.shard_from_training(sae, optimizer, last_fired, lo=lo, hi=hi, counters={"step": step})
              for lo, hi in latent_slices(F, 2)]
    return ck.save_sharded_local(root, step, shards, run_id=RUN, config=config, mesh=(2, 2),
                                 extra={"loader": {"epoch": 0, "batch_in_epoch": step}})


def fresh_full(cfg, optimizer: str):
    from saeengine.trainer.step import TrainStep

    sae = SAE(cfg.sae_config(D), seed=99)  # other weights: loading must overwrite them all
    return sae, TrainStep(sae, cfg)


# ----- in one process -----------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["row_sparse_adam", "adam"])
def test_saved_at_2x2_reloads_at_1x4_and_one_process(tmp_path, optimizer):
    cfg, sae, step = trained(optimizer)
    reference = full_state(sae, step.optimizer, step.last_fired)
    path = save_2x2(tmp_path / "ckpt", sae, step.optimizer, step.last_fired)
    assert path.name == "step-000000003" and (tmp_path / "ckpt" / ck.LATEST).read_text() == path.name
    assert sorted(p.name for p in path.iterdir()) == [
        "latent-00000-of-00002.safetensors", "latent-00001-of-00002.safetensors", ck.MANIFEST, ck.REPLICATED_FILE]

    # latent=4 (uneven slices 3,3,2,2 that cut across the saved 5,5): each slice's rows are the
    # reference's rows, and every tensor that is not latent-indexed is the reference's whole.
    row_names = {"sae.W_enc", "sae.b_enc", "sae.W_dec", "last_fired"}
    for lo, hi in [(0, 3), (3, 6), (6, 8), (8, 10)]:
        shard = ck.load_shard(path, lo, hi, run_id=RUN, config=CONFIG)
        for name in row_names:
            assert torch.equal(shard.rows[name], reference[name][lo:hi]), (name, lo, hi)
        moments = {n: t for n, t in shard.rows.items() if n.startswith("optim.")}
        assert len(moments) == 6  # m/v (exp_avg/exp_avg_sq) of W_enc, b_enc, W_dec
        for name, t in moments.items():
            param, key = name.split(".")[-2:]
            assert torch.equal(t, reference[f"opt.{param}.{key}"][lo:hi]), name
        assert torch.equal(shard.replicated["sae.b_dec"], reference["sae.b_dec"])

    # one process: the whole state, restored into a fresh SAE + TrainStep, equals the reference,
    # and the next step of both is the same bit for bit (a resume continues the run exactly).
    whole = ck.load_full(path, run_id=RUN, config=CONFIG)
    assert whole.meta["step"] == 3 and whole.meta["extra"]["loader"]["batch_in_epoch"] == 3
    sae2, step2 = fresh_full(cfg, optimizer)
    counters = ck.apply_to_training(whole, sae2, step2.optimizer, step2.last_fired)
    assert counters == {"step": 3}
    assert_same(full_state(sae2, step2.optimizer, step2.last_fired), reference)
    step2.tokens_seen, step2.steps_done = step.tokens_seen, step.steps_done
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(7))
    step(x), step2(x)
    assert_same(full_state(sae2, step2.optimizer, step2.last_fired), full_state(sae, step.optimizer, step.last_fired))


def test_export_equals_the_gathered_sae(tmp_path):
    cfg, sae, step = trained()
    path = save_2x2(tmp_path / "ckpt", sae, step.optimizer, step.last_fired)
    out = ck.export_sae(path, tmp_path / "single", run_id=RUN)
    loaded = SAE.load(out)  # the single-file format, verified by its own loader
    assert loaded.cfg == sae.cfg
    assert_same(loaded.state_dict(), sae.state_dict())
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(x, backend="torch").recon, sae(x, backend="torch").recon)
    # what the export reads: the SAE's tensors only, the same bits as a full load's
    full, light = ck.load_full(path, run_id=RUN), ck.load_full(path, run_id=RUN, weights_only=True)
    assert any(not name.startswith("sae.") for name in {**full.rows, **full.replicated})
    assert sorted({**light.rows, **light.replicated}) == sorted(
        name for name in {**full.rows, **full.replicated} if name.startswith("sae."))
    for name, t in {**light.rows, **light.replicated}.items():
        assert torch.equal(t, {**full.rows, **full.replicated}[name]), name


def test_latent_sharded_modules_roundtrip_across_meshes(tmp_path):
    """Saved from full-SAE slices at 2x2, loaded into four LatentShardedSAE slices with
    their own DenseAdam (another parameter order), saved from those at 1x4, gathered at
    one process: the reference's tensors throughout."""
    from saeengine.distributed import LatentShardedSAE
    from saeengine.optim import DenseAdam

    cfg, sae, step = trained("adam")
    reference = full_state(sae, step.optimizer, step.last_fired)
    first = save_2x2(tmp_path / "a", sae, step.optimizer, step.last_fired)
    shards = []
    for r in range(4):
        mesh = Mesh(MeshSpec(1, 4), r, 0, r)
        local = LatentShardedSAE(sae.cfg, mesh, seed=11)
        opt = DenseAdam(local, lr=1e-2)
        opt.adam.step()  # torch Adam holds state only after a step; loading replaces it
        fired = torch.zeros(local.hi - local.lo, dtype=torch.int64)
        ck.apply_to_training(ck.load_sharded(first, mesh, run_id=RUN), local, opt, fired)
        lo, hi = local.lo, local.hi
        assert torch.equal(local.W_enc.detach(), reference["sae.W_enc"][lo:hi])
        assert torch.equal(fired, reference["last_fired"][lo:hi])
        assert torch.equal(opt.adam.state[local.W_dec]["exp_avg_sq"], reference["opt.W_dec.exp_avg_sq"][lo:hi])
        shards.append(ck.shard_from_training(local, opt, fired, lo=lo, hi=hi, counters={"step": 3}))
    second = ck.save_sharded_local(tmp_path / "b", 3, shards, run_id=RUN, config=CONFIG)
    sae2, step2 = fresh_full(cfg, "adam")
    ck.apply_to_training(ck.load_full(second), sae2, step2.optimizer, step2.last_fired)
    assert_same(full_state(sae2, step2.optimizer, step2.last_fired), reference)


def test_keeps_the_last_complete_checkpoint_and_a_killed_save_is_never_read(tmp_path):
    sae, opt, fired = seeded()
    root = tmp_path / "ckpt"
    save_2x2(root, sae, opt, fired, step=1)
    # a save of step 2 that stopped after one shard: a hidden folder without manifest
    tmp = ck.begin_save(root, 2)
    shard = ck.shard_from_training(sae, opt, fired, lo=0, hi=5)
    ck.write_shard(tmp, shard, latent_rank=0, latent_size=2, rank=0, run_id=RUN, step=2)
    assert ck.latest_sharded(root).name == "step-000000001"
    with pytest.raises(CheckpointError, match="resume from the folder LATEST names"):
        ck.read_manifest(tmp)
    # the next save commits, removes the older checkpoint and the hidden folder
    save_2x2(root, sae, opt, fired, step=3)
    assert sorted(p.name for p in root.iterdir()) == [ck.LATEST, "step-000000003"]
    # a commit killed after its rename but before LATEST moved: the newest committed one
    (root / ck.LATEST).write_text("step-000000001")
    assert ck.latest_sharded(root).name == "step-000000003"


# ----- bad input ----------------------------------------------------------------------------
def test_refuses_another_run_another_config_and_an_edited_manifest(tmp_path):
    sae, opt, fired = seeded()
    path = save_2x2(tmp_path / "ckpt", sae, opt, fired)
    with pytest.raises(CheckpointError, match=r"belongs to run run-a but this run is run-b; point the run"):
        ck.load_shard(path, 0, F, run_id="run-b")
    with pytest.raises(CheckpointError, match=r"another config: lr=0.01 here, 0.001 in the checkpoint"):
        ck.load_full(path, config={**CONFIG, "lr": 1e-2})
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["config"]["k"] = 4
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match its recorded SHA-256"):
        ck.load_full(path)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["config"]["k"] = 2
    manifest["files"][1]["lo"] = 6
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"leave a gap at latent 5 \(latent-00001-of-00002.safetensors"):
        ck.load_full(path)


def test_refuses_a_corrupt_or_missing_shard_naming_the_file(tmp_path):
    sae, opt, fired = seeded()
    path = save_2x2(tmp_path / "ckpt", sae, opt, fired)
    shard_file = path / "latent-00001-of-00002.safetensors"
    data = bytearray(shard_file.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor's data; the size stays
    shard_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"latent-00001-of-00002.safetensors: corrupted: checksum mismatch.*"
                                              r"restore it from a backup, or resume from an earlier checkpoint"):
        ck.load_shard(path, 3, 7)
    assert torch.equal(ck.load_shard(path, 0, 5).rows["sae.W_enc"], sae.W_enc.detach()[:5])  # the other file is fine
    shard_file.unlink()
    with pytest.raises(CheckpointError, match=r"latent-00001-of-00002.safetensors: missing; .*\[5, 10\) written by "
                                              r"rank 1\)\. Copy it from the machine that wrote it"):
        ck.export_sae(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_mesh_that_does_not_match_the_world(tmp_path):
    sae, opt, fired = seeded()
    with pytest.raises(InputError, match=r"data=2,latent=2 needs 4 processes but the world size is 3"):
        ck.check_world((2, 2), 3)
    shards = [ck.shard_from_training(sae, opt, fired, lo=lo, hi=hi) for lo, hi in latent_slices(F, 3)]
    with pytest.raises(ConfigError, match="3 latent slices for a mesh with latent=2"):
        ck.save_sharded_local(tmp_path / "c", 1, shards, run_id=RUN, mesh=(2, 2))
    assert not list((tmp_path / "c").glob("step-*"))
    path = save_2x2(tmp_path / "d", sae, opt, fired)
    with pytest.raises(InputError, match="needs 4 processes but the world size is 2"):
        ck.load_sharded(path, _WrongWorld())


class _WrongWorld:
    """A mesh object that claims data=2,latent=2 in a world of 2 (a hand-built mesh)."""

    data_size, latent_size, world_size, latent_rank = 2, 2, 2, 0


def test_a_failed_write_commits_nothing(tmp_path):
    """save_sharded in a one-process gloo group: a rank's failure between its file and the
    commit (a full disk, say) is raised and leaves the checkpoint before the latest."""
    import torch.distributed as dist

    sae, opt, fired = seeded()
    shard = ck.shard_from_training(sae, opt, fired, lo=0, hi=F, counters={"step": 1})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        mesh = Mesh(MeshSpec(1, 1), 0, 0, 0)
        root = tmp_path / "ckpt"
        assert ck.save_sharded(root, 1, shard, mesh, run_id=RUN).name == "step-000000001"

        def disk_full():
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space left"):
            ck.save_sharded(root, 2, shard, mesh, run_id=RUN, on_written=disk_full)
        assert ck.latest_sharded(root).name == "step-000000001"
        assert ck.load_full(ck.latest_sharded(root), run_id=RUN).meta["step"] == 1
    finally:
        dist.destroy_process_group()


# ----- real processes (gloo) ----------------------------------------------------------------
def _worker(rank: int, world: int, root: str) -> None:
    """One rank: a wrong mesh is refused; save step 1 at data=2,latent=2; load this rank's
    slice back; then save step 2, where rank 1 stops (and is SIGKILLed by the parent)
    after writing its shard, before the manifest."""
    import torch.distributed as dist

    from saeengine.distributed import init_mesh

    torch.set_num_threads(1)
    work = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{work}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    mesh = init_mesh("data=2,latent=2")
    result: dict = {"rank": rank}
    sae, opt, fired = seeded()
    lo, hi = mesh.latent_slice(F)
    # the replicas' counters differ (each saw its own part of the batch): the saved ones are the latest stamps
    shard = ck.shard_from_training(sae, opt, fired + 1000 * mesh.data_rank, lo=lo, hi=hi, counters={"step": 1})
    try:
        ck.save_sharded(work / "ckpt", 1, shard, Mesh(MeshSpec(1, 2), rank, 0, rank % 2), run_id=RUN)
    except InputError as err:
        result["wrong_mesh"] = str(err)
    path = ck.save_sharded(work / "ckpt", 1, shard, mesh, run_id=RUN, config=CONFIG)
    back = ck.load_sharded(path, mesh, run_id=RUN, config=CONFIG)
    result["slice"] = [back.lo, back.hi]
    result["same"] = sorted(back.rows) == sorted(shard.rows) and all(
        torch.equal(back.rows[n], t) for n, t in shard.rows.items() if n != "last_fired")
    result["fired"] = torch.equal(back.rows["last_fired"], fired[lo:hi] + 1000)
    (work / f"result-{rank}.json").write_text(json.dumps(result))
    dist.barrier()

    def stop_here():
        if rank == 1:
            (work / "rank1-wrote-its-shard").write_text("")
            time.sleep(120)

    ck.save_sharded(work / "ckpt", 2, shard, mesh, run_id=RUN, config=CONFIG, on_written=stop_here)


def _run_worker(rank: int, world: int, root: str) -> None:
    try:
        _worker(rank, world, root)
    except BaseException:  # the parent reads it when the rank ends early
        import traceback

        (Path(root) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise


def _wait_for(paths: list[Path], procs, root: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        dead = [i for i, p in enumerate(procs) if not p.is_alive()]
        if dead or time.monotonic() > deadline:
            errors = {p.name: p.read_text() for p in root.glob("error-*.txt")}
            raise AssertionError(f"ranks {dead} ended early, or the ranks timed out; their errors: {errors}")
        time.sleep(0.05)


def test_gloo_save_reload_and_a_rank_killed_mid_save(tmp_path):
    import multiprocessing

    # A fork server that imported torch once forks the four ranks: no rank imports torch again
    # (a fork of this test process itself could inherit its OpenMP threads' locks).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "saeengine.distributed.checkpoint", __name__])
    procs = [ctx.Process(target=_run_worker, args=(r, 4, str(tmp_path)), daemon=True) for r in range(4)]
    for p in procs:
        p.start()
    try:
        _wait_for([tmp_path / f"result-{r}.json" for r in range(4)] + [tmp_path / "rank1-wrote-its-shard"], procs,
                  tmp_path, 120)
        os.kill(procs[1].pid, signal.SIGKILL)  # mid-save: its shard is written, the manifest is not
        procs[1].join(timeout=10)
        assert procs[1].exitcode == -signal.SIGKILL
    finally:
        for p in procs:  # the others wait on the dead rank in a collective: end them (our own children)
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(4)]
    assert all("needs 2 processes but the world size is 4" in r["wrong_mesh"] for r in results)
    assert [r["slice"] for r in results] == [[0, 5], [5, 10], [0, 5], [5, 10]]
    assert all(r["same"] and r["fired"] for r in results)

    root = tmp_path / "ckpt"
    stale = root / ".step-000000002.tmp"
    assert (stale / "latent-00001-of-00002.safetensors").is_file() and not (stale / ck.MANIFEST).exists()
    latest = ck.latest_sharded(root)
    assert latest.name == "step-000000001"
    # what the killed save left is never read: step 1 reloads whole at one process ...
    sae, opt, fired = seeded()
    reference = full_state(sae, opt, fired + 1000)
    sae2 = SAE(sae.cfg, seed=42)
    opt2 = RowSparseAdam(sae2, lr=1e-3)
    fired2 = torch.zeros(F, dtype=torch.int64)
    assert ck.apply_to_training(ck.load_full(latest, run_id=RUN, config=CONFIG), sae2, opt2, fired2) == {"step": 1}
    assert_same(full_state(sae2, opt2, fired2), reference) and opt2.step_count == 7
    # ... and at latent=4, with the reference's rows
    for r, (lo, hi) in enumerate(latent_slices(F, 4)):
        shard = ck.load_sharded(latest, Mesh(MeshSpec(1, 4), r, 0, r), run_id=RUN)
        assert torch.equal(shard.rows["sae.W_dec"], sae.W_dec.detach()[lo:hi])
    assert_same(SAE.load(ck.export_sae(latest, tmp_path / "single")).state_dict(), sae.state_dict())
    # the resumed run saves step 2 again: committed, the stale folder and step 1 gone
    shards = [ck.shard_from_training(sae2, opt2, fired2, lo=lo, hi=hi, counters={"step": 2})
              for lo, hi in latent_slices(F, 4)]
    ck.save_sharded_local(root, 2, shards, run_id=RUN, config=CONFIG, mesh=(1, 4))
    assert sorted(p.name for p in root.iterdir()) == [ck.LATEST, "step-000000002"]
