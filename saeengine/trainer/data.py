"""Where the trainer's batches come from: an activation store, or a tensor in memory.
Both give the same interface: an infinite iterator of [batch, d_in] batches with a
resumable position, the data's identity (checked on resume), and a fixed random sample
for initialization."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..store import ActivationLoader, ActivationStore, batch_positions

INIT_SAMPLE_TOKENS = 65536
HASH_CHUNK_ELEMENTS = 1 << 24


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes (read in chunks; a CUDA tensor is
    copied to the host chunk by chunk)."""
    digest = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    flat = t.detach().reshape(-1)
    for chunk in flat.split(HASH_CHUNK_ELEMENTS):
        digest.update(chunk.cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


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


class TensorBatches:
    """Shuffled batches of an in-memory tensor [M, d_in], epoch after epoch (the same
    index arithmetic as the store loader), as fp32 on the training device.

    For a CUDA device nothing waits on the host: a CPU tensor's rows are gathered into
    pinned buffers and copied without blocking (as the store loader does), and for a
    CUDA tensor the row ids go the same way. (Pinned memory needs CUDA: on a CPU-only
    machine the batches are plain CPU tensors.)"""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, device: torch.device):
        if data.dim() != 2:
            raise ValueError(f"training data must be [tokens, d_in], got shape {tuple(data.shape)}")
        if data.shape[0] < batch_size:
            raise ValueError(f"training data has {data.shape[0]} tokens, fewer than one batch ({batch_size})")
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, torch.device(device)
        self.epoch, self.batch_in_epoch = 0, 0
        self._identity: dict | None = None

    def identity(self) -> dict:
        """What the data is, for resuming: shape, dtype and the SHA-256 of the tensor
        (computed once)."""
        if self._identity is None:
            self._identity = {"kind": "tensor", "shape": list(self.data.shape),
                              "dtype": str(self.data.dtype).removeprefix("torch."),
                              "sha256": tensor_sha256(self.data)}
        return self._identity

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
        for epoch, b, rows in batch_positions(self.data.shape[0], self.batch_size, self.seed, epoch=self.epoch,
                                              skip=self.batch_in_epoch):
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


class StoreBatches:
    """Shuffled batches of an activation store, as fp32 on the training device."""

    def __init__(self, store: ActivationStore, batch_size: int, seed: int, device: torch.device):
        self.store = store
        self.loader = ActivationLoader(store, batch_size, seed=seed, device=device, dtype=torch.float32, epochs=None)
        self.content_hash = store.content_hash

    def identity(self) -> dict:
        """What the data is, for resuming: the store's content hash."""
        return {"kind": "store", "content_hash": self.content_hash}

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
    """A fixed random sample of up to 65536 tokens (fp32, on CPU) for initialization."""
    n = source.store.n_tokens if isinstance(source, StoreBatches) else source.data.shape[0]
    rng = np.random.default_rng([seed, 7])
    rows = np.sort(rng.choice(n, size=min(n, INIT_SAMPLE_TOKENS), replace=False))
    if isinstance(source, StoreBatches):
        return source.store.get(rows).float()
    return source.data[torch.from_numpy(rows)].float().cpu()


def d_in_of(source) -> int:
    return source.store.d_in if isinstance(source, StoreBatches) else source.data.shape[1]
