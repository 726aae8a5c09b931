"""The files an encode pass writes batch by batch: the codes (fixed width, or CSR) and the
token sources, as .npy files (saeengine.eval.encoded lists them).

Writes go through the file descriptor (``pwrite``), never through a writable memory map:
pages written stay in the page cache, not in the writer's resident memory, so the pass's
memory does not grow with the tokens. Fixed-shape files are created at full size by
``numpy.lib.format.open_memmap`` (sparse until written). A file that grows (the CSR's
entries) is a 1-D .npy whose header is rewritten with the committed length at every
flush: numpy pads a header so that a growing first axis keeps its size.

Resuming: :meth:`CodeFiles.reopen` takes the committed token and entry counts; rows past
them are rewritten, and the growing files are cut back to the committed entries.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from .._atomic import fsync_directory, raise_if_disk_full
from ..errors import StoreCorruptError
from .encoded import CSR, FIXED, INDICES, INDPTR, SOURCES, VALUES

_INDEX_DTYPE, _VALUE_DTYPE = np.dtype(np.int32), np.dtype(np.float32)
_AGAIN = "run encode again with resume=False (CLI: --no-resume) to start the pass over"


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    npy.write_array_header_1_0(out, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return out.getvalue()


def _header_size(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    with open(path, "rb") as fh:
        version = npy.read_magic(fh)
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f".npy format version {version} is not one the encode pass writes")
        shape, _, dtype = read(fh)
        return fh.tell(), shape, dtype


class _File:
    """One .npy file opened for writing at byte offsets past its header."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), row_shape
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.fd = -1
        self.offset = 0

    def _open(self, expect_shape: tuple[int, ...] | None) -> None:
        try:
            self.offset, shape, dtype = _header_size(self.path)
        except (OSError, ValueError) as exc:
            raise StoreCorruptError(f"{self.path} cannot be read back ({exc}); {_AGAIN}") from exc
        if dtype != self.dtype or (expect_shape is not None and shape != expect_shape):
            raise StoreCorruptError(f"{self.path} holds {dtype} {list(shape)}, expected {self.dtype} "
                                    f"{list(expect_shape or shape)}; {_AGAIN}")
        self.fd = os.open(self.path, os.O_RDWR)

    def pwrite(self, row: int, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array, dtype=self.dtype)).cast("B")
        at = self.offset + row * self.row_bytes
        try:
            while data:
                done = os.pwrite(self.fd, data, at)
                data, at = data[done:], at + done
        except OSError as exc:
            raise_if_disk_full(self.path, exc)
            raise

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise_if_disk_full(self.path, exc)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Rows(_File):
    """A fixed-shape [n, *row_shape] file, created at full size."""

    def __init__(self, path: Path, dtype, n: int, row_shape: tuple[int, ...] = ()):
        super().__init__(path, dtype, row_shape)
        self.shape = (n, *row_shape)

    def create(self) -> None:
        created = npy.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape)  # header, sparse body
        del created
        self._open(self.shape)

    def reopen(self) -> None:
        self._open(self.shape)
        expected = self.offset + self.shape[0] * self.row_bytes
        if os.fstat(self.fd).st_size != expected:
            raise StoreCorruptError(f"{self.path} is {os.fstat(self.fd).st_size} bytes, expected {expected}; {_AGAIN}")


class _Growing(_File):
    """A 1-D file that grows: ``length`` items committed, the header saying so."""

    def __init__(self, path: Path, dtype):
        super().__init__(path, dtype, ())
        self.length = 0
        if len(_header(self.dtype, (0,))) != len(_header(self.dtype, (1 << 62,))):
            raise RuntimeError("this numpy writes .npy headers whose size depends on the length; saeengine's encode "
                               "needs numpy >= 1.24")

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def create(self) -> None:
        self.path.write_bytes(_header(self.dtype, (0,)))
        self._open((0,))

    def reopen(self, length: int) -> None:
        self._open(None)
        size = os.fstat(self.fd).st_size
        if size < self.offset + length * self.dtype.itemsize:
            raise StoreCorruptError(f"{self.path} holds fewer than the {length} committed entries; {_AGAIN}")
        os.ftruncate(self.fd, self.offset + length * self.dtype.itemsize)  # drop an uncommitted tail
        self.length = length

    def append(self, array: np.ndarray) -> None:
        self.pwrite(self.length, array)
        self.length += array.shape[0]

    def sync(self) -> None:
        header = _header(self.dtype, (self.length,))
        assert len(header) == self.offset, "the .npy header changed size"
        super().sync()  # the entries first, then the header that counts them
        os.pwrite(self.fd, header, 0)
        super().sync()


class CodeFiles:
    """The codes and sources of an N-token pass.

    layout: "fixed" (values float32 / indices int32 [N, width]) or "csr" (indptr int64
    [N + 1], indices int32 / values float32 [entries]). :meth:`write` takes one batch of
    consecutive rows; :meth:`sync` makes everything written so far durable.
    """

    def __init__(self, directory: Path, layout: str, n_tokens: int, width: int | None):
        self.directory, self.layout, self.n = Path(directory), layout, n_tokens
        self.sources = _Rows(self.directory / SOURCES, np.int64, n_tokens, (2,))
        if layout == FIXED:
            self.values = _Rows(self.directory / VALUES, _VALUE_DTYPE, n_tokens, (width,))
            self.indices = _Rows(self.directory / INDICES, _INDEX_DTYPE, n_tokens, (width,))
            self.indptr = None
            self._files = [self.sources, self.values, self.indices]
        elif layout == CSR:
            self.indptr = _Rows(self.directory / INDPTR, np.int64, n_tokens + 1)
            self.values, self.indices = _Growing(self.directory / VALUES, _VALUE_DTYPE), \
                _Growing(self.directory / INDICES, _INDEX_DTYPE)
            self._files = [self.sources, self.indptr, self.values, self.indices]
        else:
            raise ValueError(f"unknown code layout {layout!r}")
        self.named = {f.path.name: f for f in self._files}  # file name -> its writer (shape, dtype)

    @property
    def entries(self) -> int:
        """Code entries written: N x width (fixed), the firing entries (CSR)."""
        return self.values.length if self.layout == CSR else self.n * self.values.row_shape[0]

    def create(self) -> None:
        for f in self._files:
            f.create()
        if self.indptr is not None:
            self.indptr.pwrite(0, np.zeros(1, dtype=np.int64))
        fsync_directory(self.directory)

    def reopen(self, entries: int) -> None:
        """Continue after a commit that held ``entries`` code entries (CSR; ignored for fixed)."""
        for f in self._files:
            if isinstance(f, _Growing):
                f.reopen(entries)
            else:
                f.reopen()

    def write(self, row: int, values: np.ndarray, indices: np.ndarray, image: np.ndarray,
              position: np.ndarray) -> None:
        """Rows ``row`` .. row + n - 1: values float32 [n, w], indices int64 [n, w] (0 = off
        in values), image and position int64 [n]."""
        self.sources.pwrite(row, np.stack([image, position], axis=1))
        if self.layout == FIXED:
            self.values.pwrite(row, values)
            self.indices.pwrite(row, indices.astype(_INDEX_DTYPE))
            return
        fire = values > 0
        self.indptr.pwrite(row + 1, self.values.length + np.cumsum(fire.sum(1), dtype=np.int64))
        self.values.append(values[fire])
        self.indices.append(indices[fire].astype(_INDEX_DTYPE))

    def sync(self) -> None:
        for f in self._files:
            f.sync()

    def close(self) -> None:
        for f in self._files:
            f.close()
