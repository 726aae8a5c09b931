"""Hashing files a chunk at a time (store shards, checkpoint weights)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

_CHUNK = 1 << 24


def hash_files(*paths: Path, new: Callable[[], "hashlib._Hash"] = hashlib.sha256) -> str:
    """The hex digest of the files' bytes, in order, read 16 MiB at a time."""
    h = new()
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()
