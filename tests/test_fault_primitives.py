"""The shared fault primitives: exclusive locks and disk-full translation of atomic writes."""

import errno
import multiprocessing as mp
import subprocess
import time
from pathlib import Path

import pytest
import torch

from saeengine._atomic import atomic_write, atomic_write_bytes
from saeengine._lock import exclusive_lock, is_locked
from saeengine.errors import DiskFullError, LockedError


def _hold(directory, ready_file):
    with exclusive_lock(directory, "run folder"):
        Path(ready_file).write_text("locked")
        time.sleep(60)


def test_lock_names_the_holder_in_another_process_and_dies_with_it(tmp_path):
    # No multiprocessing Event: a process SIGKILLed inside one leaves its lock held and
    # deadlocks whoever sets it next. The child says it is ready with a file.
    ready = tmp_path / "ready"
    holder = mp.get_context("spawn").Process(target=_hold, args=(tmp_path / "run", ready))
    holder.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and holder.is_alive():
            time.sleep(0.01)
        assert ready.exists(), "the holder never took the lock"
        assert is_locked(tmp_path / "run")
        with pytest.raises(LockedError, match=rf"run folder {tmp_path / 'run'} is in use by pid {holder.pid}"):
            with exclusive_lock(tmp_path / "run", "run folder"):
                pass
        holder.kill()  # a SIGKILLed holder must not leave a stale lock
        holder.join(30)
        with exclusive_lock(tmp_path / "run", "run folder"):
            pass
    finally:
        if holder.is_alive():
            holder.kill()
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


def test_a_reader_checking_the_lock_does_not_make_a_writer_fail(tmp_path):
    """is_locked() holds a shared lock for an instant; a writer starting then still gets in."""
    import fcntl
    import os
    import threading

    (tmp_path / ".lock").touch()
    fd = os.open(tmp_path / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what is_locked() holds, here for 30 ms
    threading.Timer(0.03, os.close, args=(fd,)).start()
    with exclusive_lock(tmp_path, "activation store"):
        pass


def test_an_unrelated_error_on_a_nearly_full_disk_is_not_called_disk_full(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 1000, 1000))

    def bad_tensor(tmp):
        raise RuntimeError("expected a contiguous tensor")

    with pytest.raises(RuntimeError, match="contiguous") as info:
        atomic_write(tmp_path / "x", bad_tensor)
    assert not isinstance(info.value, DiskFullError)

    def torch_full(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(DiskFullError, match="the disk is full"):
        atomic_write(tmp_path / "y", torch_full)
