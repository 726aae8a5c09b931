"""Where the trainer's batches come from: an activation store, or a tensor in memory.
Both give the same interface: an infinite iterator of [batch, d_in] batches with a
resumable position, and a fixed random sample for initialization."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..store import ActivationLoader, ActivationStore, batch_positions

INIT_SAMPLE_TOKENS = 65536


class TensorBatches:
    """Shuffled batches of an in-memory tensor [M, d_in], epoch after epoch (the same
    index arithmetic as the store loader)."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, device: torch.device):
        if data.dim() != 2:
            raise ValueError(f"training data must be [tokens, d_in], got shape {tuple(data.shape)}")
        if data.shape[0] < batch_size:
            raise ValueError(f"training data has {data.shape[0]} tokens, fewer than one batch ({batch_size})")
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, device
        self.epoch, self.batch_in_epoch = 0, 0
        self.content_hash = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for epoch, b, rows in batch_positions(self.data.shape[0], self.batch_size, self.seed, epoch=self.epoch,
                                              skip=self.batch_in_epoch):
            self.epoch, self.batch_in_epoch = epoch, b + 1
            yield self.data[torch.from_numpy(rows)].to(self.device, torch.float32)


class StoreBatches:
    """Shuffled batches of an activation store, as fp32 on the training device."""

    def __init__(self, store: ActivationStore, batch_size: int, seed: int, device: torch.device):
        self.store = store
        self.loader = ActivationLoader(store, batch_size, seed=seed, device=device, dtype=torch.float32, epochs=None)
        self.content_hash = store.content_hash

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
