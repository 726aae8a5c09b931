"""One SAE per rank (saeengine.distributed.per_rank) against the single-process trainer: on 2
gloo ranks each SAE of a sweep (and of a several-layers run) equals, bit for bit, the one
``saeengine.train(data, cfg)`` makes alone, and lands in the folder a single-process run
uses; the summary holds each run's rank and the last line of its metrics.jsonl; a rerun
returns the finished SAEs; a rerun on other data is refused and leaves the SAEs as they
were; a rerun that fails mid-training (an error, Ctrl-C) never replaces or hides a finished
SAE, also with its unfinished folder beside it; a rerun at another world size finds the
finished leftovers of a killed job; repeated folders, a data list of the wrong length, bad
RANK / WORLD_SIZE, one rank's bad arguments and ranks given different configs or tensors
are refused on every rank; a rank without a config only joins the barrier; the CLI
(``--per-rank``) under torchrun.

Spawning costs seconds per process, so one spawned group runs every multi-rank phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import saeengine
from saeengine import TrainConfig
from saeengine.distributed import _spawn
from saeengine.distributed.per_rank import SUMMARY, WORK_DIR, assigned, plan, train_per_rank
from saeengine.errors import ConfigError, DataMismatchError, InputError
from saeengine.store import ActivationWriter
from saeengine.trainer.config import SHARED_FIELDS

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")

D, N = 8, 64


def tiny(out_dir, **overrides) -> TrainConfig:
    """4 steps of 16 tokens; latents die after 32 tokens, so AuxK acts too."""
    settings = dict(d_sae=32, k=4, batch_size=16, total_tokens=64, warmup_steps=1, lr=1e-2, dead_after_tokens=32,
                    out_dir=str(out_dir), progress=False, log_every=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def sweep(out_dir) -> list[TrainConfig]:
    """Rank 0 of 2 gets configs 0 and 2 (same seed: one sweep call); rank 1 gets 1 and 3
    (seeds 1 and 0: two calls)."""
    return [tiny(out_dir, k=4), tiny(out_dir, k=4, seed=1, name="k4-seed1"), tiny(out_dir, k=8),
            tiny(out_dir, k=16)]


def acts(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def write_store(path: Path, x: torch.Tensor) -> str:
    with ActivationWriter(path, d_in=x.shape[1], dtype="float32", shard_tokens=32) as writer:
        writer.add(x.numpy(), np.arange(len(x)) // 4, np.arange(len(x)) % 4)
    return str(path)


def states(saes) -> list[dict]:
    """State dicts as numpy arrays: tensors from a spawned rank would travel through shared
    memory, gone once the rank exits."""
    return [{k: v.detach().cpu().numpy().copy() for k, v in sae.state_dict().items()} for sae in saes]


def same(a: dict, b: dict) -> bool:
    """Bitwise equality of two state dicts (tensors or numpy arrays)."""
    a, b = ({k: torch.as_tensor(v) for k, v in d.items()} for d in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metric_lines(directory: Path) -> list[dict]:
    """metrics.jsonl without the timing (the only field that differs between two runs)."""
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]


# ----- in one process ------------------------------------------------------------------------
def test_assignment_is_a_balanced_partition_and_calls_share_data_settings(tmp_path):
    configs = [tiny(tmp_path, k=k, seed=s, name=f"k{k}-s{s}") for k in (4, 8, 16) for s in (0, 1)]
    for world in (1, 2, 4, 7):
        parts = [assigned(len(configs), r, world) for r in range(world)]
        flat = sorted(i for p in parts for i in p)
        assert flat == list(range(len(configs)))  # every config once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert all(i % world == r for r, p in enumerate(parts) for i in p)  # the documented rule
        for r in range(world):
            calls = plan(acts(N, D, 0), configs, r, world)
            assert sorted(i for c in calls for i in c) == parts[r]
            for call in calls:  # one call: one seed (a shared field); two calls: different seeds
                assert len({tuple(getattr(configs[i], f) for f in SHARED_FIELDS) for i in call}) == 1
            seeds = [configs[c[0]].seed for c in calls]
            assert len(seeds) == len(set(seeds))
    # a list of data: configs of different items never share a call, of the same item they do
    x, y = acts(N, D, 0), acts(N, D + 4, 1)
    by_seed = [tiny(tmp_path, k=4), tiny(tmp_path, k=8), tiny(tmp_path, k=4, seed=1, name="a"),
               tiny(tmp_path, k=8, seed=1, name="b")]
    assert plan([x, y, x, y], by_seed, 0, 1) == [[0], [1], [2], [3]]
    same_seed = [tiny(tmp_path, k=k) for k in (4, 8, 16)]
    assert plan([x, y, x], same_seed, 0, 1) == [[0, 2], [1]]


def test_bad_input_is_refused_before_any_training(tmp_path):
    out = tmp_path / "run"
    x = acts(N, D, 0)
    repeated = [tiny(out, k=4), tiny(out, k=8), tiny(out, k=4, seed=3), tiny(out, k=8, lr=1e-2)]
    with pytest.raises(InputError, match=r"'topk-F32-k4-lr0.01' \(configs 0, 2.*'topk-F32-k8-lr0.01' \(configs 1, 3"):
        train_per_rank(x, repeated, rank=1, world=2)
    # the same name in two out_dirs is two folders: allowed (layers with equal settings)
    assert plan([x, x], [tiny(out / "a"), tiny(out / "b")], 0, 1) == [[0], [1]]
    with pytest.raises(InputError, match="2 data items for 3 configs"):
        train_per_rank([x, x], [tiny(out, k=k) for k in (4, 8, 16)], rank=0, world=1)
    with pytest.raises(InputError, match="rank=2 of world=2"):
        train_per_rank(x, [tiny(out)], rank=2, world=2)
    with pytest.raises(InputError, match="list of TrainConfigs"):
        train_per_rank(x, tiny(out))
    with pytest.raises(InputError, match="data\\[1\\] is a dict"):
        train_per_rank([x, {}], [tiny(out, k=4), tiny(out, k=8)], rank=0, world=1)
    assert not out.exists()  # nothing was trained or written


def test_rank_world_from_the_environment(tmp_path, monkeypatch):
    """Without torch.distributed: RANK / WORLD_SIZE pick the share; with world > 1 there is
    no barrier, hence no summary; this rank's SAE still equals the single-process one."""
    x = acts(N, D, 0)
    configs = [tiny(tmp_path / "run", k=4), tiny(tmp_path / "run", k=8)]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    (sae,) = train_per_rank(x, configs)
    alone = saeengine.train(x, dataclasses.replace(configs[1], out_dir=str(tmp_path / "alone")))
    assert same(sae.state_dict(), alone.state_dict())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [WORK_DIR, configs[1].run_name]
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(InputError, match="RANK='one'"):
        train_per_rank(x, configs)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")  # read by launch.world_from_env, as --mesh does
    with pytest.raises(InputError, match="WORLD_SIZE='two'"):
        train_per_rank(x, configs)


def test_a_second_job_on_the_same_folders_is_refused(tmp_path):
    """World 1: the summary without torch.distributed; a job holding an SAE's folder (here
    this test, through the folder's lock) makes a second one raise LockedError before it
    moves anything."""
    from saeengine._lock import exclusive_lock
    from saeengine.distributed.per_rank import LOCKS
    from saeengine.errors import LockedError

    x = acts(N, D, 0)
    cfg = tiny(tmp_path / "run")
    (first,) = train_per_rank(x, [cfg], rank=0, world=1)
    summary = json.loads((tmp_path / "run" / SUMMARY).read_text())
    assert [(r["run_name"], r["rank"], r["status"]) for r in summary["runs"]] == [(cfg.run_name, 0, "done")]
    folder = tmp_path / "run" / cfg.run_name
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with exclusive_lock(tmp_path / "run" / WORK_DIR / LOCKS / cfg.run_name, "test"):
        with pytest.raises(LockedError, match="per-rank SAE folder"):
            train_per_rank(x, [dataclasses.replace(cfg, resume=False)], rank=0, world=1)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # what Ctrl-C prints: the checkpoints the rerun resumes from, or that there are none
    from saeengine.distributed.cli_per_rank import interrupted_per_rank

    assert "1 checkpoint(s) are kept under" in interrupted_per_rank(argparse.Namespace(out_dir=str(tmp_path / "run")))
    assert "before the first checkpoint" in interrupted_per_rank(argparse.Namespace(out_dir=str(tmp_path / "none")))


def folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


class Interrupt:
    """Replaces TrainStep.__call__: raise ``error`` at the ``after``-th step, once a
    checkpoint holds the run (checkpoint_every_tokens=16: one per step)."""

    def __init__(self, monkeypatch, error: BaseException, after: int = 3):
        from saeengine.trainer.step import TrainStep

        real, self.calls = TrainStep.__call__, 0

        def step(train_step, x):
            self.calls += 1
            if self.calls == after:
                raise error
            return real(train_step, x)

        monkeypatch.setattr(TrainStep, "__call__", step)


def spy_train(monkeypatch) -> list[list[str]]:
    """The run names of each saeengine.train call that per_rank makes."""
    import saeengine.trainer as trainer

    calls, real = [], trainer.train

    def train(data, configs):
        calls.append([c.run_name for c in configs])
        return real(data, configs)

    monkeypatch.setattr(trainer, "train", train)
    return calls


# train's own warning about the work folder's earlier run
@pytest.mark.filterwarnings("ignore:TrainConfig.resume=False.*holds an earlier run")
def test_a_failed_rerun_never_replaces_a_finished_sae(tmp_path, monkeypatch):
    """A finished SAE stays as it is through a rerun that raises mid-training (an error, or
    Ctrl-C) after writing checkpoints; with that run's unfinished folder beside it (both
    exist), a rerun returns the finished SAE without training, a rerun on other data is
    refused; resume=False replaces it only once the new run has finished. The provenance
    records the caller's out_dir and device."""
    x, y = acts(N, D, 0), acts(N, D, 1)
    out = tmp_path / "run"
    cfg = tiny(out, checkpoint_every_tokens=16)
    (first,) = train_per_rank(x, [cfg], rank=0, world=1)
    final = out / cfg.run_name
    before = folder_bytes(final)
    provenance = json.loads((final / "config.json").read_text())["provenance"]
    assert provenance["train_config"] == cfg.to_dict()  # out_dir and device as given, not the work folder's

    work = next((out / WORK_DIR).glob("*/run/checkpoints")).parent  # the call's work folder
    for error in (RuntimeError("disk on fire"), KeyboardInterrupt()):
        with pytest.MonkeyPatch.context() as patch:
            Interrupt(patch, error)
            with pytest.raises(type(error)), pytest.warns(UserWarning, match="replaces it once that run has finished"):
                train_per_rank(y, [dataclasses.replace(cfg, resume=False)], rank=0, world=1)
        assert folder_bytes(final) == before, type(error).__name__
        assert (work / cfg.run_name / "metrics.jsonl").exists()  # the interrupted run's own folder
        assert sorted(p.name for p in (work / "checkpoints").glob("step-*")) == ["step-000000002"]

    calls = spy_train(monkeypatch)
    (again,) = train_per_rank(x, [cfg], rank=0, world=1)  # both exist: the finished one, as it is
    assert calls == [] and same(again.state_dict(), first.state_dict()) and not again.training
    assert folder_bytes(final) == before
    with pytest.raises(DataMismatchError, match="the data differs"):
        train_per_rank(y, [cfg], rank=0, world=1)
    assert folder_bytes(final) == before and calls == []

    with pytest.warns(UserWarning, match="resume=False"):
        (fresh,) = train_per_rank(y, [dataclasses.replace(cfg, resume=False)], rank=0, world=1)
    alone = saeengine.train(y, dataclasses.replace(cfg, out_dir=str(tmp_path / "alone")))
    assert calls == [[cfg.run_name]] and same(fresh.state_dict(), alone.state_dict())
    assert same(saeengine.SAE.load(final).state_dict(), alone.state_dict())
    assert metric_lines(final) == metric_lines(tmp_path / "alone" / cfg.run_name)
    assert not list((out / WORK_DIR).glob("replaced/*"))  # the replaced SAE is gone, nothing half-left

    # a folder in the SAE's place without a saved SAE is not overwritten
    other = tiny(out, k=8)
    (out / other.run_name).mkdir()
    (out / other.run_name / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds no saved SAE"):
        train_per_rank(x, [other], rank=0, world=1)
    assert [p.name for p in (out / other.run_name).iterdir()] == ["notes.txt"]


def test_a_rerun_at_another_world_size_finds_the_leftovers(tmp_path, monkeypatch, caplog):
    """World 2 (no process group: rank= / world=): rank 0's sweep call [0, 2] is killed
    after train returned, before its SAEs were moved into place; rank 1's [1, 3] is killed
    mid-training. A rerun at world 1 moves 0 and 2 into place without training them, warns
    that the unfinished 1 and 3 start over, and trains those: all equal single-process
    runs, with the caller's out_dir in their provenance."""
    from saeengine.distributed import per_rank

    x = acts(N, D, 0)
    out = tmp_path / "run"
    configs = [tiny(out, k=k, checkpoint_every_tokens=16) for k in (2, 4, 8, 16)]
    names = [c.run_name for c in configs]
    with pytest.MonkeyPatch.context() as patch:  # killed between train's return and the first move
        patch.setattr(per_rank, "_place", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            train_per_rank(x, configs, rank=0, world=2)
    with pytest.MonkeyPatch.context() as patch:
        Interrupt(patch, KeyboardInterrupt(), after=5)  # a sweep of 2: the 3rd step
        with pytest.raises(KeyboardInterrupt):
            train_per_rank(x, configs, rank=1, world=2)
    assert not any((out / n).exists() for n in names)  # nothing in place yet

    calls = spy_train(monkeypatch)
    with caplog.at_level("WARNING", logger="saeengine"):
        saes = train_per_rank(x, configs, rank=0, world=1)
    assert calls == [[names[1], names[3]]]  # 0 and 2 were found finished
    unfinished = [r.getMessage() for r in caplog.records if "unfinished run" in r.getMessage()]
    assert len(unfinished) == 2 and all("world 2" in m for m in unfinished)
    for cfg, sae in zip(configs, saes):
        alone = saeengine.train(x, dataclasses.replace(cfg, out_dir=str(tmp_path / "alone" / cfg.run_name)))
        assert same(sae.state_dict(), alone.state_dict()), cfg.run_name
        assert same(saeengine.SAE.load(out / cfg.run_name).state_dict(), alone.state_dict())
        recorded = json.loads((out / cfg.run_name / "config.json").read_text())["provenance"]["train_config"]
        assert recorded == cfg.to_dict(), cfg.run_name
    assert not list((out / WORK_DIR).glob(f"*/run/{names[0]}"))  # moved, not copied


# ----- 2 gloo ranks ----------------------------------------------------------------------------
def _world2(rank: int, world: int, root: str, store: str, other: str, layers: list) -> dict:
    """Every phase on one group: the sweep on a store, its rerun, a rerun on other data,
    the layers, one config for two ranks, different configs on the ranks, the CLI's
    run_per_rank_cli (in the group that exists: without one it joins torchrun's, which
    test_torchrun_per_rank_subprocess covers)."""
    import contextlib
    import io

    from saeengine.cli import build_parser
    from saeengine.cli_commands import train_configs
    from saeengine.distributed import comm
    from saeengine.distributed.cli_per_rank import run_per_rank_cli

    out: dict = {"other_data": None, "mismatch": None, "other_tensor": "", "bad_args": None}
    with comm.counting() as log:
        out["sweep"] = states(train_per_rank(store, sweep(Path(root) / "sweep")))
    out["collectives"] = [(r.op, r.what) for r in log]
    if rank == 0:  # rank 0 writes it after the barrier, before train_per_rank returns
        out["summary"] = (Path(root) / "sweep" / SUMMARY).read_text()
    out["rerun"] = states(train_per_rank(store, sweep(Path(root) / "sweep")))
    try:
        train_per_rank(other, sweep(Path(root) / "sweep"))
    except DataMismatchError as err:
        out["other_data"] = str(err)
    out["layers"] = states(train_per_rank(layers, [tiny(Path(root) / "layer0", k=4), tiny(Path(root) / "layer1")]))
    out["one"] = states(train_per_rank(layers[0], [tiny(Path(root) / "one", k=8)]))
    mine = [tiny(Path(root) / "mismatch", k=4), tiny(Path(root) / "mismatch", k=8 if rank == 0 else 16)]
    try:
        train_per_rank(layers[0], mine)
    except ConfigError as err:
        out["mismatch"] = str(err)
    try:  # the same shape and dtype on both ranks, other values on rank 1
        train_per_rank(layers[0] + rank, [tiny(Path(root) / "mismatch", k=4)])
    except ConfigError as err:
        out["other_tensor"] = str(err)
    try:  # rank 1 alone gets a bad argument: nobody may wait for it in the config gather
        train_per_rank(layers[0], [tiny(Path(root) / "mismatch")] if rank == 0 else tiny(Path(root) / "mismatch"))
    except InputError as err:
        out["bad_args"] = (type(err).__name__, str(err))
    args = build_parser().parse_args(_train_argv(store, Path(root) / "cli"))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        out["cli"] = run_per_rank_cli(args, train_configs(args))
    out["cli_printed"] = printed.getvalue()
    return out


def test_two_ranks_equal_single_process_training(tmp_path):
    x = acts(N, D, 0)
    store = write_store(tmp_path / "store", x)
    other = write_store(tmp_path / "other", acts(N, D, 5))
    layers = [acts(N, D, 1), acts(N, D + 4, 2)]
    root = tmp_path / "ranks"
    reports = _spawn.run(_world2, 2, str(root), store, other, layers, timeout=150)

    configs = sweep(root / "sweep")
    alone = {i: saeengine.train(store, dataclasses.replace(c, out_dir=str(tmp_path / f"alone{i}")))
             for i, c in enumerate(configs)}
    for rank, report in enumerate(reports):
        mine = [i for i in range(len(configs)) if i % 2 == rank]
        assert len(report["sweep"]) == len(mine)
        for i, got, again in zip(mine, report["sweep"], report["rerun"]):
            assert same(got, alone[i].state_dict()), configs[i].run_name
            assert same(again, got)  # the rerun resumed the finished runs: the same SAEs
        # at start: one gather of the start-up errors, one of the configs; one at the end (summary + barrier)
        assert report["collectives"] == [("all_gather_object", "per_rank_start"), ("all_gather_object", "config_check"),
                                         ("all_gather_object", "per_rank_summary")]
        assert report["other_data"] is not None and "the data differs" in report["other_data"]
        assert "configs[1].k: 8 on rank 0; 16 on rank 1" in report["mismatch"]
        # same shape and dtype, other values: told apart by the SHA-256
        assert "data: " in report["other_tensor"] and "sha256" in report["other_tensor"]
    # one rank's bad arguments: its own InputError there, an InputError naming it on the other
    assert "list of TrainConfigs" in reports[1]["bad_args"][1] and reports[1]["bad_args"][0] == "InputError"
    assert reports[0]["bad_args"][0] == "InputError"
    assert "failed on rank 1; rank 1: InputError: train_per_rank takes a list" in reports[0]["bad_args"][1]

    # the single-process layout: each SAE, and its metric lines, in sweep/<name>/
    for i, cfg in enumerate(configs):
        folder = root / "sweep" / cfg.run_name
        assert same(saeengine.SAE.load(folder).state_dict(), alone[i].state_dict())  # also after the refused rerun
        assert metric_lines(folder) == metric_lines(tmp_path / f"alone{i}" / cfg.run_name)
    assert sorted(p.name for p in (root / "sweep").iterdir()) == sorted(
        [WORK_DIR, SUMMARY, *(c.run_name for c in configs)])

    summary = json.loads(reports[0]["summary"])
    assert summary["world"] == 2 and summary["complete"] and summary["idle_ranks"] == []
    assert [r["run_name"] for r in summary["runs"]] == [c.run_name for c in configs]
    for i, run in enumerate(summary["runs"]):
        folder = root / "sweep" / configs[i].run_name
        last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
        assert run["rank"] == i % 2 and run["status"] == "done" and run["metrics"] == last
        assert last["step"] == configs[i].steps - 1
        assert Path(run["directory"]) == folder

    # the refused rerun on other data: its summary says so, run by run
    refused = json.loads((root / "sweep" / SUMMARY).read_text())
    assert not refused["complete"] and [r["rank"] for r in refused["runs"]] == [0, 1, 0, 1]
    assert all(r["status"] == "failed" and r["metrics"] is None for r in refused["runs"])
    assert "the data differs" in refused["runs"][0]["error"] and "not run" in refused["runs"][3]["error"]

    # several layers at once: data[i] for config i, d_in 8 and 12
    for i, (x_i, name) in enumerate(zip(layers, ["layer0", "layer1"])):
        cfg = tiny(root / name, k=4) if i == 0 else tiny(root / name)
        got = reports[i]["layers"]
        assert len(got) == 1 and tuple(got[0]["W_enc"].shape) == (32, x_i.shape[1])
        ref = saeengine.train(x_i, dataclasses.replace(cfg, out_dir=str(tmp_path / f"alone-{name}")))
        assert same(got[0], ref.state_dict())
        assert same(saeengine.SAE.load(root / name / cfg.run_name).state_dict(), ref.state_dict())

    # one config for two ranks: rank 1 trains nothing; the summary says it was idle
    assert reports[1]["one"] == [] and len(reports[0]["one"]) == 1
    one = json.loads((root / "one" / SUMMARY).read_text())
    assert one["idle_ranks"] == [1] and [r["rank"] for r in one["runs"]] == [0]
    assert not (root / "mismatch").exists()  # refused before any training

    # the command line's runner: 4 configs (k x auxk), rank 0 trains 0 and 2 as one sweep
    assert [r["cli"] for r in reports] == [0, 0]
    check_cli_run({r: reports[r]["cli_printed"] for r in (0, 1)}, _train_argv(store, root / "cli"),
                  tmp_path / "cli-alone")


# ----- the command line ------------------------------------------------------------------------
def _train_argv(store: str, out_dir: Path, *sweeps: str) -> list[str]:
    sweeps = sweeps or ("k=4,8", "auxk=true,false")
    return ["train", "--data", store, *(w for sweep in sweeps for w in ("--sweep", sweep)), "--d-sae", "32",
            "--batch-size", "16", "--total-tokens", "64", "--warmup-steps", "1", "--lr", "0.01",
            "--out-dir", str(out_dir), "--no-progress", "--log-every", "1"]


def _has_hook() -> bool:
    from saeengine.cli import build_parser

    args, _ = build_parser().parse_known_args(["train", "--data", "STORE", "--per-rank"])
    return hasattr(args, "per_rank")


def cli_configs(argv: list[str]) -> list[TrainConfig]:
    from saeengine.cli import build_parser
    from saeengine.cli_commands import train_configs

    return train_configs(build_parser().parse_args(argv))


def check_cli_run(report: dict, argv: list[str], alone_root: Path) -> None:
    """What run_per_rank_cli left: the summary, each SAE equal to train(store, cfg) alone,
    and each rank's line per SAE."""
    configs = cli_configs(argv)
    store, out = argv[argv.index("--data") + 1], Path(configs[0].out_dir)
    summary = json.loads((out / SUMMARY).read_text())
    assert [r["run_name"] for r in summary["runs"]] == [c.run_name for c in configs]
    assert [r["rank"] for r in summary["runs"]] == [i % 2 for i in range(len(configs))] and summary["complete"]
    for cfg, run in zip(configs, summary["runs"]):
        alone = saeengine.train(store, dataclasses.replace(cfg, out_dir=str(alone_root / cfg.run_name)))
        assert same(saeengine.SAE.load(out / cfg.run_name).state_dict(), alone.state_dict()), cfg.run_name
        assert f"[rank {run['rank']}/2] {cfg.run_name}: 32 latents | FVU " in report[run["rank"]]


def test_cli_refuses_mesh_with_per_rank_and_a_missing_store(tmp_path):
    from saeengine.cli import build_parser
    from saeengine.cli_failures import UsageError
    from saeengine.distributed.cli_per_rank import add_per_rank_options, run_per_rank_cli

    parser = argparse.ArgumentParser()
    add_per_rank_options(parser)
    assert parser.parse_args(["--per-rank"]).per_rank and not parser.parse_args([]).per_rank
    args = build_parser().parse_args(_train_argv(str(tmp_path / "store"), tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no such activation store"):
        run_per_rank_cli(args, cli_configs(_train_argv(str(tmp_path / "store"), tmp_path / "out")))
    args.mesh = "data=2"
    with pytest.raises(UsageError, match="--per-rank and --mesh data=2"):
        run_per_rank_cli(args, [])
    args.mesh, args.data = None, str(tmp_path)
    with pytest.MonkeyPatch.context() as env:  # launch's reading of torchrun's environment
        env.setenv("WORLD_SIZE", "2")
        env.delenv("MASTER_ADDR", raising=False)
        with pytest.raises(InputError, match="MASTER_ADDR"):
            run_per_rank_cli(args, cli_configs(_train_argv(str(tmp_path), tmp_path / "out")))
        env.setenv("WORLD_SIZE", "x")
        with pytest.raises(InputError, match="WORLD_SIZE='x'"):
            run_per_rank_cli(args, cli_configs(_train_argv(str(tmp_path), tmp_path / "out")))
    if _has_hook():  # through the command line: a usage error, exit code 2
        from saeengine.cli import main

        with pytest.raises(SystemExit) as exit_:
            main([*_train_argv(str(tmp_path), tmp_path / "out"), "--per-rank", "--mesh", "data=2"])
        assert exit_.value.code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not _has_hook(), reason="saeengine train has no --per-rank flag yet (the cli.py hook)")
def test_torchrun_per_rank_subprocess(tmp_path):
    store = write_store(tmp_path / "store", acts(N, D, 0))
    argv = _train_argv(store, tmp_path / "torchrun", "k=4,8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(saeengine.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_spawn.free_port()), "-m", "saeengine", *argv, "--per-rank"],
                          capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_cli_run({0: done.stdout, 1: done.stdout}, argv, tmp_path / "alone")
