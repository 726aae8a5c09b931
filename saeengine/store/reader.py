"""ActivationStore: open a store read-only, check it against its metadata, gather rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .metadata import DTYPES, SOURCE_COLUMNS, StoreError, StoreIncompleteError, StoreMetadata, file_digest, shard_paths


class ActivationStore:
    """A finished activation store, memory-mapped.

    Opening checks every shard's file sizes against the metadata; ``verify=True`` also
    re-hashes the bytes (reads the whole store). ``allow_incomplete=True`` opens the
    finished shards of a store whose writer did not finish.

    Attributes: ``meta`` (StoreMetadata), ``n_tokens``, ``d_in``, ``dtype`` (torch dtype),
    ``content_hash``.
    """

    def __init__(self, directory: str | Path, *, verify: bool = False, allow_incomplete: bool = False):
        self.directory = Path(directory)
        self.meta = StoreMetadata.read(self.directory)
        if not self.meta.complete and not allow_incomplete:
            raise StoreIncompleteError(
                f"{self.directory}: the writer did not finish ({len(self.meta.shards)} shards, "
                f"{self.meta.n_tokens} tokens are complete). Continue it with "
                "ActivationWriter(..., resume=True), or open it with allow_incomplete=True")
        np_dtype, self.dtype = DTYPES[self.meta.dtype]
        self._np_dtype = np_dtype
        self._data: list[np.memmap] = []
        self._sources: list[np.memmap] = []
        for shard in self.meta.shards:
            data_path, src_path = shard_paths(self.directory, shard.name)
            expected = ((data_path, shard.tokens * self.meta.d_in * np_dtype.itemsize),
                        (src_path, shard.tokens * SOURCE_COLUMNS * 4))
            for path, size in expected:
                if not path.is_file():
                    raise StoreError(f"{path} is missing: the store is damaged (re-record it or restore the file)")
                if path.stat().st_size != size:
                    raise StoreError(f"{path} is {path.stat().st_size} bytes but the metadata says {shard.tokens} "
                                     f"tokens ({size} bytes): the file is truncated or corrupted")
            if verify and file_digest(data_path, src_path) != shard.blake2b:
                raise StoreError(f"{data_path.name}/{src_path.name}: checksum mismatch, the bytes changed after "
                                 "writing (corrupted file)")
            self._data.append(np.memmap(data_path, dtype=np_dtype, mode="r", shape=(shard.tokens, self.meta.d_in)))
            self._sources.append(np.memmap(src_path, dtype="<i4", mode="r", shape=(shard.tokens, SOURCE_COLUMNS)))
        self.offsets = np.cumsum([0] + [s.tokens for s in self.meta.shards])

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

    def _split_by_shard(self, rows: np.ndarray):
        """rows sorted ascending -> [(shard, local rows, slice of rows)]."""
        bounds = np.searchsorted(rows, self.offsets)
        for shard in range(len(self._data)):
            lo, hi = bounds[shard], bounds[shard + 1]
            if hi > lo:
                yield shard, rows[lo:hi] - self.offsets[shard], slice(lo, hi)

    def gather_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Copy the activations of ``rows`` (sorted ascending int64) into ``out``
        ([len(rows), d_in] in the store's raw numpy dtype)."""
        for shard, local, part in self._split_by_shard(rows):
            np.take(self._data[shard], local, axis=0, out=out[part])

    def _check_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_tokens):
            raise IndexError(f"token ids must be in [0, {self.n_tokens}); got {rows.min()}..{rows.max()}")
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
        """(image index, position) arrays of the given token ids: trace a latent back to
        the image region that activated it."""
        rows = self._check_rows(rows)
        out = np.empty((rows.size, SOURCE_COLUMNS), dtype="<i4")
        order = np.argsort(rows, kind="stable")
        for shard, local, part in self._split_by_shard(rows[order]):
            out[order[part]] = self._sources[shard][local]
        return out[:, 0].copy(), out[:, 1].copy()


def as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A raw store array -> tensor of the store's dtype, sharing memory."""
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
