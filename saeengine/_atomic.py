"""Crash-safe file writes shared by checkpoints, activation stores and training state:
write under a temporary name, flush to disk, rename over the target, sync the folder."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from .errors import DiskFullError

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Below this much free space, a failed write is taken as a full disk even when the writer
# hides the errno (torch.save reports a full disk as "unexpected pos").
_NEARLY_FULL_BYTES = 1 << 20


def _disk_full(exc: BaseException, directory: Path) -> bool:
    seen, errno_less = exc, False
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        errno_less |= (isinstance(seen, OSError) and seen.errno is None) or "unexpected pos" in str(seen)
        seen = seen.__cause__ or seen.__context__
    if not errno_less:  # an error with its own cause (a bad tensor, a permission) stays itself
        return False
    try:
        return shutil.disk_usage(directory).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_full_error(path: Path, exc: BaseException) -> DiskFullError:
    """The error for a write of ``path`` that failed because its disk is full."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    err = DiskFullError(f"the disk is full: writing {path} failed ({free}); nothing half-written was kept. "
                        f"Free some space or write elsewhere, then run again ({type(exc).__name__}: {exc})")
    err.errno = errno.ENOSPC
    return err


def raise_if_disk_full(path: Path, exc: BaseException) -> None:
    """Re-raise ``exc`` as a :class:`DiskFullError` if it came from a full disk."""
    if not isinstance(exc, DiskFullError) and _disk_full(exc, Path(path).parent):
        raise disk_full_error(path, exc) from exc


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then move it into place.

    A full disk raises :class:`~saeengine.errors.DiskFullError` and leaves ``path`` as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            raise_if_disk_full(path, exc)
            raise
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
