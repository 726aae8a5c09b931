"""images.jsonl: the path of every recorded image, in image-index order, one JSON string a line.

The file is append-only and meta.json records its committed length (lines, bytes, digest),
so a commit appends only the new lines and rewrites no list, however many images there
are. Bytes beyond the committed length are an unfinished commit: a resumed writer, or a
failed commit, truncates them away; readers never look past the committed length.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError, StoreCorruptError
from .metadata import IMAGES_FILE, ImagesInfo, digest

_RESTORE = "restore it from a backup or re-record the store"


def encode_paths(paths: Sequence[str]) -> bytes:
    """The images.jsonl lines of ``paths`` (non-empty strings). Raises InputError."""
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise InputError(f"image paths must be a sequence of strings, got a {type(paths).__name__}; "
                         "pass a list, e.g. add_image_paths([path])")
    lines = []
    for i, p in enumerate(paths):
        if not isinstance(p, str) or not p:
            raise InputError(f"image path {i} is {p!r}: every image path must be a non-empty string "
                             "(a path relative to the image root)")
        lines.append(json.dumps(p).encode() + b"\n")  # JSON: newlines and odd bytes in names survive
    return b"".join(lines)


class ImagePathLog:
    """The writer's side: check and keep the committed prefix, append, roll back."""

    def __init__(self, directory: Path, committed: ImagesInfo):
        self.path = Path(directory) / IMAGES_FILE
        self.committed = committed
        self._hash = digest()
        if committed.bytes:
            size = self.path.stat().st_size if self.path.is_file() else None
            if size is None or size < committed.bytes:
                raise StoreCorruptError(f"{self.path} holds {size or 0} bytes but meta.json committed "
                                        f"{committed.bytes} (the image paths were truncated or deleted); {_RESTORE}")
            with open(self.path, "rb") as f:
                left = committed.bytes
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    self._hash.update(chunk)
                    left -= len(chunk)
            if self._hash.hexdigest() != committed.blake2b:
                raise StoreCorruptError(f"{self.path}: checksum mismatch, the image paths changed after writing; "
                                        f"{_RESTORE}")
        self._candidate = self._hash
        self.rollback()

    def append(self, lines: bytes, count: int) -> ImagesInfo:
        """Append and flush ``count`` encoded lines; the result becomes committed by :meth:`accept`."""
        with open(self.path, "ab") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        self._candidate = self._hash.copy()
        self._candidate.update(lines)
        return ImagesInfo(self.committed.count + count, self.committed.bytes + len(lines),
                          self._candidate.hexdigest())

    def accept(self, info: ImagesInfo) -> None:
        self.committed, self._hash = info, self._candidate

    def rollback(self) -> None:
        """Cut the file back to its committed length (an unfinished commit's lines go)."""
        if self.path.is_file() and self.path.stat().st_size != self.committed.bytes:
            os.truncate(self.path, self.committed.bytes)


class ImagePaths:
    """The reader's side: sizes checked on open, lines indexed (and digest checked) on first use."""

    def __init__(self, directory: Path, info: ImagesInfo, complete: bool):
        self.path = Path(directory) / IMAGES_FILE
        self.info = info
        size = self.path.stat().st_size if self.path.is_file() else 0
        if size < info.bytes or (complete and size != info.bytes):
            raise StoreCorruptError(f"{self.path} is {size} bytes but meta.json says {info.count} image paths in "
                                    f"{info.bytes} bytes: the file is truncated, extended or missing; {_RESTORE}")
        self._data: bytes | None = None
        self._ends: np.ndarray | None = None

    def __len__(self) -> int:
        return self.info.count

    def load(self, verify: bool) -> None:
        """Read the committed lines once; ``verify`` checks their digest first."""
        if self._data is not None:
            return
        data = b""
        if self.info.bytes:
            with open(self.path, "rb") as f:
                data = f.read(self.info.bytes)
        if verify:
            h = digest()
            h.update(data)
            if h.hexdigest() != self.info.blake2b:
                raise StoreCorruptError(f"{self.path}: checksum mismatch, the image paths changed after writing; "
                                        f"{_RESTORE}")
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
        if ends.size != self.info.count or (data and not data.endswith(b"\n")):
            raise StoreCorruptError(f"{self.path} holds {ends.size} lines, meta.json says {self.info.count}; "
                                    f"{_RESTORE}")
        self._data, self._ends = data, ends

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) + 1 if i else 0
        line = self._data[start:int(self._ends[i])]
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, str):
            raise StoreCorruptError(f"{self.path} line {i + 1} is not a JSON string ({line[:80]!r}); {_RESTORE}")
        return value

    def all(self) -> list[str]:
        if not self._data:
            return []
        try:  # one parse for all lines: a million paths in well under a second
            values = json.loads(b"[" + self._data[:-1].replace(b"\n", b",") + b"]")
        except ValueError:
            values = None
        if not isinstance(values, list) or len(values) != self.info.count or \
                not all(isinstance(v, str) for v in values):
            return [self[i] for i in range(self.info.count)]  # names the first bad line
        return values
