"""The shared fault primitives: exclusive locks and disk-full translation of atomic writes."""

import errno
import multiprocessing as mp
import subprocess

import pytest
import torch

from saeengine._atomic import atomic_write, atomic_write_bytes
from saeengine._lock import exclusive_lock, is_locked
from saeengine.errors import DiskFullError, LockedError


def _hold(directory, ready, release):
    with exclusive_lock(directory, "run folder"):
        ready.set()
        release.wait(30)


def test_lock_names_the_holder_in_another_process_and_dies_with_it(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        assert is_locked(tmp_path)
        with pytest.raises(LockedError, match=rf"run folder {tmp_path} is in use by pid {holder.pid}"):
            with exclusive_lock(tmp_path, "run folder"):
                pass
        holder.kill()  # a SIGKILLed holder must not leave a stale lock
        holder.join(30)
        with exclusive_lock(tmp_path, "run folder"):
            pass
    finally:
        release.set()
        holder.join(30)


def test_lock_in_the_same_process_is_refused_and_released_after(tmp_path):
    with exclusive_lock(tmp_path, "activation store"):
        with pytest.raises(LockedError, match="in use by pid"):
            with exclusive_lock(tmp_path, "activation store"):
                pass
    assert not is_locked(tmp_path)


def test_enospc_becomes_disk_full_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old")

    def fail(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="the disk is full") as info:
        atomic_write(target, fail)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_other_errors_pass_through_unchanged(tmp_path):
    def fail(tmp):
        raise PermissionError(errno.EACCES, "denied")

    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "x", fail)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_torch_save_on_a_full_tmpfs_says_disk_full(tiny_tmpfs):
    # torch reports a full disk as "unexpected pos"; the free-space check names it.
    with pytest.raises(DiskFullError, match="the disk is full"):
        atomic_write(tiny_tmpfs / "w.pt", lambda t: torch.save(torch.randn(1 << 19), t))
    assert list(tiny_tmpfs.iterdir()) == []
