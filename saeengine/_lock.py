"""Exclusive OS file locks for what is being written (a store, a run folder).

``flock`` locks die with their process, so a SIGKILLed writer never leaves a stale lock.
The lock file also holds who took it (pid, host, command, time) so the second user's
error can say who is in the way.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import LockedError

LOCK_FILE = ".lock"


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _describe(info: str) -> str:
    try:
        h = json.loads(info)
        return f"pid {h['pid']} on {h['host']} ({h['command']!r}) since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _try_lock(fd: int, tries: int = 5, wait_s: float = 0.02) -> bool:
    # A few quick retries: is_locked() holds a shared lock for an instant, which must not
    # make a writer starting at that moment fail. A real holder is still refused in < 0.1 s.
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(wait_s)
    return False


@contextlib.contextmanager
def exclusive_lock(directory: str | Path, what: str) -> Iterator[Path]:
    """Hold ``directory/.lock`` exclusively for the ``with`` body.

    ``what`` names the thing in the error, e.g. ``"activation store"``. Raises
    :class:`LockedError` at once (no waiting) if another open holds the lock, including
    another open in this same process.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            holder = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            raise LockedError(f"the {what} {directory} is in use by {holder}; wait for it to finish, "
                              f"stop it, or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def is_locked(directory: str | Path) -> bool:
    """Whether some process holds ``directory/.lock`` now."""
    path = Path(directory) / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
