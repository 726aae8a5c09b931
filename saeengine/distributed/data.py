"""The data axis over an activation store: each data rank reads its own disjoint part of
every global batch, in an order fixed by the seed.

The global batches are the single-process loader's (:func:`saeengine.store.batch_positions`
with the GLOBAL batch size: blocks of the store permuted per epoch, pools of blocks
shuffled and cut into batches). Data rank r of D takes the r-th of D equal contiguous
parts of each global batch (:func:`rank_part`). Hence:

- the ranks' parts of a step are disjoint and together are that step's global batch;
  over an epoch they cover every token once (the last partial batch is dropped, as in
  the single-process loader);
- the order depends only on (seed, epoch, batch number): the same seed gives the same
  parts on every run, and D = 1 gives exactly the single-process loader's batches;
- the position is the global one, (epoch, batch in epoch), the same on every rank and
  stored in the single-process loader's state_dict layout, so a run resumes at another
  data size (2x2 -> 1x4) or at one process and continues with the same global batches;
- a step's gradient summed over the data ranks is the single-process gradient of the
  global batch (each part has batch_size / D rows: batch_size must divide by D).

Each rank reads only its rows (sorted, one gather per shard), and checks each shard's
checksum on its first read, as the single-process loader does.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..store import ActivationLoader, ActivationStore, batch_positions


def check_data_axis(batch_size: int, data_rank: int, data_size: int) -> None:
    """ConfigError unless 0 <= data_rank < data_size and batch_size divides by data_size."""
    for name, value, low in (("data_size", data_size, 1), ("data_rank", data_rank, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if data_rank >= data_size:
        raise InputError(f"data_rank={data_rank} must lie in [0, data_size={data_size}); take it from the mesh "
                         "(mesh.data_rank, mesh.data_size)")
    if batch_size % data_size:
        lower, upper = batch_size - batch_size % data_size, batch_size + data_size - batch_size % data_size
        raise ConfigError(f"the global batch_size={batch_size} does not divide by the data axis ({data_size} ranks): "
                          f"each rank must read an equal part; use batch_size={lower or upper} or {upper}")


def rank_part(rows: np.ndarray, data_rank: int, data_size: int) -> np.ndarray:
    """The rows [len(rows) / data_size] of a global batch that data rank ``data_rank``
    reads: the ``data_rank``-th of ``data_size`` contiguous parts (a partial last batch
    of an epoch, when kept, is split as evenly as possible: the first ranks one row more)."""
    base, extra = divmod(rows.shape[0], data_size)
    lo = data_rank * base + min(data_rank, extra)
    return rows[lo:lo + base + (1 if data_rank < extra else 0)]


def data_batch_positions(n_tokens: int, batch_size: int, seed: int, data_rank: int, data_size: int, *,
                         epoch: int = 0, skip: int = 0, **kwargs) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, batch number, this rank's token ids) of every global batch from (epoch,
    skip) on; ``batch_size`` is the GLOBAL batch, the other keywords those of
    :func:`saeengine.store.batch_positions`."""
    check_data_axis(batch_size, data_rank, data_size)
    for e, b, rows in batch_positions(n_tokens, batch_size, seed, epoch=epoch, skip=skip, **kwargs):
        yield e, b, rank_part(rows, data_rank, data_size)


class DataShardedLoader(ActivationLoader):
    """An :class:`~saeengine.store.ActivationLoader` for one data rank: it yields
    [batch_size / data_size, d_in] tensors, this rank's part of each global batch, and
    reads only those rows.

    Args (besides the loader's): batch_size: the GLOBAL batch size (divisible by
    ``data_size``); data_rank, data_size: this rank's place on the data axis.

    ``batch_size`` (the attribute) is the local part's size; ``global_batch_size`` the
    global one. ``state_dict()`` is the single-process loader's (the global position and
    batch size), so it loads into a loader of any data size, or a plain ActivationLoader.
    """

    def __init__(self, store: ActivationStore | str, batch_size: int, *, data_rank: int, data_size: int, **kwargs):
        check_data_axis(batch_size, data_rank, data_size)
        store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        if kwargs.get("drop_last", True) and 0 < store.n_tokens < batch_size:
            raise ConfigError(f"the global batch_size={batch_size} is larger than the {store.n_tokens} tokens of "
                              f"{store.directory}, so no full batch exists; use batch_size <= {store.n_tokens} "
                              "(a multiple of the data axis), or record more tokens")
        super().__init__(store, batch_size // data_size, **kwargs)
        self.global_batch_size, self.data_rank, self.data_size = int(batch_size), int(data_rank), int(data_size)

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.store.n_tokens, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        local, self.batch_size = self.batch_size, self.global_batch_size  # compared as the global size
        try:
            super().load_state_dict(state)
        finally:
            self.batch_size = local

    def _positions(self) -> Iterator[tuple[int, int, np.ndarray]]:
        return data_batch_positions(self.store.n_tokens, self.global_batch_size, self.seed, self.data_rank,
                                    self.data_size, epoch=self.epoch, skip=self.batch_in_epoch, epochs=self.epochs,
                                    shuffle=self.shuffle, drop_last=self.drop_last, block_rows=self.block_rows,
                                    pool_blocks=self.pool_blocks)


class DataShardedBatches:
    """A trainer batch source (:func:`saeengine.trainer.data.batch_source`: StoreBatches or
    TensorBatches, made with the GLOBAL batch size) for one data rank: its batches are this
    rank's parts [batch_size / data_size, d_in] of the source's global batches.

    What must agree across ranks is the source's: ``identity()``, ``init_rows`` (every rank
    fits the same normalization), ``state_dict()`` (the global position). ``rows_of_step``
    gives this rank's rows of a step (what a non-finite loss names).
    """

    def __init__(self, source, data_rank: int, data_size: int):
        check_data_axis(source.batch_size, data_rank, data_size)
        self.source, self.data_rank, self.data_size = source, int(data_rank), int(data_size)
        self.global_batch_size = source.batch_size
        self.batch_size = source.batch_size // data_size
        self.seed = source.seed
        loader = getattr(source, "loader", None)
        self._loader = None
        if loader is not None:  # a store: the sharded loader, with the source's settings
            self._loader = DataShardedLoader(source.store, source.batch_size, data_rank=data_rank, data_size=data_size,
                                             seed=source.seed, device=loader.device, dtype=loader.dtype, epochs=None,
                                             block_rows=loader.block_rows, pool_blocks=loader.pool_blocks)

    n_tokens = property(lambda self: self.source.n_tokens)
    d_in = property(lambda self: self.source.d_in)

    def identity(self) -> dict:
        return self.source.identity()

    def init_rows(self, seed: int) -> np.ndarray:
        return self.source.init_rows(seed)

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        return self.source.rows(rows)

    def describe_rows(self, rows: np.ndarray) -> str:
        return self.source.describe_rows(rows)

    def rows_of_step(self, step: int) -> np.ndarray:
        """This rank's rows of step ``step``'s batch [batch_size / data_size] (ascending)."""
        per_epoch = self.n_tokens // self.global_batch_size
        _, _, rows = next(self.source._positions(step // per_epoch, step % per_epoch))
        return np.sort(rank_part(rows, self.data_rank, self.data_size))

    def state_dict(self) -> dict:
        return self._loader.state_dict() if self._loader is not None else self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        (self._loader or self.source).load_state_dict(state)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._loader is not None:
            yield from self._loader
            return
        src = self.source  # a tensor in memory: gather this rank's rows, keep the source's position
        for epoch, b, rows in src._positions(src.epoch, src.batch_in_epoch):
            src.epoch, src.batch_in_epoch = epoch, b + 1
            ids = torch.from_numpy(rank_part(rows, self.data_rank, self.data_size)).to(src.data.device)
            yield src.data.index_select(0, ids).to(src.device, torch.float32)


def shard_batches(source, data_rank: int, data_size: int) -> DataShardedBatches:
    """``source`` (a trainer batch source with the global batch size) for one data rank."""
    return DataShardedBatches(source, data_rank, data_size)
