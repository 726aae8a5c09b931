"""ActivationWriter: append recorded activations to a store, one crash-safe commit at a time.

Write-time policy (nothing bad reaches the disk; store/rows.py checks the rows):
- activations must be finite: NaN/inf rows raise NonFiniteError, and so do values that the
  storage dtype cannot hold (above 65504 for float16: they would become inf);
- image indices and positions must be integers (a float is refused, not truncated),
  non-negative and within the source columns (int64; no wrap);
- once image paths are recorded, every token's image index must have a path.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .._atomic import fsync_directory, raise_if_disk_full
from .._lock import LOCK_FILE, exclusive_lock
from ..errors import ConfigError, InputError
from .images import ImagePathLog, encode_paths
from .metadata import DTYPES, META_FILE, VERSION, ShardInfo, StoreError, StoreMetadata, digest, shard_paths
from .reader import check_shard_files
from .rows import checked_rows

log = logging.getLogger("saeengine")


def _json_object(name: str, value) -> dict:
    """A JSON-able dict, deep-copied through JSON (what reading it back will give)."""
    if not isinstance(value, dict):
        raise InputError(f"{name} must be a dict of JSON values, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must hold only JSON values (str, int, float, bool, None, lists, dicts with "
                         f"string keys; no NaN): {exc}") from exc


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _write_durably(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


class ActivationWriter:
    """Appends activations with their (image index, position) sources to a store directory.

    Args:
        directory: the store's folder (created; must be empty unless ``resume``).
        d_in: activation width; required for a new store. With ``resume=True`` it may be
            None (the store's); if given, d_in and dtype must match the store's.
        dtype: storage dtype, one of float32, float16, bfloat16.
        backbone, layer, token_kind, extra: what was recorded (with resume: if given, they
            must match the store's).
        shard_tokens: rows per shard when ``auto_shard``.
        resume: continue an unfinished store from its last commit.
        auto_shard: ``add`` commits a shard whenever ``shard_tokens`` rows are buffered
            (without a progress update: resume from :attr:`n_tokens`). False: ``add`` only
            buffers, and each :meth:`flush` commits one shard with your progress.

    The writer holds the store's lock (``.lock``, an OS file lock) from open to close: a
    second writer fails at once with LockedError naming the holder, and readers refuse the
    unfinished store while it is written. Every commit is atomic (meta.json is replaced
    last), so a writer killed at any point leaves the store as of its last commit;
    ``resume=True`` continues from there, with :attr:`progress` and :attr:`n_tokens` /
    :attr:`n_images` saying where. A full disk raises DiskFullError and leaves the store
    as of its last commit (free space, then :meth:`flush` again, or resume later).

    Use as a context manager: leaving the block normally finishes the store
    (``complete``, content hash); an exception releases the lock and leaves it resumable.

    Example::

        with ActivationWriter("acts/", d_in=768, dtype="float16", backbone="clip-b16",
                              layer="blocks.8", token_kind="patch", auto_shard=False) as w:
            w.add_image_paths(["cats/1.jpg", "cats/2.jpg"])
            w.add(acts, image_index, position)    # [n, 768], [n], [n]
            w.flush({"images_done": 2})
    """

    def __init__(self, directory: str | Path, d_in: int | None = None, dtype: str = "float16", *,
                 backbone: str = "", layer: str = "", token_kind: str = "", extra: dict | None = None,
                 shard_tokens: int = 1 << 18, resume: bool = False, auto_shard: bool = True):
        self.shard_tokens = _positive_int("shard_tokens", shard_tokens)
        for name, flag in (("resume", resume), ("auto_shard", auto_shard)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be True or False, got {flag!r}")
        for name, text in (("backbone", backbone), ("layer", layer), ("token_kind", token_kind)):
            if not isinstance(text, str):
                raise ConfigError(f"{name} must be a string, got {text!r}")
        if dtype not in DTYPES:
            raise ConfigError(f"store dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        d_in = None if d_in is None else _positive_int("d_in", d_in)
        extra = None if extra is None else _json_object("extra", extra)
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(f"{self.directory} is a file, not a store directory; choose another path")
        self.auto_shard = auto_shard
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(exclusive_lock(self.directory, "activation store"))
        try:
            described = {"backbone": backbone, "layer": layer, "token_kind": token_kind, "extra": extra}
            if resume and (self.directory / META_FILE).exists():
                self.meta = self._reopen(d_in, dtype, described)
            else:
                self.meta = self._create(d_in, dtype, described, resume)
            self._images = ImagePathLog(self.directory, self.meta.images)
        except BaseException:
            self._lock.close()
            raise
        self._acts: list[np.ndarray] = []
        self._sources: list[np.ndarray] = []
        self._buffered = 0
        self._pending_paths: list[bytes] = []
        self._n_pending_paths = 0
        self._closed = False
        self._broken = False

    # -- opening -------------------------------------------------------------------------
    def _create(self, d_in, dtype, described, resume: bool) -> StoreMetadata:
        if d_in is None:
            raise ConfigError("d_in is required to create a store")
        leftovers = [p for p in self.directory.iterdir() if p.name != LOCK_FILE]
        if any(not p.name.startswith(f".{META_FILE}.tmp-") for p in leftovers):
            if resume:
                raise StoreError(f"cannot resume in {self.directory}: it holds files but no {META_FILE}, so it is "
                                 "not an activation store; choose a new or empty directory")
            raise StoreError(f"{self.directory} exists and is not empty; choose a new directory, "
                             "or pass resume=True to continue an unfinished store")
        for p in leftovers:  # a meta.json write killed before the store's first commit
            p.unlink()
        meta = StoreMetadata(d_in=d_in, dtype=dtype, backbone=described["backbone"], layer=described["layer"],
                             token_kind=described["token_kind"], extra=described["extra"] or {})
        meta.write(self.directory)
        return meta

    def _reopen(self, d_in, dtype, described) -> StoreMetadata:
        meta = StoreMetadata.read(self.directory)
        if meta.complete:
            raise StoreError(f"{self.directory} is already complete; open it with ActivationStore")
        if meta.version != VERSION:
            raise StoreError(f"{self.directory} was started by an older saeengine (store format version "
                             f"{meta.version}) and cannot be continued by this one (version {VERSION}); re-record it "
                             "into a new directory")
        if d_in is not None and (d_in, dtype) != (meta.d_in, meta.dtype):
            raise StoreError(f"resume=True was given d_in={d_in}, dtype={dtype!r}, but {self.directory} holds "
                             f"d_in={meta.d_in}, dtype={meta.dtype!r}; pass the store's values (or d_in=None to "
                             "take them from the store), or record into a new directory")
        for field, given in described.items():
            stored = getattr(meta, field)
            if given not in (None, "") and given != stored:
                raise StoreError(f"resume=True was given {field}={given!r}, but {self.directory} was recorded "
                                 f"with {field}={stored!r}; pass the store's value, or record into a new directory")
        check_shard_files(self.directory, meta)
        listed = {p.name for s in meta.shards for p in shard_paths(self.directory, s.name)}
        for path in sorted(self.directory.iterdir()):  # an unfinished commit's files
            if (path.name.startswith("shard-") and path.name not in listed) or \
                    path.name.startswith(f".{META_FILE}.tmp-"):
                log.warning("saeengine: discarding %s, left unfinished by a writer that stopped", path.name)
                path.unlink()
        return meta

    # -- state -----------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens committed plus those buffered."""
        return self.meta.n_tokens + self._buffered

    @property
    def n_images(self) -> int:
        """Image paths committed plus those pending (the next path gets this index)."""
        return self.meta.images.count + self._n_pending_paths

    @property
    def progress(self) -> dict:
        """The progress dict of the last commit ({} for a new store)."""
        return copy.deepcopy(self.meta.progress)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the writer of {self.directory} is closed; open a new one with resume=True")
        if self._broken:
            raise StoreError(f"a commit to {self.directory} was interrupted; reopen it with "
                             "ActivationWriter(..., resume=True) to continue from its last commit")

    # -- adding ----------------------------------------------------------------------------
    def add(self, acts, image_index, position) -> None:
        """Buffer tokens. acts [n, d_in] floating point (tensor or array, any device);
        image_index [n] and position [n] non-negative integers: where each token came from.

        Raises InputError for bad shapes or indices, NonFiniteError for NaN/inf or values
        beyond the storage dtype; nothing is buffered then. With ``auto_shard``, a full disk
        during the commit raises DiskFullError with the rows kept buffered (do not add them
        again: free space and ``flush()``, or ``abort()`` and resume).
        """
        self._check_open()
        stored, sources = checked_rows(acts, image_index, position, self.meta, self.n_images)
        self._acts.append(stored)
        self._sources.append(sources)
        self._buffered += sources.shape[0]
        while self.auto_shard and self._buffered >= self.shard_tokens:
            self._commit(self.shard_tokens, None)

    def add_image_paths(self, paths: Sequence[str]) -> None:
        """Name the next images, in order: the i-th path added overall is image index i.
        Paths (strings, relative to the image root) are persisted at the next commit."""
        self._check_open()
        lines = encode_paths(paths)
        if lines:
            self._pending_paths.append(lines)
            self._n_pending_paths += len(paths)

    # -- committing ------------------------------------------------------------------------
    def _buffered_rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self._acts) > 1:
            self._acts, self._sources = [np.concatenate(self._acts)], [np.concatenate(self._sources)]
        return self._acts[0][:n], self._sources[0][:n]

    def _commit(self, n_rows: int, progress: dict | None) -> None:
        """One atomic commit: ``n_rows`` buffered rows as a shard (if any), the pending image
        paths, ``progress`` (None: unchanged). On failure the store and this writer stay as
        of the last commit."""
        written: list[Path] = []
        target = self.directory / META_FILE
        try:
            shards = list(self.meta.shards)
            if n_rows:
                acts, sources = self._buffered_rows(n_rows)
                name = f"shard-{len(shards):05d}"
                h = digest()
                for path, array in zip(shard_paths(self.directory, name), (acts, sources)):
                    target = partial = path.with_name(path.name + ".partial")
                    written.append(partial)
                    _write_durably(partial, array)
                    h.update(memoryview(np.ascontiguousarray(array)).cast("B"))
                    os.replace(partial, path)
                    written.append(path)
                fsync_directory(self.directory)
                shards.append(ShardInfo(name=name, tokens=n_rows, blake2b=h.hexdigest()))
            images = self.meta.images
            if self._pending_paths:
                target = self._images.path
                images = self._images.append(b"".join(self._pending_paths), self._n_pending_paths)
            meta = dataclasses.replace(self.meta, shards=shards, images=images,
                                       progress=self.meta.progress if progress is None else progress)
            target = self.directory / META_FILE
            meta.write(self.directory)  # the commit point: readers and resumes see it from here on
        except Exception as exc:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                self._images.rollback()
            if isinstance(exc, OSError):
                raise_if_disk_full(target, exc)
            raise
        except BaseException:  # interrupted mid-commit: the disk may hold either state
            self._broken = True
            raise
        self.meta = meta
        self._images.accept(images)
        self._pending_paths, self._n_pending_paths = [], 0
        if n_rows:
            self._acts, self._sources = [self._acts[0][n_rows:]], [self._sources[0][n_rows:]]
            self._buffered -= n_rows

    def flush(self, progress: dict | None = None) -> None:
        """Commit the buffered rows as one shard (if any), the pending image paths and
        ``progress`` (a JSON-able dict; None keeps the last one), atomically."""
        self._check_open()
        if progress is not None:
            progress = _json_object("progress", progress)
        if self._buffered or self._pending_paths or progress is not None:
            self._commit(self._buffered, progress)

    def close(self) -> StoreMetadata:
        """Commit what is buffered, mark the store complete (content hash) and release the lock."""
        if self._closed:
            return self.meta
        self._check_open()
        self.flush()
        meta = dataclasses.replace(self.meta, complete=True)
        meta.content_hash = meta.compute_content_hash()
        meta.write(self.directory)
        self.meta = meta
        self.abort()
        return self.meta

    def abort(self) -> None:
        """Release the lock without finishing: rows buffered since the last commit are
        dropped; the store stays resumable from its last commit."""
        self._closed = True
        self._acts, self._sources, self._buffered = [], [], 0
        self._pending_paths, self._n_pending_paths = [], 0
        self._lock.close()

    def __enter__(self) -> "ActivationWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            self.abort()
