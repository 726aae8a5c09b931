"""Read access for the explorer over one encode output (N tokens, F latents, I images):
the latent table (sorted, filtered, paginated), per-latent token lists from an inverted
index built once and cached, quantile-sampled exemplars, co-activating latents, one
image's codes and heatmaps. The code files stay memory-mapped: no request reads more
than the rows it needs, so a page costs the same at F = 2^16 and a million tokens.

Files under ``DIR/explore-cache/`` (each written atomically, rebuilt when missing or
made for another encode pass):

    latent-index.json          which encode pass (SAE checksum, store hash, counts) the index is of
    latent-index.rows.npy      int64 [nnz]: the token rows of every firing entry, grouped by latent
    latent-index.values.npy    float32 [nnz]: their values, in the same order
    latent-index.ptr.npy       int64 [F + 1]: latent j's entries are ptr[j]:ptr[j+1]
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .._atomic import atomic_write, atomic_write_bytes
from ..errors import InputError
from ..eval._args import is_int
from ..eval.encoded import CSR, INDICES, INDPTR, VALUES, EncodedDataset
from ..eval.latent_stats import DENSE_FREQUENCY

SORTS = ("id", "frequency", "mean", "max")
ORDERS = ("asc", "desc")
FILTERS = ("all", "alive", "dead", "dense")
MAX_LIMIT = 1000          # rows per page
QUANTILES = (1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.0)  # of the per-image max over the images a latent fires on
COACTIVATION_SAMPLE = 20000  # tokens of a latent read for its co-activating latents (evenly spaced)
_INDEX_FORMAT = "saeengine-explore-latent-index"


class NotFound(InputError):
    """A latent, image or patch that does not exist: HTTP 404 with the message."""


def _npy_write(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to the temporary name
            np.save(fh, array, allow_pickle=False)

    atomic_write(path, write)


class ExploreData:
    """The explorer's view of an encode output. ``cache`` is the folder the index goes to."""

    def __init__(self, encoded: EncodedDataset, store, cache: Path):
        self.encoded, self.store, self.cache = encoded, store, Path(cache)
        stats = encoded.stats
        self.d_sae, self.n_tokens, self.n_images = encoded.d_sae, encoded.n_tokens, encoded.n_images
        self.frequency = stats["frequency"].numpy().astype(np.float64)
        self.mean = stats["mean_nonzero"].numpy().astype(np.float64)
        self.max = stats["max"].numpy().astype(np.float32)
        self.count = stats["count"].numpy().astype(np.int64)
        self.histogram = stats["histogram"]  # [F, B] int64 tensor (rows read on demand)
        self.edges = stats["histogram_edges"].numpy().astype(np.float64)
        self.prefix, self.grid = _layout(encoded, store)
        self._index_lock = threading.Lock()
        self._index = None
        self._coact: OrderedDict[int, list] = OrderedDict()
        self._coact_lock = threading.Lock()
        self._orders: dict[tuple[str, str], np.ndarray] = {}

    # ----- checks -----------------------------------------------------------------------
    def latent(self, j) -> int:
        """A latent id from a request, checked: NotFound outside 0..F-1."""
        if isinstance(j, str):
            j = j.strip()
            if not j.isdigit():
                raise InputError(f"latent {j!r} is not an integer id; pass 0..{self.d_sae - 1}")
            j = int(j)
        if not is_int(j):
            raise InputError(f"latent {j!r} is not an integer id; pass 0..{self.d_sae - 1}")
        if not 0 <= j < self.d_sae:
            raise NotFound(f"latent {j} is out of range: this SAE has {self.d_sae} latents (ids 0..{self.d_sae - 1})")
        return int(j)

    def image(self, i) -> int:
        if not is_int(i):
            raise InputError(f"image {i!r} is not an image index; pass 0..{self.n_images - 1}")
        if not 0 <= i < self.n_images:
            raise NotFound(f"image {i} is out of range: the folder holds images 0..{self.n_images - 1}")
        return int(i)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def patch_positions(self, patches) -> list[int]:
        """Patch indices (row-major on the grid) from a request -> token positions."""
        if not isinstance(patches, list) or not patches:
            raise InputError("patches must be a non-empty list of patch indices (row-major on the grid)")
        out = []
        for p in patches:
            if not is_int(p):
                raise InputError(f"patch {p!r} is not an integer; pass indices 0..{self.n_patches - 1}")
            if not 0 <= p < self.n_patches:
                raise NotFound(f"patch {p} is out of range: the grid is {self.grid[0]}x{self.grid[1]} "
                               f"(patches 0..{self.n_patches - 1})")
            out.append(int(p) + self.prefix)
        return sorted(set(out))

    # ----- the latent table -------------------------------------------------------------
    def row(self, j: int, notes: dict) -> dict:
        return {"id": int(j), "frequency": float(self.frequency[j]), "mean": float(self.mean[j]),
                "max": float(self.max[j]), "count": int(self.count[j]), "note": notes.get(str(j), "")}

    def _order(self, sort: str, order: str) -> np.ndarray:
        """Latent ids sorted (stable, ties by id), cached per (sort, order)."""
        key = (sort, order)
        if key not in self._orders:
            if sort == "id":
                ids = np.arange(self.d_sae)
                self._orders[key] = ids[::-1].copy() if order == "desc" else ids
            else:
                column = {"frequency": self.frequency, "mean": self.mean, "max": self.max.astype(np.float64)}[sort]
                self._orders[key] = np.argsort(-column if order == "desc" else column, kind="stable")
        return self._orders[key]

    def latents(self, *, offset=0, limit=100, sort="id", order="asc", filter="all", q=None, notes=None) -> dict:
        """{"total", "rows"}: one page of the latent table (see docs/explore.md)."""
        notes = notes or {}
        for name, value, low in (("offset", offset, 0), ("limit", limit, 1)):
            if not is_int(value) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        if limit > MAX_LIMIT:
            raise InputError(f"limit {limit} is above {MAX_LIMIT} rows a page; page with offset")
        for name, value, allowed in (("sort", sort, SORTS), ("order", order, ORDERS), ("filter", filter, FILTERS)):
            if value not in allowed:
                raise InputError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
        ids = self._order(sort, order)
        if filter != "all":
            keep = {"alive": self.count > 0, "dead": self.count == 0,
                    "dense": self.frequency > DENSE_FREQUENCY}[filter]
            ids = ids[keep[ids]]
        if q not in (None, ""):
            q = str(q).strip()
            if not q.isdigit():
                raise InputError(f"q={q!r}: search by latent id (an integer 0..{self.d_sae - 1})")
            ids = ids[ids == int(q)]
        page = ids[offset:offset + limit]
        return {"total": int(ids.size), "offset": int(offset), "rows": [self.row(int(j), notes) for j in page]}

    def scatter(self) -> dict:
        """log10 frequency and log10 mean value of every alive latent."""
        alive = np.flatnonzero(self.count > 0)
        return {"ids": alive.tolist(), "log10_frequency": np.log10(self.frequency[alive]).round(5).tolist(),
                "log10_mean": np.log10(np.maximum(self.mean[alive], 1e-12)).round(5).tolist()}

    def latent_histogram(self, j: int) -> dict:
        counts = self.histogram[j].numpy()
        used = np.flatnonzero(counts)
        lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
        return {"edges": self.edges[lo:hi + 1].tolist() if used.size else [], "counts": counts[lo:hi].tolist()}

    # ----- per-latent tokens (inverted index) -------------------------------------------
    def _identity(self) -> dict:
        s = self.encoded.summary
        return {"format": _INDEX_FORMAT, "sae": s["sae"]["checksum"], "store": s["store"]["content_hash"],
                "tokens": self.n_tokens, "d_sae": self.d_sae, "entries": int(s["counts"].get("code_entries", -1))}

    def index(self):
        """(rows int64 [nnz], values float32 [nnz], ptr int64 [F + 1]) memory-mapped; built
        once (one pass over the code files in chunks) and cached under the cache folder."""
        with self._index_lock:
            if self._index is None:
                self._index = self._load_index() or self._build_index()
            return self._index

    def _index_paths(self):
        return [self.cache / f"latent-index.{name}" for name in ("json", "rows.npy", "values.npy", "ptr.npy")]

    def _load_index(self):
        meta, rows, values, ptr = self._index_paths()
        try:
            if json.loads(meta.read_text()) != self._identity():
                return None
            found = tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in (rows, values, ptr))
        except (OSError, ValueError):
            return None
        if found[2].shape != (self.d_sae + 1,) or found[0].shape != found[1].shape:
            return None
        return found

    def _build_index(self):
        arrays = self.encoded._arrays
        values, indices = arrays[VALUES], arrays[INDICES]
        flat_v, flat_i = values.reshape(-1), indices.reshape(-1)
        width = 1 if self.encoded.layout == CSR else values.shape[1]
        token_of = None
        if self.encoded.layout == CSR:
            indptr = np.asarray(arrays[INDPTR])
            token_of = np.repeat(np.arange(self.n_tokens, dtype=np.int64), np.diff(indptr))
        # counting sort by latent: two chunked passes, memory O(nnz) for the outputs only
        firing_counts = np.zeros(self.d_sae, dtype=np.int64)
        chunk = 1 << 22
        for start in range(0, flat_v.size, chunk):
            v, i = np.asarray(flat_v[start:start + chunk]), np.asarray(flat_i[start:start + chunk])
            firing_counts += np.bincount(i[v > 0], minlength=self.d_sae)
        ptr = np.zeros(self.d_sae + 1, dtype=np.int64)
        np.cumsum(firing_counts, out=ptr[1:])
        rows_out = np.empty(int(ptr[-1]), dtype=np.int64)
        vals_out = np.empty(int(ptr[-1]), dtype=np.float32)
        fill = ptr[:-1].copy()
        for start in range(0, flat_v.size, chunk):
            v, i = np.asarray(flat_v[start:start + chunk]), np.asarray(flat_i[start:start + chunk]).astype(np.int64)
            fire = np.flatnonzero(v > 0)
            lat = i[fire]
            order = np.argsort(lat, kind="stable")
            lat, fire = lat[order], fire[order]
            token = (fire + start) // width if token_of is None else token_of[fire + start]
            first = np.searchsorted(lat, lat, side="left")  # rank within its latent in this chunk
            slot = fill[lat] + (np.arange(lat.size) - first)
            rows_out[slot], vals_out[slot] = token, v[fire]
            fill += np.bincount(lat, minlength=self.d_sae)
        self.cache.mkdir(parents=True, exist_ok=True)
        meta, rows_p, values_p, ptr_p = self._index_paths()
        for path, array in ((rows_p, rows_out), (values_p, vals_out), (ptr_p, ptr)):
            _npy_write(path, array)
        atomic_write_bytes(meta, json.dumps(self._identity()).encode())  # last: the index's commit
        del rows_out, vals_out
        return self._load_index() or self._build_failed()

    def _build_failed(self):
        raise OSError(f"the latent index just written to {self.cache} cannot be read back; check the disk, or "
                      "delete the folder and start again")

    def latent_tokens(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(token rows int64 [c], values float32 [c]) where latent j fires, rows ascending."""
        rows, values, ptr = self.index()
        lo, hi = int(ptr[j]), int(ptr[j + 1])
        return np.asarray(rows[lo:hi]), np.asarray(values[lo:hi])

    def image_maxima(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(images int64 [m] ascending, latent j's max over each image's tokens [m])."""
        rows, values = self.latent_tokens(j)
        if rows.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        images = np.asarray(self.encoded._arrays["sources.npy"][rows, 0], dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
        return images[starts], np.maximum.reduceat(values, starts)

    def quantile_exemplars(self, j: int) -> list[dict]:
        """[P] Images at the QUANTILES of the per-image max of latent j over the images it
        fires on (rank round(q (m-1)) of the ascending maxima; q=1 is the top image, q=0
        the weakest firing one), each image once."""
        images, maxima = self.image_maxima(j)
        if images.size == 0:
            return []
        order = np.argsort(maxima, kind="stable")
        out, seen = [], set()
        for q in QUANTILES:
            k = int(order[int(round(q * (images.size - 1)))])
            if int(images[k]) not in seen:
                seen.add(int(images[k]))
                out.append({"quantile": q, "image": int(images[k]), "value": float(maxima[k])})
        return out

    def coactivating(self, j: int, top: int = 10) -> list[dict]:
        """[P] The latents most often firing on the same tokens as j, by Jaccard index
        |T_i & T_j| / |T_i | T_j| over token sets (from an evenly spaced sample of at most
        COACTIVATION_SAMPLE of j's tokens, scaled up). Cached per latent."""
        with self._coact_lock:
            if j in self._coact:
                self._coact.move_to_end(j)
                return self._coact[j]
        rows, _ = self.latent_tokens(j)
        c_j = rows.size
        out: list[dict] = []
        if c_j:
            picked = rows
            if c_j > COACTIVATION_SAMPLE:
                picked = rows[np.linspace(0, c_j - 1, COACTIVATION_SAMPLE).astype(np.int64)]
            values, indices = self.encoded.codes(picked)
            together = np.bincount(indices[values > 0], minlength=self.d_sae).astype(np.float64) * (c_j / picked.size)
            together[j] = 0
            jaccard = together / np.maximum(self.count + c_j - together, 1)
            best = np.argsort(-jaccard, kind="stable")[:top]
            out = [{"id": int(i), "score": round(float(jaccard[i]), 6)} for i in best if together[i] > 0]
        with self._coact_lock:  # requests run in a thread pool
            self._coact[j] = out
            if len(self._coact) > 4096:
                self._coact.popitem(last=False)
        return out

    def exemplars(self, j: int, per_rule: int = 8) -> dict:
        """{rule: [{image, value, position}]} from the encode pass's exemplar tables."""
        out = {}
        for rule in self._rules:
            table = self._exemplar_table(rule)
            scores, images = table["scores"][j].numpy(), table["images"][j].numpy()
            keep = images >= 0
            out[rule] = [{"image": int(i), "value": float(s)} for i, s in zip(images[keep][:per_rule],
                                                                               scores[keep][:per_rule])]
        return out

    @functools.cached_property
    def _rules(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.encoded._exemplars})

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one per rule, the object lives as long as the app
    def _exemplar_table(self, rule: str) -> dict:
        return self.encoded.exemplars(rule)

    # ----- images -----------------------------------------------------------------------
    def image_codes(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values [T, w], indices [T, w], positions [T]) of image i's tokens."""
        rows = self.encoded.image_rows(i)
        values, indices = self.encoded.codes(rows)
        _, positions = self.encoded.sources(rows)
        return values, indices, positions

    def heat(self, values, indices, positions, j: int) -> np.ndarray:
        """Latent j's value on each patch: [h, w] float32 (0 where it does not fire)."""
        from ..eval.exemplars import heatmap

        n = self.prefix + self.n_patches
        keep = (positions >= self.prefix) & (positions < n)
        heat = heatmap(values[keep], indices[keep], positions[keep], j, n).numpy()[self.prefix:]
        return heat.reshape(self.grid)

    def summed(self, values, indices, positions, wanted: list[int] | None, top: int = 10) -> list[dict]:
        """The top latents of the tokens at positions ``wanted`` (None: all): code values
        summed over those tokens, largest first."""
        keep = np.ones(positions.shape, bool) if wanted is None else np.isin(positions, wanted)
        v, i = values[keep], indices[keep]
        fire = v > 0
        sums = np.bincount(i[fire], weights=v[fire].astype(np.float64), minlength=self.d_sae)
        best = np.argsort(-sums, kind="stable")[:top]
        return [{"id": int(j), "value": float(sums[j])} for j in best if sums[j] > 0]

    def image_sums(self):
        """scipy.sparse CSC [I, F] float64: each image's code summed over its tokens (for
        the compare page; built once)."""
        if not hasattr(self, "_image_sums"):
            from scipy import sparse

            arrays = self.encoded._arrays
            image = np.asarray(arrays["sources.npy"][:, 0], dtype=np.int64)
            values, indices = np.asarray(arrays[VALUES]), np.asarray(arrays[INDICES]).astype(np.int64)
            if self.encoded.layout == CSR:
                rows = np.repeat(image, np.diff(np.asarray(arrays[INDPTR])))
            else:
                rows = np.repeat(image, values.shape[1])
            values, indices = values.reshape(-1), indices.reshape(-1)
            fire = values > 0
            self._image_sums = sparse.csc_matrix((values[fire].astype(np.float64), (rows[fire], indices[fire])),
                                                 shape=(self.n_images, self.d_sae))
        return self._image_sums


def _layout(encoded: EncodedDataset, store) -> tuple[int, tuple[int, int]]:
    """(prefix: positions before the patches, grid [h, w]) of the recorded layer."""
    extra = (store.meta.extra or {}) if store is not None else {}
    kinds = extra.get("token_kinds")
    prefix = 0
    if isinstance(kinds, list) and "patch" in kinds:
        prefix = kinds.index("patch")
        n = sum(k == "patch" for k in kinds)
    else:
        n = int(extra.get("tokens_per_image") or 0)
    if n <= 0:  # no record of the layout: the first image's largest position
        rows = encoded.image_rows(int(encoded.sources(np.array([0]))[0][0]))
        n = int(encoded.sources(rows)[1].max()) + 1 - prefix if rows.size else 1
    side = math.isqrt(n)
    return prefix, ((side, side) if side * side == n else (1, n))
