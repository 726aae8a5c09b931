"""`torchrun --nproc-per-node 2 -m saeengine train --mesh ...` as a real subprocess: it trains
and writes a loadable SAE; a worker SIGKILLed after the first complete checkpoint leaves the
last complete checkpoint valid, and the same command resumes from it to the uninterrupted
run's result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saeengine import SAE
from saeengine.distributed import checkpoint as ck
from saeengine.distributed._spawn import free_port
from saeengine.store import ActivationWriter

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")

D, BATCH, STEPS, EVERY = 8, 32, 120, 32 * 20  # a checkpoint every 20 steps
TORCHRUN = Path(sys.executable).with_name("torchrun")
RUN_TIMEOUT = 150


def write_store(directory: Path, n: int = 256) -> Path:
    data = torch.randn(n, D, generator=torch.Generator().manual_seed(0)) @ torch.randn(
        D, D, generator=torch.Generator().manual_seed(1))
    with ActivationWriter(directory, d_in=D, dtype="float32", shard_tokens=128) as writer:
        writer.add(data, np.arange(n) // 16, np.arange(n) % 16)
    return directory


def command(store: Path, out: Path, mesh: str = "data=1,latent=2", nproc: int = 2) -> list[str]:
    return [str(TORCHRUN), "--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "saeengine", "train", "--data", str(store), "--mesh", mesh,
            "--out-dir", str(out), "--name", "sae", "--d-sae", "32", "--k", "4", "--batch-size", str(BATCH),
            "--total-tokens", str(BATCH * STEPS), "--lr", "0.003", "--warmup-steps", "2", "--log-every", "40",
            "--dead-after-tokens", "256", "--checkpoint-every-tokens", str(EVERY), "--no-progress",
            "--device", "cpu"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SAEENGINE_DIST_TIMEOUT_S": "30", "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env(), timeout=RUN_TIMEOUT)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("dcli") / "store")


def check_uninterrupted(out: Path, done: subprocess.CompletedProcess) -> None:
    """The CLI's run: exit 0, one result line (rank 0), a loadable SAE, metrics, the last checkpoint."""
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained over mesh data=1,latent=2") == 1, done.stdout
    sae = SAE.load(out / "sae")
    assert sae.cfg.d_sae == 32 and sae.cfg.k == 4
    lines = (out / "sae" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS // 40 + 1  # rank 0 alone writes them, each log step once
    last = ck.read_manifest(ck.latest_sharded(out / "checkpoints"))
    assert last["step"] == STEPS and last["mesh"] == {"data": 1, "latent": 2}


def test_mesh_needs_torchrun(store, tmp_path):
    """A mesh of 2 processes started as one plain process: one line naming the fix, exit 1.
    (A torchrun world that does not match the mesh: tests/test_distributed_train.py.)"""
    single = [sys.executable, "-m", "saeengine", *command(store, tmp_path / "a")[11:]]
    clean = {k: v for k, v in env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run(single, capture_output=True, text=True, env=clean, timeout=RUN_TIMEOUT)
    assert done.returncode == 1
    assert "torchrun --nproc-per-node 2 -m saeengine train" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _worker(agent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (a child of the agent with RANK=rank)."""
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        return None
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def test_cli_trains_and_a_sigkill_resumes(store, tmp_path):
    """One test (under pytest-xdist a shared fixture would run again in each worker):
    the uninterrupted run, then the same command killed and run again."""
    uninterrupted = tmp_path / "whole"
    check_uninterrupted(uninterrupted, run_cli(command(store, uninterrupted)))
    out = tmp_path / "killed"
    args = command(store, out)
    agent = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while ck.latest_sharded(out / "checkpoints") is None:  # the first complete checkpoint
            assert agent.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        victim = _worker(agent.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _, stderr = agent.communicate(timeout=RUN_TIMEOUT)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    assert agent.returncode != 0, "the run finished before the kill"
    latest = ck.latest_sharded(out / "checkpoints")
    kept = ck.read_manifest(latest)
    assert 0 < kept["step"] < STEPS and kept["step"] % 20 == 0
    full = ck.load_full(latest, verify=True)  # every file's size and SHA-256 as the manifest records
    assert full.rows["sae.W_enc"].shape == (32, D)
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed, whole = SAE.load(out / "sae"), SAE.load(uninterrupted / "sae")
    for name, want in whole.state_dict().items():  # same mesh, same sums: bit for bit
        assert torch.equal(resumed.state_dict()[name], want), name
    assert (out / "sae" / "metrics.jsonl").read_text().count('"step": 0,') == 1


def test_one_process_mesh_and_usage_errors(store, tmp_path, monkeypatch, capsys):
    from saeengine.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = command(store, tmp_path / "one", mesh="data=1,latent=1")[12:]  # after "train"
    args[args.index("--total-tokens") + 1] = str(BATCH * 4)
    assert main(["train", *args]) == 0
    assert "trained over mesh data=1,latent=1" in capsys.readouterr().out
    assert SAE.load(tmp_path / "one" / "sae").cfg.d_sae == 32
    with pytest.raises(SystemExit) as bad:
        main(["train", *args[:args.index("--mesh")], "--mesh", "data=two", *args[args.index("--mesh") + 2:]])
    assert bad.value.code == 2 and "--mesh 'data=two'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as sweep:
        main(["train", *args, "--sweep", "k_aux=2,4"])
    assert sweep.value.code == 2 and "--mesh trains one SAE" in capsys.readouterr().err


def test_torchrun_world_that_does_not_match_the_mesh(store, tmp_path):
    """torchrun starts 2 processes for a mesh of 4: each rank says so, before any collective
    (no rank waits for a peer that never comes), and torchrun exits 1 quickly."""
    start = time.monotonic()
    done = run_cli(command(store, tmp_path / "w", mesh="data=2,latent=2", nproc=2))
    assert done.returncode != 0
    assert time.monotonic() - start < 60  # not the 30 s collective timeout, twice
    said = done.stderr.count("--mesh data=2,latent=2 needs data x latent = 2 x 2 = 4 processes, but torchrun "
                             "started 2")
    assert said == 2, done.stderr[-3000:]
    assert not (tmp_path / "w" / "checkpoints").exists()
