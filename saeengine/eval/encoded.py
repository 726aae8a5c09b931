"""The encode output folder, and :class:`EncodedDataset`, the reader every later tool uses.

A folder written by :func:`saeengine.eval.encode.encode_store` (N tokens, F = d_sae)::

    summary.json              written LAST (atomically): the commit of a finished pass. The
                              SAE (folder, checksum, config), the store (folder, content hash,
                              backbone, layer, token kind), the settings, the counts, the
                              metrics, and every file's shape, dtype and what it holds
    codes.values.npy          fixed width w (TopK, Matryoshka-TopK): float32 [N, w], row n =
                              token n's code values (0 = off); variable width (ReLU,
                              JumpReLU, BatchTopK): float32 [nnz], the firing values (CSR)
    codes.indices.npy         int32 [N, w] latent ids of codes.values; CSR: int32 [nnz]
    codes.indptr.npy          CSR only: int64 [N + 1], token n's entries are
                              indptr[n]:indptr[n + 1] of codes.values / codes.indices
    sources.npy               int64 [N, 2]: (image index, position) of every token (the
                              store's sources, in store order)
    latent_stats.safetensors  the LatentStats result (saeengine.eval.latent_stats)
    exemplars.safetensors     the Exemplars result, tensors "<rule>.<scores|images|positions>"
    resume.safetensors        only while unfinished: the last commit (accumulator states and
                              progress); removed once summary.json is written
    .lock                     held (flock) by the encode pass while it runs

The .npy files are memory-mapped read-only by the reader. A folder without summary.json
is unfinished: the reader refuses it (StoreIncompleteError) and running encode again
finishes it.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np

from .._lock import LOCK_FILE
from ..errors import DataMismatchError, InputError, StoreCorruptError, StoreError, StoreIncompleteError
from ._args import is_int

FORMAT = "saeengine-encoded"
VERSION = 1
SUMMARY = "summary.json"
RESUME = "resume.safetensors"
VALUES, INDICES, INDPTR = "codes.values.npy", "codes.indices.npy", "codes.indptr.npy"
SOURCES = "sources.npy"
STATS, EXEMPLARS = "latent_stats.safetensors", "exemplars.safetensors"
FIXED, CSR = "fixed", "csr"  # the code layouts
LAYOUT_FILES = {FIXED: (VALUES, INDICES), CSR: (INDPTR, INDICES, VALUES)}
OWN_FILES = (SUMMARY, RESUME, VALUES, INDICES, INDPTR, SOURCES, STATS, EXEMPLARS, LOCK_FILE)
EXPLORER_ENTRIES = ("explore-notes.json", "explore-cache")  # saeengine explore's notes and cache: kept
_TMP = re.compile(r"\.(.+)\.tmp-[0-9a-f]{8}")  # saeengine._atomic's temporary names

HOLDS = {  # what each file holds: summary.json's "holds" and the CLI's --help
    (FIXED, VALUES): "code values of every token, row n = token n (0 = off), fixed width w = the SAE's k",
    (FIXED, INDICES): "latent ids of codes.values, row n = token n",
    (CSR, INDPTR): "token n's code entries are indptr[n]:indptr[n+1] of codes.values / codes.indices (CSR)",
    (CSR, INDICES): "latent id of every firing code entry, tokens in store order (CSR)",
    (CSR, VALUES): "value (> 0) of every firing code entry (CSR)",
    SOURCES: "(image index, position) of every token, the store's sources in store order",
    STATS: "per-latent statistics (LatentStats result): count, frequency, mean_nonzero, max, p99, histogram, ...",
    EXEMPLARS: "top-k exemplar images per latent by the rules patch, image and cls: <rule>.scores [F, K] float32 "
               "(-inf pad), <rule>.images and <rule>.positions [F, K] int64 (-1 pad)",
    SUMMARY: "this index: SAE, store, settings, counts, metrics and files",
}


def is_own_entry(name: str) -> bool:
    """Whether a folder entry is one the encode pass writes (or an unfinished atomic write of one)."""
    found = _TMP.fullmatch(name)
    return name in OWN_FILES or (found is not None and found.group(1) in OWN_FILES)


def foreign_entries(directory: Path) -> list[str]:
    """The entries of ``directory`` that an encode pass does not write (sorted)."""
    return sorted(p.name for p in Path(directory).iterdir()
                  if not is_own_entry(p.name) and p.name not in EXPLORER_ENTRIES)


def check_out_dir(out_dir: Path) -> None:
    """``out_dir`` may hold an encode output: it is absent, empty, or holds only encode
    files. Raises InputError otherwise (a file, or a folder of something else)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"out_dir {out_dir} is a file; pass a folder for the encode output (new or empty)")
    if not out_dir.is_dir():
        return
    foreign = foreign_entries(out_dir)
    if foreign:
        what = " (it looks like an activation store: pass it as the store, and another folder as out_dir)" \
            if "meta.json" in foreign else ""
        raise InputError(f"out_dir {out_dir} holds files that are not an encode output ({', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}){what}; choose a new or empty folder")


def rerun_hint(directory: Path) -> str:
    return (f"run encode again with the same SAE and store into {directory} (resume=True, the default; CLI: the "
            "same saeengine encode command) to finish it")


def read_summary(directory: Path) -> dict:
    """summary.json of a finished encode folder; StoreIncompleteError for an unfinished one,
    InputError for a folder that is no encode output, StoreCorruptError for a damaged one."""
    from ..store.reader import writer_holding

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory} is not a folder; pass the out_dir that saeengine encode wrote")
    path = directory / SUMMARY
    if not path.is_file():
        if not any(is_own_entry(p.name) and p.name != LOCK_FILE for p in directory.iterdir()):
            raise InputError(f"{directory} is not an encode output ({SUMMARY} is missing); run saeengine encode "
                             "to write one")
        holder = writer_holding(directory)
        if holder is not None:
            raise StoreIncompleteError(f"{directory} is being encoded by {holder}; wait for it to finish")
        raise StoreIncompleteError(f"{directory}: the encode pass did not finish ({SUMMARY} is missing); "
                                   f"{rerun_hint(directory)}")
    try:
        summary = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreCorruptError(f"{path} is not valid JSON ({exc}); run encode again with resume=False "
                                "(CLI: --no-resume) to rewrite the folder") from exc
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        raise InputError(f"{path} is not a saeengine encode summary (format "
                         f"{summary.get('format') if isinstance(summary, dict) else None!r})")
    if summary.get("version") != VERSION:
        raise InputError(f"{path} has encode format version {summary.get('version')!r}; this saeengine reads "
                         f"version {VERSION} (upgrade saeengine, or encode again)")
    return summary


def checked_rows(rows, n: int, what: str = "token rows") -> np.ndarray:
    """rows (int, sequence, array or tensor of integers) -> int64 [n_rows] in [0, n)."""
    if hasattr(rows, "detach"):  # a torch tensor
        rows = rows.detach().cpu().numpy()
    array = np.asarray(rows)
    if array.size and array.dtype.kind not in "iu":
        raise InputError(f"{what} must be integers, got {array.dtype} values; pass an integer array")
    array = array.astype(np.int64, copy=False).reshape(-1)
    if array.size and (array.min() < 0 or array.max() >= n):
        raise InputError(f"{what} must lie in [0, {n}) (the folder holds {n}); got {array.min()}..{array.max()}")
    return array


class EncodedDataset:
    """A finished encode output folder, read-only and memory-mapped (see the module docstring).

    Attributes: ``summary`` (summary.json as a dict), ``n_tokens`` (N), ``d_sae`` (F),
    ``n_images`` (image ids: 1 + the largest image index with tokens; per-image arrays
    are this long), ``metrics`` (the reconstruction metrics with dead_fraction and
    dense_fraction), ``stats`` (the LatentStats result: CPU tensors).

    Raises StoreIncompleteError for an unfinished folder (run encode again to finish it),
    InputError for a folder that is no encode output, StoreCorruptError when a file does
    not match summary.json.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.summary = read_summary(self.directory)
        try:
            self.layout = self.summary["settings"]["code_layout"]
            files = self.summary["files"]
            counts = self.summary["counts"]
            self._n, self._d_sae, self._images = int(counts["tokens"]), int(counts["d_sae"]), int(counts["image_ids"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorruptError(f"{self.directory / SUMMARY} lacks {exc}; run encode again with resume=False "
                                    "to rewrite the folder") from None
        if self.layout not in LAYOUT_FILES:
            raise StoreCorruptError(f"{self.directory / SUMMARY}: unknown code layout {self.layout!r}")
        self._arrays = {name: self._open(name, files) for name in LAYOUT_FILES[self.layout] + (SOURCES,)}
        self._store = None

    def _open(self, name: str, files: dict) -> np.ndarray:
        path = self.directory / name
        entry = files.get(name) if isinstance(files, dict) else None
        if not path.is_file() or entry is None:
            raise StoreCorruptError(f"{path} is missing (summary.json lists {sorted(files)}); run encode again "
                                    "with resume=False (CLI: --no-resume) to rewrite the folder")
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise StoreCorruptError(f"{path} is not a readable .npy file ({exc}); run encode again with "
                                    "resume=False to rewrite the folder") from exc
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            raise StoreCorruptError(f"{path} holds {array.dtype} {list(array.shape)} but summary.json says "
                                    f"{entry['dtype']} {entry['shape']}; run encode again with resume=False")
        return array

    # ----- counts ---------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return self._n

    @property
    def d_sae(self) -> int:
        return self._d_sae

    @property
    def n_images(self) -> int:
        return self._images

    @property
    def metrics(self) -> dict:
        return dict(self.summary["metrics"])

    def __len__(self) -> int:
        return self._n

    # ----- tokens ---------------------------------------------------------------------------
    def codes(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(values float32 [n, w], indices int64 [n, w]) of the token ``rows`` (integers in
        [0, n_tokens)), in the order given. Fixed width: the stored rows. CSR: each row's
        firing entries in stored order, padded with (0, 0) to the widest of these rows (w >= 1)."""
        rows = checked_rows(rows, self._n)
        if self.layout == FIXED:
            return (np.asarray(self._arrays[VALUES][rows], dtype=np.float32),
                    self._arrays[INDICES][rows].astype(np.int64))
        indptr = self._arrays[INDPTR]
        start, stop = indptr[rows], indptr[rows + 1]
        counts = stop - start
        width = max(int(counts.max()) if counts.size else 0, 1)
        values = np.zeros((rows.size, width), dtype=np.float32)
        indices = np.zeros((rows.size, width), dtype=np.int64)
        row = np.repeat(np.arange(rows.size), counts)
        col = np.arange(row.size) - np.repeat(np.cumsum(counts) - counts, counts)
        entries = np.repeat(start, counts) + col
        values[row, col] = self._arrays[VALUES][entries]
        indices[row, col] = self._arrays[INDICES][entries]
        return values, indices

    def sources(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(image index, position) int64 arrays [n] of the token ``rows``."""
        rows = checked_rows(rows, self._n)
        picked = np.asarray(self._arrays[SOURCES][rows], dtype=np.int64)
        return picked[:, 0].copy(), picked[:, 1].copy()

    def image_rows(self, image: int) -> np.ndarray:
        """int64 rows of image ``image``'s tokens, ascending (empty for an image without
        tokens). Image ids ascend through the folder, so this is two binary searches."""
        if not is_int(image):
            raise InputError(f"an image index must be an integer, got {image!r}")
        if not 0 <= image < self._images:
            raise InputError(f"image index {image} is out of range: the folder's images are 0..{self._images - 1}")
        column = self._arrays[SOURCES]
        lo, hi = _bisect(column, int(image), self._n), _bisect(column, int(image) + 1, self._n)
        return np.arange(lo, hi, dtype=np.int64)

    # ----- per latent -----------------------------------------------------------------------
    @functools.cached_property
    def stats(self) -> dict:
        """The LatentStats result (CPU tensors; saeengine.eval.latent_stats)."""
        from safetensors.torch import load_file

        return load_file(str(self._path(STATS)))

    @functools.cached_property
    def _exemplars(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self._path(EXEMPLARS)))

    def exemplars(self, rule: str) -> dict:
        """One rule's exemplars: {"scores": [F, K] float32, "images": [F, K] int64,
        "positions": [F, K] int64} (saeengine.eval.exemplars)."""
        found = {key.split(".", 1)[1]: t for key, t in self._exemplars.items() if key.split(".", 1)[0] == rule}
        if not found:
            rules = sorted({key.split(".", 1)[0] for key in self._exemplars})
            raise InputError(f"no exemplars by rule {rule!r} in {self.directory}; it holds {rules}")
        return found

    def _path(self, name: str) -> Path:
        path = self.directory / name
        if not path.is_file():
            raise StoreCorruptError(f"{path} is missing; run encode again with resume=False to rewrite the folder")
        return path

    # ----- images ---------------------------------------------------------------------------
    def image_path(self, i: int) -> str:
        """The path of image ``i`` as the store recorded it (InputError if it recorded none)."""
        if self._store is None:
            from ..store import ActivationStore

            recorded = self.summary["store"]
            try:
                store = ActivationStore(recorded["dir"])
            except (StoreError, InputError, OSError) as exc:
                raise InputError(f"image paths come from the store {recorded['dir']} named in summary.json, which "
                                 f"cannot be opened: {exc}") from exc
            if store.content_hash != recorded["content_hash"]:
                raise DataMismatchError(f"the store now at {recorded['dir']} (content hash {store.content_hash}) "
                                        f"is not the one encoded here ({recorded['content_hash']}); its image "
                                        "paths would not match these tokens")
            self._store = store
        return self._store.image_path(i)


def _bisect(sources: np.ndarray, image: int, n: int) -> int:
    """The first row whose image index is >= ``image`` (sources [n, 2], column 0 ascending)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if int(sources[mid, 0]) < image:
            lo = mid + 1
        else:
            hi = mid
    return lo
