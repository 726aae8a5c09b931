"""Where the trainer's batches come from: an activation store, or a tensor in memory.
Both give the same interface: an infinite iterator of [batch, d_in] batches with a
resumable position, the data's identity (checked on resume), a fixed random sample for
initialization, and the rows of any step's batch (named when a step goes non-finite).

Both are checked before any work: data too small for one batch raises ConfigError
(an epoch would hold no batch, and the batch iterator would spin forever), and a tensor
with a NaN or inf raises NonFiniteError naming its first bad row. A store's rows are
checked where they are read: the initialization sample here, a training batch when its
loss goes non-finite (saeengine.trainer.finite)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import ConfigError, NonFiniteError
from ..store import ActivationLoader, ActivationStore, batch_positions

INIT_SAMPLE_TOKENS = 65536
HASH_CHUNK_ELEMENTS = 1 << 24
SHOWN_ROWS = 8  # rows listed in an error message (the exception keeps them all)


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes (read in chunks; a CUDA tensor is
    copied to the host chunk by chunk)."""
    digest = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    flat = t.detach().reshape(-1)
    for chunk in flat.split(HASH_CHUNK_ELEMENTS):
        digest.update(chunk.cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def nonfinite_rows(t: torch.Tensor, first_only: bool = False) -> np.ndarray:
    """Indices of the rows of ``t`` [M, d] holding a NaN or inf (int64, ascending), read in
    chunks of about 2^24 elements (one host read per chunk); ``first_only`` stops at the
    first chunk with one."""
    per_chunk = max(1, HASH_CHUNK_ELEMENTS // max(1, t.shape[1]))
    found = []
    for start in range(0, t.shape[0], per_chunk):
        bad = (~torch.isfinite(t[start:start + per_chunk]).all(dim=1)).nonzero().flatten()
        if bad.numel():
            found.append(bad.cpu().numpy() + start)
            if first_only:
                break
    return np.concatenate(found).astype(np.int64) if found else np.empty(0, dtype=np.int64)


def _too_small(n_tokens: int, batch_size: int, what: str) -> ConfigError:
    fix = (f"lower batch_size to at most {n_tokens}, or give more data" if n_tokens >= 2 else
           "give more data (a batch needs at least 2 tokens)")
    return ConfigError(f"{what} holds {n_tokens} tokens, fewer than one batch (TrainConfig.batch_size={batch_size}): "
                       f"no step could be taken; {fix}")


def _listed(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:SHOWN_ROWS])
    return f"{shown}, ... ({len(rows)} rows)" if len(rows) > SHOWN_ROWS else shown


class _PinnedRing:
    """Pinned host buffers of one shape, used in turn for non-blocking copies to the GPU
    (the store loader's scheme): a buffer is refilled only after its last copy has run,
    which waits on the host only when the GPU is ``count`` batches behind."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, count: int = 4):
        self.buffers = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(count)]
        self.copied: list[torch.cuda.Event | None] = [None] * count
        self.slot = 0

    def take(self) -> torch.Tensor:
        """The next free buffer, to fill on the host."""
        if self.copied[self.slot] is not None:
            self.copied[self.slot].synchronize()
        return self.buffers[self.slot]

    def send(self, device: torch.device) -> torch.Tensor:
        """Copy the buffer of the last :meth:`take` to ``device``, without waiting."""
        out = self.buffers[self.slot].to(device, non_blocking=True)
        self.copied[self.slot] = torch.cuda.Event()
        self.copied[self.slot].record()
        self.slot = (self.slot + 1) % len(self.buffers)
        return out


class _Batches:
    """What both sources share: the batch of a step, and the init sample's rows."""

    batch_size: int
    seed: int
    n_tokens: int

    def _positions(self, epoch: int = 0, skip: int = 0):
        return batch_positions(self.n_tokens, self.batch_size, self.seed, epoch=epoch, skip=skip)

    def rows_of_step(self, step: int) -> np.ndarray:
        """The data rows of step ``step``'s batch [batch_size] (int64, ascending). The
        batches follow the steps one to one from (epoch 0, batch 0), so this replays the
        index arithmetic; no data is read."""
        per_epoch = self.n_tokens // self.batch_size
        return np.sort(next(self._positions(step // per_epoch, step % per_epoch))[2])

    def init_rows(self, seed: int) -> np.ndarray:
        """The rows of the initialization sample: up to 65536, drawn with (seed, 7), ascending."""
        rng = np.random.default_rng([seed, 7])
        return np.sort(rng.choice(self.n_tokens, size=min(self.n_tokens, INIT_SAMPLE_TOKENS), replace=False))


class TensorBatches(_Batches):
    """Shuffled batches of an in-memory tensor [M, d_in], epoch after epoch (the same
    index arithmetic as the store loader), as fp32 on the training device.

    For a CUDA device nothing waits on the host: a CPU tensor's rows are gathered into
    pinned buffers and copied without blocking (as the store loader does), and for a
    CUDA tensor the row ids go the same way. (Pinned memory needs CUDA: on a CPU-only
    machine the batches are plain CPU tensors.)

    Raises ConfigError for a tensor that is not [tokens >= batch_size, d_in >= 1] of a
    floating dtype, and NonFiniteError naming the first row with a NaN or inf."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, device: torch.device):
        if data.dim() != 2 or data.shape[1] < 1:
            raise ConfigError(f"training data must be a tensor [tokens, d_in] with d_in >= 1, got shape "
                              f"{tuple(data.shape)}")
        if not data.dtype.is_floating_point:
            raise ConfigError(f"training data must be a floating-point tensor, got {data.dtype}; convert it "
                              "(data.float()) if those numbers are activations")
        if data.shape[0] < batch_size:
            raise _too_small(data.shape[0], batch_size, "the training tensor")
        bad = nonfinite_rows(data, first_only=True)
        if bad.size:
            row = int(bad[0])
            values = data[row]
            column = int((~torch.isfinite(values)).nonzero()[0])
            raise NonFiniteError(f"training data row {row} holds {values[column].item()} at column {column} (NaN or "
                                 f"inf: the SAE would train to NaN); drop or repair such rows first, e.g. "
                                 "data[torch.isfinite(data).all(dim=1)]")
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, torch.device(device)
        self.epoch, self.batch_in_epoch = 0, 0
        # Hashed now, before any step: hashing copies the whole tensor to the host, which
        # would otherwise stall the run at its first checkpoint.
        self._identity = {"kind": "tensor", "shape": list(data.shape), "dtype": str(data.dtype).removeprefix("torch."),
                          "sha256": tensor_sha256(data)}

    @property
    def n_tokens(self) -> int:
        return self.data.shape[0]

    @property
    def d_in(self) -> int:
        return self.data.shape[1]

    def identity(self) -> dict:
        """What the data is, for resuming: shape, dtype and the SHA-256 of the tensor
        (computed once, when the source is made)."""
        return self._identity

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """The rows ``rows`` as fp32 [len(rows), d_in] on the CPU."""
        return self.data[torch.from_numpy(rows).to(self.data.device)].float().cpu()

    def describe_rows(self, rows: np.ndarray) -> str:
        return f"tensor rows {_listed(rows)}"

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        to_gpu = self.device.type == "cuda"
        on_host = self.data.device.type == "cpu"
        ring = None
        if to_gpu:  # what crosses to the GPU: the rows themselves, or the row ids of a GPU tensor
            ring = (_PinnedRing((self.batch_size, self.data.shape[1]), self.data.dtype) if on_host
                    else _PinnedRing((self.batch_size,), torch.int64))
        for epoch, b, rows in self._positions(self.epoch, self.batch_in_epoch):
            self.epoch, self.batch_in_epoch = epoch, b + 1
            ids = torch.from_numpy(rows)
            if ring is None:
                batch = self.data[ids]
            elif on_host:
                torch.index_select(self.data, 0, ids, out=ring.take())
                batch = ring.send(self.device)
            else:
                ring.take().copy_(ids)
                batch = self.data.index_select(0, ring.send(self.data.device))
            yield batch.to(self.device, torch.float32)


class StoreBatches(_Batches):
    """Shuffled batches of an activation store, as fp32 on the training device.

    Raises ConfigError for a store with fewer tokens than one batch."""

    def __init__(self, store: ActivationStore, batch_size: int, seed: int, device: torch.device):
        if store.n_tokens < batch_size:
            raise _too_small(store.n_tokens, batch_size, f"the activation store {store.directory}")
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.loader = ActivationLoader(store, batch_size, seed=seed, device=device, dtype=torch.float32, epochs=None)
        self.content_hash = store.content_hash

    @property
    def n_tokens(self) -> int:
        return self.store.n_tokens

    @property
    def d_in(self) -> int:
        return self.store.d_in

    def _positions(self, epoch: int = 0, skip: int = 0):
        loader = self.loader  # the loader's own block and pool sizes
        return batch_positions(self.n_tokens, self.batch_size, self.seed, epoch=epoch, skip=skip,
                               block_rows=loader.block_rows, pool_blocks=loader.pool_blocks)

    def identity(self) -> dict:
        """What the data is, for resuming: the store's content hash."""
        return {"kind": "store", "content_hash": self.content_hash}

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        return self.store.get(rows).float()

    def describe_rows(self, rows: np.ndarray) -> str:
        """Store rows with their (image, position) sources, and the image's path where the
        store records paths."""
        images, positions = self.store.sources(rows[:SHOWN_ROWS])
        paths = self.store.n_images > 0

        def image(i: int) -> str:
            return f"image {i} {self.store.image_path(i)!r}" if paths and i < self.store.n_images else f"image {i}"

        shown = ", ".join(f"{int(r)} ({image(int(i))}, position {int(p)})" for r, i, p in zip(rows, images, positions))
        more = f", ... ({len(rows)} rows)" if len(rows) > SHOWN_ROWS else ""
        return f"rows {shown}{more} of the activation store {self.store.directory}"

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.loader)


def batch_source(data, batch_size: int, seed: int, device: torch.device):
    """data: a store directory (str or Path), an ActivationStore, or a tensor [tokens, d_in]."""
    if isinstance(data, (str, Path)):
        data = ActivationStore(data)
    if isinstance(data, ActivationStore):
        return StoreBatches(data, batch_size, seed, device)
    if isinstance(data, torch.Tensor):
        return TensorBatches(data, batch_size, seed, device)
    raise TypeError(f"training data must be an activation store directory or a tensor [tokens, d_in], "
                    f"got {type(data).__name__}")


def init_sample(source, seed: int) -> torch.Tensor:
    """A fixed random sample of up to 65536 tokens (fp32, on CPU) for initialization.
    Raises NonFiniteError naming its rows that hold a NaN or inf (a tensor was checked
    whole already; a store's rows are checked as they are read)."""
    rows = source.init_rows(seed)
    sample = source.rows(rows)
    bad = nonfinite_rows(sample)
    if bad.size:
        raise NonFiniteError(f"{source.describe_rows(rows[bad])} hold NaN or inf activations (found in the sample "
                             "that initializes the SAE, before training): the SAE would train to NaN; re-record the "
                             "store, or write one without those rows")
    return sample
