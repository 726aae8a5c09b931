"""Faults during training (issue 14): SIGKILLs at random moments, one after another on the
same run folder, then a resume that ends bit for bit as the uninterrupted run; a second
trainer on a run folder in use (it fails at once, the first finishes unharmed); a full disk
during a checkpoint, on a real small tmpfs and with a simulated ENOSPC, then a resume after
space is freed. (tests/test_resume.py kills at each chosen point of the checkpoint write,
tests/test_trainer.py kills a CLI process once.)

The trainers are forked processes (no second import of torch) on one thread, the torch
backend on the CPU, so that every process computes the same numbers."""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import saeengine
from saeengine import TrainConfig
from saeengine._lock import is_locked
from saeengine.errors import DiskFullError, LockedError
from saeengine.trainer import checkpoints
from saeengine.trainer.checkpoints import latest_checkpoint

BATCH = 64
KILL_STEPS, KILL_EVERY = 300, 10    # the randomly killed run: short steps, many checkpoints
DISK_STEPS, DISK_EVERY = 20, 5      # the disk-full run: few steps, large checkpoints
FORK = multiprocessing.get_context("fork")


# The child processes train on one thread: so does the test (the same reductions).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randn(4096, 16, generator=torch.Generator().manual_seed(3))


def kill_config(out_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(d_sae=64, k=3, total_tokens=KILL_STEPS * BATCH, batch_size=BATCH, lr=3e-3,
                                 warmup_steps=5, dead_after_tokens=8 * BATCH, device="cpu", backend="torch",
                                 out_dir=str(out_dir), name="sae", progress=False, log_every=7,
                                 checkpoint_every_tokens=KILL_EVERY * BATCH), **overrides})


def disk_config(out_dir: Path) -> TrainConfig:
    """Checkpoints of about 0.8 MB (2048 x 16 weights with their Adam moments)."""
    return TrainConfig(d_sae=2048, k=4, total_tokens=DISK_STEPS * BATCH, batch_size=BATCH, lr=3e-3, warmup_steps=2,
                       device="cpu", backend="torch", out_dir=str(out_dir), name="sae", progress=False, log_every=3,
                       checkpoint_every_tokens=DISK_EVERY * BATCH)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> dict[str, Path]:
    """The uninterrupted runs the faulted ones must end equal to."""
    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        saeengine.train(data, kill_config(root / "kill"))
        saeengine.train(data, disk_config(root / "disk"))
    finally:
        torch.set_num_threads(threads)
    return {"kill": root / "kill", "disk": root / "disk"}


def assert_same_sae(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a / "sae" / "sae.safetensors")), load_file(str(b / "sae" / "sae.safetensors"))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def latest_step(out_dir: Path) -> int:
    try:
        return int((out_dir / "checkpoints" / "LATEST").read_text().removeprefix("step-"))
    except (OSError, ValueError):  # not there yet, or read while it is replaced
        return -1


def _train_in_child(data: torch.Tensor, cfg: TrainConfig, gate=None) -> None:
    """The forked trainer; with ``gate`` it waits at its first checkpoint until the gate opens."""
    from saeengine.trainer import loop

    if gate is not None:
        save = loop.save_checkpoint

        def gated(*args, **kwargs):
            gate.wait(60)
            return save(*args, **kwargs)

        loop.save_checkpoint = gated
    saeengine.train(data, cfg)


def test_random_sigkills_then_resume_end_bit_for_bit(tmp_path, data, reference):
    """Three trainers on one folder, each SIGKILLed at a random moment (a random number of
    checkpoints in, then a random few milliseconds: mid-step, mid-write or between), each
    starting from what the one before left. Every kill leaves the folder unlocked (the
    lock dies with its process), the next start clears the half-written files, and the
    last, uninterrupted resume ends as the run that was never killed."""
    out = tmp_path / "run"
    rng = random.Random(14)
    cfg = kill_config(out)
    for kill in range(3):
        reached = latest_step(out)
        target = reached + KILL_EVERY * rng.randint(1, 6)
        child = FORK.Process(target=_train_in_child, args=(data, cfg))
        child.start()
        deadline = time.time() + 120
        while child.is_alive() and latest_step(out) < target and time.time() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.02))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL, f"kill {kill}: the run ended first (exit code {child.exitcode})"
        assert latest_step(out) < KILL_STEPS, f"kill {kill} came after the end of the run"
        assert not is_locked(out), "a SIGKILLed trainer must not leave the run folder locked"
    saeengine.train(data, cfg)
    assert_same_sae(reference["kill"], out)
    assert not list((out / "checkpoints").glob(".*")), "the restart must clear the killed writes' temporary files"
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "sae" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == KILL_STEPS - 1


def test_second_trainer_on_a_folder_in_use_fails_at_once_and_the_first_finishes(tmp_path, data, reference):
    out = tmp_path / "run"
    gate = FORK.Event()
    first = FORK.Process(target=_train_in_child, args=(data, kill_config(out), gate))
    first.start()
    try:
        deadline = time.time() + 60
        while not is_locked(out) and time.time() < deadline:
            time.sleep(0.005)
        assert is_locked(out), "the first trainer never took the lock"
        start = time.perf_counter()
        with pytest.raises(LockedError, match=rf"training run folder {out} is in use by pid {first.pid}"):
            saeengine.train(data, kill_config(out, log_every=1))
        assert time.perf_counter() - start < 5, "the second trainer must fail at once, not wait"
    finally:
        gate.set()
        first.join(120)
    assert first.exitcode == 0, f"the first trainer failed (exit code {first.exitcode})"
    assert_same_sae(reference["kill"], out)  # its run is the uninterrupted one, bit for bit
    assert saeengine.SAE.load(out / "sae").cfg.d_sae == 64
    assert not is_locked(out)


def _checkpoint_bytes(run: Path) -> int:
    """Bytes one checkpoint takes on a tmpfs (each file rounded up to 4 KiB pages)."""
    checkpoint = latest_checkpoint(run)
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in checkpoint.rglob("*") if p.is_file())


def _assert_left_the_checkpoint_before(out: Path) -> None:
    assert latest_checkpoint(out).name == f"step-{DISK_EVERY:09d}"
    assert not list((out / "checkpoints").glob(".*.tmp*")), "a half-written checkpoint was left"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["LATEST", f"step-{DISK_EVERY:09d}"]
    assert torch.load(latest_checkpoint(out) / "state.pt", weights_only=True)["step"] == DISK_EVERY
    assert not (out / "sae" / "sae.safetensors").exists()


def test_disk_full_on_a_small_tmpfs_during_a_checkpoint_then_resume(tmp_path, data, reference):
    """A real full disk: a tmpfs with room for one checkpoint and a half, so the second
    one cannot be written while the first still stands. DiskFullError says so, nothing
    half-written is left, the first checkpoint stays the latest; after the space is
    freed the same call resumes from it and ends as the uninterrupted run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not root?'}); "
                    "test_simulated_enospc_during_a_checkpoint_then_resume covers the same path")
    try:
        out = disk / "run"
        free = shutil.disk_usage(disk).free
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (free - int(1.5 * _checkpoint_bytes(reference["disk"]))))
        with pytest.raises(DiskFullError, match="the disk is full"):
            saeengine.train(data, disk_config(out))
        _assert_left_the_checkpoint_before(out)
        filler.unlink()
        saeengine.train(data, disk_config(out))
        assert_same_sae(reference["disk"], out)
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_simulated_enospc_during_a_checkpoint_then_resume(tmp_path, data, reference, monkeypatch):
    """The CPU counterpart of the tmpfs test: the second checkpoint's state write fails
    with ENOSPC after writing part of the file."""
    out = tmp_path / "run"
    save, calls = torch.save, {"n": 0}

    def full(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(DiskFullError, match=r"the disk is full: writing .*step-000000010"):
        saeengine.train(data, disk_config(out))
    _assert_left_the_checkpoint_before(out)
    monkeypatch.setattr(checkpoints.torch, "save", save)
    saeengine.train(data, disk_config(out))
    assert_same_sae(reference["disk"], out)
