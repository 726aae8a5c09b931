"""ActivationWriter: append recorded activations to a store, one crash-safe shard at a time."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .._atomic import fsync_directory
from .metadata import DTYPES, SOURCE_COLUMNS, ShardInfo, StoreError, StoreMetadata, file_digest, shard_paths

log = logging.getLogger("saeengine")


def _as_storage_array(acts, dtype: str, d_in: int) -> np.ndarray:
    """[n, d_in] tensor or array -> numpy array in the store's raw dtype."""
    np_dtype, torch_dtype = DTYPES[dtype]
    if isinstance(acts, np.ndarray):
        acts = torch.from_numpy(acts)
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2 or acts.shape[1] != d_in:
        shape = tuple(acts.shape) if hasattr(acts, "shape") else type(acts).__name__
        raise ValueError(f"activations must be [n, {d_in}] (the store's d_in), got {shape}")
    t = acts.detach().to("cpu", torch_dtype).contiguous()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    return t.numpy().view(np_dtype)


class ActivationWriter:
    """Appends activations with their (image, position) sources to a store directory.

    Rows are buffered and written ``shard_tokens`` at a time. Use as a context manager:
    leaving the block normally finishes the store (``complete``, content hash); an
    exception leaves it resumable. ``resume=True`` reopens an unfinished store, drops any
    shard that was being written when the writer died, and continues after the last
    finished one (the caller re-adds the tokens from ``n_tokens`` on).

    Example::

        with ActivationWriter("acts/", d_in=768, dtype="float16", backbone="clip-b16",
                              layer="blocks.8", token_kind="patch") as w:
            w.add(acts, image_index, position)    # [n, 768], [n], [n]
    """

    def __init__(self, directory: str | Path, d_in: int | None = None, dtype: str = "float16", *,
                 backbone: str = "", layer: str = "", token_kind: str = "", extra: dict | None = None,
                 shard_tokens: int = 1 << 18, resume: bool = False):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory = Path(directory)
        self.shard_tokens = int(shard_tokens)
        if resume and (self.directory / "meta.json").exists():
            self.meta = StoreMetadata.read(self.directory)
            if self.meta.complete:
                raise StoreError(f"{self.directory} is already complete; open it with ActivationStore")
            self._discard_unfinished()
        else:
            if d_in is None:
                raise ValueError("d_in is required to create a store")
            if self.directory.exists() and any(self.directory.iterdir()):
                raise StoreError(f"{self.directory} exists and is not empty; choose a new directory, "
                                 "or pass resume=True to continue an unfinished store")
            self.directory.mkdir(parents=True, exist_ok=True)
            self.meta = StoreMetadata(d_in=int(d_in), dtype=dtype, backbone=backbone, layer=layer,
                                      token_kind=token_kind, extra=dict(extra or {}))
            self.meta.write(self.directory)
        self._acts: list[np.ndarray] = []
        self._sources: list[np.ndarray] = []
        self._buffered = 0

    @property
    def n_tokens(self) -> int:
        """Tokens written to finished shards plus those buffered."""
        return self.meta.n_tokens + self._buffered

    def _discard_unfinished(self) -> None:
        listed = {s.name for s in self.meta.shards}
        for path in sorted(self.directory.iterdir()):
            stem = path.name.split(".")[0]
            if stem.startswith("shard-") and stem not in listed:
                log.warning("saeengine: discarding %s, left unfinished by a writer that stopped", path.name)
                path.unlink()

    def add(self, acts, image_index, position) -> None:
        """acts [n, d_in]; image_index [n] and position [n] ints: where each token came from."""
        rows = _as_storage_array(acts, self.meta.dtype, self.meta.d_in)
        n = rows.shape[0]
        sources = np.empty((n, SOURCE_COLUMNS), dtype="<i4")
        for col, (name, values) in enumerate((("image_index", image_index), ("position", position))):
            values = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(-1)
            if values.shape[0] != n:
                raise ValueError(f"{name} has {values.shape[0]} entries for {n} activation rows")
            sources[:, col] = values
        self._acts.append(rows)
        self._sources.append(sources)
        self._buffered += n
        while self._buffered >= self.shard_tokens:
            self._write_shard(self.shard_tokens)

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        acts, sources = np.concatenate(self._acts), np.concatenate(self._sources)
        self._acts, self._sources = [acts[n:]], [sources[n:]]
        self._buffered -= n
        return acts[:n], sources[:n]

    def _write_shard(self, n: int) -> None:
        acts, sources = self._take(n)
        name = f"shard-{len(self.meta.shards):05d}"
        final = shard_paths(self.directory, name)
        for path, array in zip(final, (acts, sources)):
            partial = path.with_name(path.name + ".partial")
            with open(partial, "wb") as f:
                f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        fsync_directory(self.directory)
        self.meta.shards.append(ShardInfo(name=name, tokens=n, blake2b=file_digest(*final)))
        self.meta.write(self.directory)  # the shard exists for readers only from here on

    def close(self) -> StoreMetadata:
        """Write the buffered rows as the last shard and mark the store complete."""
        if self._buffered:
            self._write_shard(self._buffered)
        self.meta.complete = True
        self.meta.content_hash = self.meta.compute_content_hash()
        self.meta.write(self.directory)
        return self.meta

    def __enter__(self) -> "ActivationWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
