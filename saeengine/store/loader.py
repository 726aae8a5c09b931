"""Batches from an activation store: shuffled across shards for training, ordered for inference.

Shuffling is pure index arithmetic, separate from reading:
- Every epoch permutes the store's blocks of ``block_rows`` consecutive tokens.
- Blocks are then taken ``pool_blocks`` at a time. Each pool's rows, plus the rows left
  over from the last pool, are permuted and cut into batches.
- A batch therefore mixes tokens from many places in the store, hence many images, and
  every token appears once per epoch.

Since the batches depend only on (seed, epoch, batch number), resuming means replaying
the index arithmetic, never re-reading data. A background thread gathers each batch
(sorted rows, vectorized ``np.take`` per shard) into a reused buffer. On CUDA that buffer
is pinned, and the copy to the GPU is non-blocking.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from ..errors import ConfigError, DataMismatchError, StoreError
from .reader import ActivationStore, as_tensor


def epoch_batches(n_tokens: int, batch_size: int, seed: int, epoch: int, *, block_rows: int = 256,
                  pool_blocks: int = 128, drop_last: bool = True) -> Iterator[np.ndarray]:
    """The token ids of each shuffled batch of one epoch (int64 arrays)."""
    rng = np.random.default_rng([seed, epoch])
    n_blocks = -(-n_tokens // block_rows)
    blocks = rng.permutation(n_blocks)
    carry = np.empty(0, dtype=np.int64)
    for g in range(0, n_blocks, pool_blocks):
        starts = blocks[g:g + pool_blocks] * block_rows
        rows = (starts[:, None] + np.arange(block_rows)[None, :]).reshape(-1)
        rows = np.concatenate([carry, rows[rows < n_tokens]])
        rows = rows[rng.permutation(rows.size)]
        n_full = rows.size // batch_size
        for i in range(n_full):
            yield rows[i * batch_size:(i + 1) * batch_size]
        carry = rows[n_full * batch_size:]
    if carry.size and not drop_last:
        yield carry


def batch_positions(n_tokens: int, batch_size: int, seed: int, *, epoch: int = 0, skip: int = 0,
                    epochs: int | None = None, shuffle: bool = True, drop_last: bool = True, block_rows: int = 256,
                    pool_blocks: int = 128) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, batch number, token ids) of every batch from (epoch, skip) on, until
    ``epochs`` (None: forever). Shuffled batches come from :func:`epoch_batches`; ordered
    ones are consecutive ids. Resuming replays this arithmetic; no data is read.

    Raises ConfigError when an epoch holds no batch (it would loop forever yielding nothing)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if n_tokens < 1 or (drop_last and n_tokens < batch_size):
        raise ConfigError(f"batch_size={batch_size} is larger than the data's {n_tokens} tokens, so an epoch holds "
                          f"no full batch; use batch_size <= {max(n_tokens, 1)}, or record more tokens")
    while epochs is None or epoch < epochs:
        if shuffle:
            rows = epoch_batches(n_tokens, batch_size, seed, epoch, block_rows=block_rows, pool_blocks=pool_blocks,
                                 drop_last=drop_last)
        else:
            stop = n_tokens - n_tokens % batch_size if drop_last else n_tokens
            rows = (np.arange(start, min(start + batch_size, n_tokens), dtype=np.int64)
                    for start in range(0, stop, batch_size))
        for b, batch in enumerate(rows):
            if b >= skip:
                yield epoch, b, batch
        epoch, skip = epoch + 1, 0


class ActivationLoader:
    """Iterates over [batch_size, d_in] tensors from an :class:`ActivationStore`.

    Args:
        store: an ActivationStore (or its directory).
        batch_size: tokens per batch.
        shuffle: shuffled batches across shards (training), else store order (inference).
        seed: shuffling seed; epoch e uses (seed, e).
        device: where batches go (CUDA: pinned staging buffers and non-blocking copies).
        dtype: the batches' dtype (default: the store's).
        drop_last: drop the last partial batch of an epoch.
        prefetch: batches prepared ahead by the background thread.
        epochs: how many epochs one iteration runs (None: forever).

    ``state_dict()`` / ``load_state_dict()`` record the position (epoch, batch) so that a
    resumed run sees exactly the batches an uninterrupted run would have seen.

    The store checks each shard's checksum on its first read (``verify="once"``, in the
    loader's thread, several shards in parallel): the first batch of a shuffled epoch pays
    for hashing the store once per process, later batches nothing.
    """

    def __init__(self, store: ActivationStore | str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None, drop_last: bool = True,
                 prefetch: int = 4, epochs: int | None = 1, block_rows: int = 256, pool_blocks: int = 128):
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if self.store.n_tokens == 0:
            raise StoreError(f"{self.store.directory} holds no tokens; record some activations into it first")
        if drop_last and self.store.n_tokens < batch_size:
            raise ConfigError(f"batch_size={batch_size} is larger than the {self.store.n_tokens} tokens of "
                              f"{self.store.directory}, so no full batch exists; use batch_size <= "
                              f"{self.store.n_tokens}, drop_last=False, or record more tokens")
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.device = torch.device(device)
        self.dtype = dtype or self.store.dtype
        self.prefetch, self.epochs = max(1, int(prefetch)), epochs
        self.block_rows, self.pool_blocks = block_rows, pool_blocks
        self.epoch, self.batch_in_epoch = 0, 0

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.store.n_tokens, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "batch_size": self.batch_size, "content_hash": self.store.content_hash}

    def load_state_dict(self, state: dict) -> None:
        if state.get("content_hash") != self.store.content_hash:
            raise DataMismatchError(f"the loader state belongs to another store (content hash "
                                    f"{state.get('content_hash')}, this store's is {self.store.content_hash}); "
                                    "resume with the store the run was started on")
        if state["batch_size"] != self.batch_size:
            raise ConfigError(f"the loader state was saved with batch_size={state['batch_size']}, "
                              f"this loader has {self.batch_size}; use the saved batch size")
        self.seed, self.epoch, self.batch_in_epoch = state["seed"], state["epoch"], state["batch_in_epoch"]

    def _positions(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch number, token ids) from the current position on."""
        return batch_positions(self.store.n_tokens, self.batch_size, self.seed, epoch=self.epoch,
                               skip=self.batch_in_epoch, epochs=self.epochs, shuffle=self.shuffle,
                               drop_last=self.drop_last, block_rows=self.block_rows, pool_blocks=self.pool_blocks)

    def __iter__(self) -> Iterator[torch.Tensor]:
        pinned = self.device.type == "cuda"
        n_buffers = self.prefetch + 2
        raw_dtype = self.store._np_dtype
        buffers = [torch.empty((self.batch_size, self.store.d_in), dtype=self.store.dtype, pin_memory=pinned)
                   for _ in range(n_buffers)] if pinned else None
        free: queue.Queue = queue.Queue()
        for i in range(n_buffers if pinned else 0):
            free.put(i)
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for epoch, b, rows in self._positions():
                    rows = np.sort(rows)  # sequential reads; order inside a batch does not matter
                    if pinned:
                        slot = free.get()
                        view = buffers[slot][: rows.size]
                        raw = view.view(torch.int16) if self.store.dtype == torch.bfloat16 else view
                        self.store.gather_into(rows, raw.numpy().view(raw_dtype))
                        item = (epoch, b, slot, view)
                    else:
                        out = np.empty((rows.size, self.store.d_in), dtype=raw_dtype)
                        self.store.gather_into(rows, out)
                        item = (epoch, b, None, as_tensor(out, self.store.dtype))
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ready.put(None)
            except BaseException as exc:  # surfaced in the consumer
                ready.put(exc)

        thread = threading.Thread(target=produce, name="saeengine-loader", daemon=True)
        thread.start()
        pending: list[tuple[int, torch.cuda.Event]] = []
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                epoch, b, slot, batch = item
                if pinned:
                    out = batch.to(self.device, self.dtype, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    pending.append((slot, event))
                    while pending and pending[0][1].query():  # the copy finished: reuse the buffer
                        free.put(pending.pop(0)[0])
                    if free.empty() and pending:
                        pending[0][1].synchronize()
                        free.put(pending.pop(0)[0])
                else:
                    out = batch.to(self.device, self.dtype)
                self.epoch, self.batch_in_epoch = epoch, b + 1
                yield out
        finally:
            stop.set()
            thread.join(timeout=5)
