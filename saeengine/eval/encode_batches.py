"""The batches of an encode pass: consecutive store rows, cut at image boundaries.

A batch starts at a row and takes whole images while they fit in ``batch_tokens`` rows;
an image with more tokens than that is a batch of its own. The cut depends only on the
row a batch starts at, so a pass resumed at a batch boundary cuts the batches an
uninterrupted pass cuts. Image ids must ascend through the store (each image's tokens
together, images in increasing order: what record_activations writes); anything else
raises DataError naming the rows. The next batch is read on a background thread while
the caller encodes the current one.

The store's shards are memory-mapped, and every page read stays in the process's resident
memory until unmapped. Once the pass is past a shard, its pages are dropped from the map
(ActivationStore.drop_pages: they stay in the page cache), so the pass's RSS holds at most about
one shard of the store, whatever its size.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import DataError


@dataclass
class StoreBatch:
    """Rows ``row`` .. row + n - 1 of the store: x [n, d_in] (the store's dtype, CPU),
    image, position int64 [n], is_cls bool [n]."""

    row: int
    x: torch.Tensor
    image: np.ndarray
    position: np.ndarray
    is_cls: np.ndarray

    @property
    def stop(self) -> int:
        return self.row + int(self.image.shape[0])


def cls_lookup(meta) -> tuple[np.ndarray | None, bool]:
    """(is-CLS by position from meta.extra["token_kinds"], or None; the answer for
    positions it does not cover: True only for a store of CLS tokens alone)."""
    kinds = meta.extra.get("token_kinds") if isinstance(meta.extra, dict) else None
    by_position = None
    if isinstance(kinds, list) and all(isinstance(k, str) for k in kinds):
        by_position = np.array([k == "cls" for k in kinds], dtype=bool)
    return by_position, meta.token_kind == "cls"


class OrderedBatches:
    """Iterate the store's batches from row ``start`` (a batch boundary); ``last_image``
    is the image id of the row before ``start`` (-1 at the start)."""

    def __init__(self, store, batch_tokens: int, start: int, last_image: int):
        self.store, self.batch_tokens, self.start, self.last_image = store, batch_tokens, start, last_image
        self.n = store.n_tokens
        self._cls, self._cls_default = cls_lookup(store.meta)

    def _images(self, a: int, b: int) -> np.ndarray:
        return self.store.sources(np.arange(a, b, dtype=np.int64))[0]

    def stop_of(self, start: int) -> int:
        """The row after the batch that starts at ``start``."""
        end = min(start + self.batch_tokens, self.n)
        if end == self.n:
            return end
        window = self._images(start, end + 1)  # one row past the budget: whose image is it?
        if _unsorted(window):
            return end  # check_order names the rows, in this batch or the next
        first_of_next = int(np.searchsorted(window, window[-1], side="left"))
        if first_of_next > 0:
            return start + first_of_next
        at = end + 1  # one image fills the whole window: the batch is that image
        while at < self.n:
            chunk = self._images(at, min(at + self.batch_tokens, self.n))
            if _unsorted(chunk) or chunk[0] < window[-1]:
                return at
            past = int(np.searchsorted(chunk, window[-1], side="right"))
            if past < chunk.shape[0]:
                return at + past
            at += chunk.shape[0]
        return self.n

    def read(self, start: int) -> StoreBatch:
        stop = self.stop_of(start)
        rows = np.arange(start, stop, dtype=np.int64)
        image, position = self.store.sources(rows)
        if self._cls is None:
            is_cls = np.full(rows.shape[0], self._cls_default)
        else:
            covered = position < self._cls.shape[0]
            is_cls = np.where(covered, self._cls[np.minimum(position, self._cls.shape[0] - 1)], self._cls_default)
        batch = StoreBatch(start, self.store.get(rows), image, position, is_cls)
        self.store.drop_pages(stop)  # past these shards for good: keep RSS at about one shard
        return batch

    def check_order(self, batch: StoreBatch, last_image: int) -> None:
        """Image ids ascend within the batch and past the previous batch's last image."""
        down = np.flatnonzero(np.diff(batch.image) < 0)
        if down.size or batch.image[0] <= last_image:
            row = batch.row + int(down[0]) + 1 if down.size else batch.row
            before = int(batch.image[row - batch.row - 1]) if down.size else last_image
            raise DataError(
                f"the store {self.store.directory} has image {int(batch.image[row - batch.row])} at row {row} after "
                f"image {before}: the encode pass needs each image's tokens together and the images in increasing "
                "order (as record_activations writes them); write the store's tokens sorted by image index")

    def __iter__(self) -> Iterator[StoreBatch]:
        last = self.last_image
        with ThreadPoolExecutor(1, thread_name_prefix="saeengine-encode-read") as pool:
            pending = pool.submit(self.read, self.start) if self.start < self.n else None
            while pending is not None:
                batch = pending.result()
                pending = pool.submit(self.read, batch.stop) if batch.stop < self.n else None
                self.check_order(batch, last)
                last = int(batch.image[-1])
                yield batch


def _unsorted(images: np.ndarray) -> bool:
    return bool((np.diff(images) < 0).any())
