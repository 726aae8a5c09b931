"""ActivationStore: open a store read-only, check it against its metadata, gather rows.

What is checked when (see metadata.py for the format):

- On open, always (cheap: no shard is read): every meta.json field's type and range, the
  shard list's names and totals, the content hash of a finished store, meta.json's own
  checksum (any edit, also one that keeps byte sizes, such as d_in and dtype swapped),
  each shard's .bin and .src byte sizes, images.jsonl's size, and that a finished store
  holds no shard files its metadata does not list.
- Each shard's checksum, with the default ``verify="once"``: on the first read of that
  shard in this process (a shard whose files keep their size, inode and modification
  time is not hashed again, even by another ActivationStore of the same directory).
  ``verify=True`` hashes every shard at open; ``verify=False`` never hashes: UNSAFE, a
  flipped byte then silently changes a row or a token's image index.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .._lock import LOCK_FILE, _describe, is_locked
from ..errors import InputError
from .images import ImagePaths
from .metadata import (DTYPES, SOURCE_COLUMNS, StoreCorruptError, StoreIncompleteError, StoreMetadata, file_digest,
                       shard_paths)

_SHARD_FILE = re.compile(r"shard-\d+\.(bin|src)")
_RECORD_AGAIN = "restore the file from a backup or re-record the store"

# Shards verified in this process: (per file: path, device, inode, size, mtime, ctime) + digest.
_verified: set[tuple] = set()
_verified_lock = threading.Lock()


def _file_key(*paths: Path) -> tuple:
    key = []
    for path in paths:
        st = os.stat(path)
        key.append((os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(key)


def writer_holding(directory: Path) -> str | None:
    """Who holds the store's writer lock now (pid, host, command), or None."""
    if not is_locked(directory):
        return None
    try:
        return _describe((Path(directory) / LOCK_FILE).read_text(errors="replace"))
    except OSError:
        return "another process"


class ActivationStore:
    """A finished activation store, memory-mapped.

    Args:
        directory: the store's folder.
        verify: ``"once"`` (default): check each shard's checksum on its first read in this
            process; ``True``: check every shard now; ``False``: never (unsafe: damaged
            bytes read silently).
        allow_incomplete: open the committed shards of a store whose writer did not finish
            (or is still writing: a snapshot of what it has committed so far).

    Attributes: ``meta`` (StoreMetadata), ``n_tokens``, ``d_in``, ``dtype`` (torch dtype),
    ``content_hash``, ``image_paths``. Damage raises StoreCorruptError naming the file.
    """

    def __init__(self, directory: str | Path, *, verify: bool | str = "once", allow_incomplete: bool = False):
        if verify not in ("once", True, False) or not isinstance(verify, (str, bool)):
            raise InputError(f"verify must be 'once' (the default: each shard checked on first read), True "
                             f"(all shards now) or False (never, unsafe), got {verify!r}")
        self.directory = Path(directory)
        self.meta = StoreMetadata.read(self.directory)
        if not self.meta.complete:
            holder = writer_holding(self.directory)
            if holder is not None and not allow_incomplete:
                raise StoreIncompleteError(
                    f"{self.directory} is being written by {holder} ({len(self.meta.shards)} shards, "
                    f"{self.meta.n_tokens} tokens committed so far); wait for the writer to finish, or open it "
                    "with allow_incomplete=True to read what is committed")
            if not allow_incomplete:
                raise StoreIncompleteError(
                    f"{self.directory}: the writer did not finish ({len(self.meta.shards)} shards, "
                    f"{self.meta.n_tokens} tokens are complete). Continue it with "
                    "ActivationWriter(..., resume=True), or open it with allow_incomplete=True")
        np_dtype, self.dtype = DTYPES[self.meta.dtype]
        self._np_dtype = np_dtype
        self._src_dtype = self.meta.source_dtype
        check_shard_files(self.directory, self.meta)
        self._data = [np.memmap(shard_paths(self.directory, s.name)[0], dtype=np_dtype, mode="r",
                                shape=(s.tokens, self.meta.d_in)) for s in self.meta.shards]
        self._sources = [np.memmap(shard_paths(self.directory, s.name)[1], dtype=self._src_dtype, mode="r",
                                   shape=(s.tokens, SOURCE_COLUMNS)) for s in self.meta.shards]
        self.offsets = np.cumsum([0] + [s.tokens for s in self.meta.shards])
        self._pages_dropped = 0  # shards whose pages drop_pages released
        self._images = ImagePaths(self.directory, self.meta.images, self.meta.complete)
        self._image_list: list[str] | None = None
        self._verify = verify is not False
        self._checked = [not self._verify] * len(self.meta.shards)
        self._check_lock = threading.Lock()
        if verify is True:
            self._verify_shards(list(range(len(self.meta.shards))), force=True)
            self._images.load(verify=True)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def d_in(self) -> int:
        return self.meta.d_in

    @property
    def content_hash(self) -> str | None:
        return self.meta.content_hash

    def __len__(self) -> int:
        return self.n_tokens

    def _verify_shards(self, shards: list[int], force: bool = False) -> None:
        """Hash these shards (in parallel: hashlib releases the GIL) unless this process
        already did; raise StoreCorruptError naming the first mismatching shard."""
        with self._check_lock:
            todo = []
            for shard in shards:
                if self._checked[shard] and not force:
                    continue
                info = self.meta.shards[shard]
                paths = shard_paths(self.directory, info.name)
                key = _file_key(*paths) + (info.blake2b,)
                with _verified_lock:
                    known = key in _verified
                if force or not known:
                    todo.append((shard, paths, key))
                else:
                    self._checked[shard] = True
            workers = min(len(todo), os.cpu_count() or 1, 16)
            if workers > 1:
                with ThreadPoolExecutor(workers, thread_name_prefix="saeengine-verify") as pool:
                    digests = list(pool.map(lambda item: file_digest(*item[1]), todo))
            else:
                digests = [file_digest(*paths) for _, paths, _ in todo]
            for (shard, paths, key), found in zip(todo, digests):
                if found != self.meta.shards[shard].blake2b:
                    raise StoreCorruptError(
                        f"{paths[0]} / {paths[1].name}: checksum mismatch, the shard's bytes changed after it was "
                        f"written (a damaged disk, a bad copy or an edit); {_RECORD_AGAIN}")
                with _verified_lock:
                    _verified.add(key)
                self._checked[shard] = True

    def drop_pages(self, before_row: int) -> None:
        """Release the memory-mapped pages of every shard that ends at or before
        ``before_row``: a reader streaming through the store in order calls this once past
        a shard, so its RSS holds about one shard of pages. The data stays on disk (and in
        the page cache); a later read maps it in again."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        while self._pages_dropped < len(self._data) and self.offsets[self._pages_dropped + 1] <= before_row:
            for array in (self._data[self._pages_dropped], self._sources[self._pages_dropped]):
                # np.memmap keeps its mmap object; a zero-size shard has none
                with contextlib.suppress(AttributeError, OSError, ValueError):
                    array._mmap.madvise(mmap.MADV_DONTNEED)
            self._pages_dropped += 1

    def _split_by_shard(self, rows: np.ndarray):
        """rows sorted ascending -> [(shard, local rows, slice of rows)], each shard verified
        on its first read."""
        bounds = np.searchsorted(rows, self.offsets)
        touched = [shard for shard in range(len(self._data)) if bounds[shard + 1] > bounds[shard]]
        unchecked = [shard for shard in touched if not self._checked[shard]]
        if unchecked:
            self._verify_shards(unchecked)
        for shard in touched:
            lo, hi = bounds[shard], bounds[shard + 1]
            yield shard, rows[lo:hi] - self.offsets[shard], slice(lo, hi)

    def gather_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Copy the activations of ``rows`` (sorted ascending int64) into ``out``
        ([len(rows), d_in] in the store's raw numpy dtype)."""
        for shard, local, part in self._split_by_shard(rows):
            np.take(self._data[shard], local, axis=0, out=out[part])

    def _check_rows(self, rows) -> np.ndarray:
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows)
        if rows.size and rows.dtype.kind not in "iu":
            raise InputError(f"token ids must be integers, got {rows.dtype} (a float or bool id would be "
                             "truncated or read as 0/1); pass an integer array")
        rows = rows.astype(np.int64, copy=False).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_tokens):
            raise InputError(f"token ids must be in [0, {self.n_tokens}) (the store holds {self.n_tokens} "
                             f"tokens); got {rows.min()}..{rows.max()}")
        return rows

    def get(self, rows) -> torch.Tensor:
        """Activations [len(rows), d_in] (the store's dtype) of the given token ids, in order."""
        rows = self._check_rows(rows)
        order = np.argsort(rows, kind="stable")
        out = np.empty((rows.size, self.d_in), dtype=self._np_dtype)
        self.gather_into(rows[order], out)
        result = np.empty_like(out)
        result[order] = out
        return as_tensor(result, self.dtype)

    def sources(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(image index, position) int64 arrays [len(rows)] of the given token ids: trace a
        latent back to the image region that activated it."""
        rows = self._check_rows(rows)
        out = np.empty((rows.size, SOURCE_COLUMNS), dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        for shard, local, part in self._split_by_shard(rows[order]):
            out[order[part]] = self._sources[shard][local]
        return out[:, 0].copy(), out[:, 1].copy()

    @property
    def n_images(self) -> int:
        """How many image paths the store records (0 if none were recorded)."""
        return len(self._images)

    @property
    def image_paths(self) -> list[str]:
        """The recorded path of every image, by image index ([] if none were recorded)."""
        if self._image_list is None:
            self._images.load(verify=self._verify)
            self._image_list = self._images.all()
        return list(self._image_list)

    def image_path(self, index: int) -> str:
        """The recorded path of image ``index`` (an image index from :meth:`sources`)."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise InputError(f"an image index must be an integer, got {index!r}")
        if not 0 <= index < len(self._images):
            what = (f"the store records {len(self._images)} image paths (indices 0..{len(self._images) - 1})"
                    if len(self._images) else "the store records no image paths (its writer was given none)")
            raise InputError(f"image index {index} is out of range: {what}")
        self._images.load(verify=self._verify)
        return self._images[int(index)]


def check_shard_files(directory: Path, meta: StoreMetadata) -> None:
    """Every listed shard's files exist with exactly the sizes the metadata implies; a
    finished store has no unlisted shard files. Raises StoreCorruptError naming the file."""
    src_row = SOURCE_COLUMNS * meta.source_dtype.itemsize
    for shard in meta.shards:
        data_path, src_path = shard_paths(directory, shard.name)
        for path, size in ((data_path, shard.tokens * meta.d_in * meta.itemsize), (src_path, shard.tokens * src_row)):
            if not path.is_file():
                raise StoreCorruptError(f"{path} is missing: the store is damaged ({_RECORD_AGAIN})")
            actual = path.stat().st_size
            if actual != size:
                raise StoreCorruptError(f"{path} is {actual} bytes but the metadata says {shard.tokens} tokens "
                                        f"({size} bytes): the file is truncated or extended; {_RECORD_AGAIN}")
    if meta.complete:
        listed = {p.name for s in meta.shards for p in shard_paths(directory, s.name)}
        for name in sorted(os.listdir(directory)):
            if _SHARD_FILE.fullmatch(name) and name not in listed:
                raise StoreCorruptError(
                    f"{Path(directory) / name} is not listed in meta.json of this finished store (a stray file, or "
                    "meta.json was replaced by an older one); remove the stray file or re-record the store")


def as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A raw store array -> tensor of the store's dtype, sharing memory."""
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
