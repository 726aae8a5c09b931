"""Ontology recovery: do an SAE's latents map onto the nodes of a class hierarchy?

Per latent j of an SAE over image-level features (one vector per image: a CLS token, a
pooled embedding or a pooled block output) [P, after arXiv 2505.15970's LCH height and
ontological coverage, known only through summaries: docs/ontology.md]:

- top images: the ``top_n`` images with the largest value z_j (among those where z_j > 0);
- purity: the share of the top images that carry the modal label;
- LCH_j: the lowest common hypernym of the top images' labels (iterated pairwise LCA);
  height h_j = the longest path from LCH_j down to a leaf (0: one class); None when the
  labels lie in different trees of a forest;
- tau-node v_j: the deepest node whose subtree holds at least ``tau`` of the top images
  (their subtree purity); v_j = LCH_j when every top image counts (tau = 1). Unique for
  tau > 1/2. Why: every top image lies under LCH_j, so LCH_j's subtree purity is 1 by
  construction; the tau-node is the reading in which tau matters (one stray image in 16
  does not lift a latent to the root).

Kept latents: frequency (share of images with z_j > 0) in [min_frequency, max_frequency]
and at least ``top_n`` images with z_j > 0 (so every kept latent has exactly top_n images).

Per layer:
- coverage = |{internal v : v = v_j for some kept latent j}| / |internal nodes|, so every
  counted node has subtree purity >= tau; also per depth band of the internal nodes, and
  over the "attainable" internal nodes (those some latent could map to given the labels
  seen in the data: a seen label, or a node with >= 2 children whose subtrees hold one);
- the height histogram and mean, of LCH_j and of v_j.

Null baselines, computed the same way on the same images and labels, with as many
candidate columns as the SAE kept. A column is kept by the same support rule as a latent
(a score > 0 on at least ``top_n`` images), so its top images are all real hits: a column
positive on fewer images would have its top set padded with zero-score images, ties going
to the earliest rows, and in input sorted by source or class that padding shares a label
and inflates purity and coverage. The frequency band is not applied to the nulls (a
ReLU'd direction fires on about half the images; the band would drop every one of them).
Each null reports ``count`` (candidate columns), ``kept`` and ``too_few_images``:
- shuffled_labels: the SAE's kept latents and top images, labels permuted over images;
- random_directions: ReLU(<x - mean, u>) for random unit vectors u;
- pca: ReLU(<x - mean, +-w>) for the top principal directions w, both signs;
- neurons: the features' own dimensions x_i (a random subset when there are more).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from ._args import count, is_int
from .hierarchy import Hierarchy

NULLS = ("shuffled_labels", "random_directions", "pca", "neurons")


@dataclasses.dataclass(frozen=True)
class OntologySettings:
    """top_n: top images per latent; tau: subtree purity of a counted node, in (0.5, 1];
    min_frequency, max_frequency: the kept band of firing frequency (share of images);
    bands: depth bands of the internal nodes for coverage; nulls: which baselines; seed:
    of the nulls; chunk: images encoded at once; examples: latents shown per layer;
    per_latent: keep every kept latent's row in the result."""
    top_n: int = 16
    tau: float = 0.9
    min_frequency: float = 1e-5
    max_frequency: float = 1e-1
    bands: int = 4
    nulls: tuple[str, ...] = NULLS
    seed: int = 0
    chunk: int = 4096
    examples: int = 8
    per_latent: bool = False

    def check(self, n_images: int | None = None) -> "OntologySettings":
        count("top_n", self.top_n, 1)
        count("bands", self.bands, 1)
        count("chunk", self.chunk, 1)
        count("examples", self.examples, 0)
        if n_images is not None and self.top_n > n_images:
            raise InputError(f"top_n={self.top_n} is more than the {n_images} images; pass top_n <= {n_images} "
                             "(or more images)")
        if not (isinstance(self.tau, (int, float)) and 0.5 < float(self.tau) <= 1.0):
            raise InputError(f"tau={self.tau!r} must be a number in (0.5, 1]: above 1/2 the deepest node holding "
                             "that share of the top images is unique")
        lo, hi = self.min_frequency, self.max_frequency
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 <= lo <= hi <= 1):
            raise InputError(f"the frequency band [{lo!r}, {hi!r}] must satisfy 0 <= min_frequency <= max_frequency "
                             "<= 1")
        unknown = [n for n in self.nulls if n not in NULLS]
        if unknown:
            raise InputError(f"unknown null baseline(s) {unknown}; choose from {list(NULLS)}")
        return self

    @property
    def need(self) -> int:
        """Top images a counted node must hold: ceil(tau * top_n) (float-safe)."""
        return max(1, math.ceil(float(self.tau) * self.top_n - 1e-9))


# ----- inputs --------------------------------------------------------------------------------
def as_features(features, what: str = "features") -> torch.Tensor:
    """numpy / torch [n, d] -> float32 CPU tensor; InputError for another shape, an empty
    array, or a non-finite value."""
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{what} must be a non-empty [n_images, d] array of image-level features (a CLS token or "
                         f"a pooled embedding per image), got shape {tuple(x.shape)}")
    x = x.detach().float().cpu()
    if not bool(torch.isfinite(x).all()):
        row = int((~torch.isfinite(x)).any(1).nonzero()[0])
        raise InputError(f"{what} holds a NaN or inf (first in row {row}); clean the features first")
    return x.contiguous()


def imagenet_tree() -> Hierarchy:
    """The ImageNet-1k WordNet tree (saeengine.eval.wordnet) as a Hierarchy with the
    synsets' short names for display."""
    from .wordnet import imagenet_hierarchy

    h = imagenet_hierarchy()
    return Hierarchy.from_edges(h.edges, display=h.names, source=h.source)


def label_ids(labels: Sequence[str], hierarchy: Hierarchy, n_images: int) -> np.ndarray:
    """Labels [n] (names in the hierarchy) -> int64 node ids [n]; InputError for a count
    other than ``n_images`` or unknown labels."""
    labels = list(labels)
    if len(labels) != n_images:
        raise InputError(f"{len(labels)} labels for {n_images} images; give one label per image, in the features' "
                         "row order")
    return hierarchy.ids(labels)


# ----- top images ----------------------------------------------------------------------------
@dataclasses.dataclass
class TopImages:
    """index: int64 [K, N] images, best first; value: float32 [K, N]; positive: int64 [K]
    images with a score > 0; n_images."""
    index: np.ndarray
    value: np.ndarray
    positive: np.ndarray
    n_images: int


@torch.no_grad()
def top_images(score: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, top_n: int,
               chunk: int = 4096) -> TopImages:
    """Per column of ``score(x_chunk)`` ([c, K]), the top_n rows of ``features`` [n, d] by
    score (ties: the earlier image), with a running merge so [n, K] is never held.

    A column with ``positive[k] < top_n`` has entries past its positives that are NOT hits
    (score <= 0, filled by the earliest rows among ties): measure only the columns
    ``supported(top, top_n)`` returns, whose top_n entries all have a score > 0."""
    n = features.shape[0]
    best_v = best_i = None
    positive = None
    for start in range(0, n, chunk):
        s = score(features[start:start + chunk]).float().cpu()
        rows = torch.arange(start, start + s.shape[0]).expand(s.shape[1], -1).T
        pos = (s > 0).sum(0)
        positive = pos if positive is None else positive + pos
        if best_v is not None:
            s, rows = torch.cat([best_v, s]), torch.cat([best_i, rows])
        # a stable sort by descending score keeps the earlier image first among ties
        order = torch.sort(s, dim=0, descending=True, stable=True).indices[:top_n]
        best_v, best_i = s.gather(0, order), rows.gather(0, order)
    return TopImages(best_i.T.numpy().astype(np.int64), best_v.T.numpy(), positive.numpy().astype(np.int64), n)


def supported(top: TopImages, top_n: int) -> np.ndarray:
    """int64 [k]: the columns with a score > 0 on at least top_n images (so their top_n
    images are all hits, never zero-score padding)."""
    return np.flatnonzero(top.positive >= top_n)


def sae_score(sae) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [c, d_in] -> the SAE's dense code [c, d_sae] (on the SAE's device)."""
    device = sae.W_dec.device

    def score(x):
        return sae.encode(x.to(device)).to_dense(sae.cfg.d_sae)
    return score


def projection_score(directions: torch.Tensor, mean: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [c, d] -> ReLU((x - mean) @ directions.T) [c, K] (directions [K, d])."""
    return lambda x: torch.relu((x - mean) @ directions.T)


# ----- per-latent measures -------------------------------------------------------------------
def modal(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """labels int64 [K, N] -> (modal label [K] (the smallest id among ties), its count [K])."""
    k, n = labels.shape
    ranked = np.sort(labels, axis=1)
    start = np.ones((k, n), dtype=bool)
    start[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    group = np.cumsum(start, axis=1) - 1
    counts = np.zeros((k, n), dtype=np.int64)
    np.add.at(counts, (np.arange(k)[:, None].repeat(n, 1), group), 1)
    best = counts.argmax(1)  # first max = smallest label (groups follow the sorted order)
    first = np.argmax(group == best[:, None], axis=1)
    return ranked[np.arange(k), first], counts.max(1)


def latent_measures(top_labels: np.ndarray, hierarchy: Hierarchy, need: int) -> dict[str, np.ndarray]:
    """top_labels int64 [K, N] node ids -> per-latent arrays [K]: purity, modal (id),
    n_distinct, lch (id, -1: none), height and depth of lch (-1: none), node (the deepest
    node holding >= need of the N), node_height, node_depth, subtree_purity (of node)."""
    k, n = top_labels.shape
    if k == 0:
        empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return {"purity": empty_f, "modal": empty_i, "n_distinct": empty_i, "lch": empty_i, "height": empty_i,
                "depth": empty_i, "node": empty_i, "node_height": empty_i, "node_depth": empty_i,
                "subtree_purity": empty_f}
    mode, mode_count = modal(top_labels)
    ranked = np.sort(top_labels, axis=1)
    n_distinct = 1 + (ranked[:, 1:] != ranked[:, :-1]).sum(1)
    lch = hierarchy.lch_rows(top_labels)
    node = hierarchy.deepest_holding(top_labels, need)

    def at(table, ids):
        return np.where(ids >= 0, table[np.maximum(ids, 0)], -1)
    return {"purity": mode_count / n, "modal": mode, "n_distinct": n_distinct, "lch": lch,
            "height": at(hierarchy.height, lch), "depth": at(hierarchy.depth, lch), "node": node,
            "node_height": at(hierarchy.height, node), "node_depth": at(hierarchy.depth, node),
            "subtree_purity": hierarchy.under(node, top_labels).mean(1)}


def attainable_nodes(hierarchy: Hierarchy, seen: np.ndarray) -> np.ndarray:
    """bool [V]: internal nodes some latent could map to, given the labels ``seen`` (ids)
    in the data: a seen label, or a node with >= 2 children whose subtrees hold one."""
    v = len(hierarchy)
    holds = np.zeros(v, dtype=bool)
    holds[np.unique(seen)] = True
    is_seen = holds.copy()
    branches = np.zeros(v, dtype=np.int64)
    for node in np.argsort(-hierarchy.depth, kind="stable"):  # children before parents
        parent = hierarchy.parent[node]
        if parent >= 0 and holds[node]:
            branches[parent] += 1
            holds[parent] = True
    return ~hierarchy.is_leaf & (is_seen | (branches >= 2))


def depth_bands(hierarchy: Hierarchy, bands: int) -> list[tuple[int, int]]:
    """Equal-width integer bands [lo, hi] (inclusive) over the internal nodes' depths."""
    depths = hierarchy.depth[hierarchy.internal]
    top = int(depths.max()) if depths.size else 0
    bands = min(bands, top + 1)
    edges = np.linspace(0, top + 1, bands + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        a, b = int(math.ceil(lo - 1e-9)), int(math.ceil(hi - 1e-9)) - 1
        if b >= a:
            out.append((a, b))
    return out


def summarize(measures: dict[str, np.ndarray], hierarchy: Hierarchy, attainable: np.ndarray,
              bands: list[tuple[int, int]]) -> dict:
    """One set of latents' measures -> {"n_latents", "mean_height", "median_height",
    "height_histogram" [0..max height], "no_common_hypernym", "mean_node_height",
    "node_height_histogram", "mean_purity", "mean_subtree_purity", "covered", "internal",
    "coverage", "attainable", "coverage_attainable", "coverage_by_band": [{"depths",
    "internal", "covered", "coverage", "attainable", "coverage_attainable"}],
    "covered_nodes" (names, the first 50)}. Means are None over no latents."""
    max_h = int(hierarchy.height.max())

    def mean(a):
        return float(np.mean(a)) if len(a) else None

    def histogram(h):
        return np.bincount(h[h >= 0], minlength=max_h + 1)[:max_h + 1].tolist()
    height, node_height = measures["height"], measures["node_height"]
    covered = np.zeros(len(hierarchy), dtype=bool)
    node = measures["node"]
    covered[node[node >= 0]] = True
    covered &= ~hierarchy.is_leaf
    internal = ~hierarchy.is_leaf

    def share(a, b):
        return float(a / b) if b else None
    by_band = []
    for lo, hi in bands:
        in_band = internal & (hierarchy.depth >= lo) & (hierarchy.depth <= hi)
        c, i, a = int((covered & in_band).sum()), int(in_band.sum()), int((attainable & in_band).sum())
        by_band.append({"depths": f"{lo}-{hi}", "internal": i, "covered": c, "coverage": share(c, i),
                        "attainable": a, "coverage_attainable": share(c, a)})
    n_cov, n_int, n_att = int(covered.sum()), int(internal.sum()), int(attainable.sum())
    return {"n_latents": int(height.size), "mean_height": mean(height[height >= 0]),
            "median_height": float(np.median(height[height >= 0])) if (height >= 0).any() else None,
            "height_histogram": histogram(height), "no_common_hypernym": int((height < 0).sum()),
            "mean_node_height": mean(node_height[node_height >= 0]), "node_height_histogram": histogram(node_height),
            "mean_purity": mean(measures["purity"]), "mean_subtree_purity": mean(measures["subtree_purity"]),
            "covered": n_cov, "internal": n_int, "coverage": share(n_cov, n_int), "attainable": n_att,
            "coverage_attainable": share(n_cov, n_att), "coverage_by_band": by_band,
            "covered_nodes": [hierarchy.names[int(i)] for i in np.flatnonzero(covered)[:50]]}


# ----- nulls ---------------------------------------------------------------------------------
def _principal_directions(x: torch.Tensor, mean: torch.Tensor, count_: int, chunk: int) -> torch.Tensor:
    """The top ``count_`` eigenvectors [count_, d] of the features' covariance (float64
    accumulation; eigh of the d x d matrix, so any n is one pass)."""
    d = x.shape[1]
    cov = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        c = (x[start:start + chunk] - mean).double()
        cov += c.T @ c
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vectors[:, -count_:].flip(1).T.float().contiguous()


def null_scores(name: str, x: torch.Tensor, n_latents: int, seed: int, chunk: int):
    """The score function of null baseline ``name`` (random_directions, pca, neurons) with
    (up to) n_latents columns over features x [n, d], and how many columns it has."""
    n, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    mean = x.mean(0)
    if name == "random_directions":
        u = torch.randn(n_latents, d, generator=gen)
        return projection_score(u / u.norm(dim=1, keepdim=True), mean), n_latents
    if name == "pca":
        rank = min(n - 1, d) if n > 1 else 1
        k = min(math.ceil(n_latents / 2), rank)
        w = _principal_directions(x, mean, k, chunk)
        both = torch.stack([w, -w], 1).reshape(2 * k, d)[:n_latents]  # +w1, -w1, +w2, ...
        return projection_score(both, mean), int(both.shape[0])
    if name == "neurons":
        dims = torch.randperm(d, generator=gen)[:min(n_latents, d)].sort().values
        return (lambda c: c[:, dims]), int(dims.numel())
    raise InputError(f"unknown null {name!r}; choose from {list(NULLS)}")


# ----- one layer -----------------------------------------------------------------------------
def _rows(measures: dict, hierarchy: Hierarchy, latents: np.ndarray, frequency: np.ndarray,
          top_labels: np.ndarray | None, which: np.ndarray) -> list[dict]:
    rows = []
    for i in which:
        i = int(i)
        row = {"latent": int(latents[i]), "frequency": float(frequency[i]), "purity": float(measures["purity"][i]),
               "modal": hierarchy.label(int(measures["modal"][i])), "n_distinct": int(measures["n_distinct"][i]),
               "lch": hierarchy.name(int(measures["lch"][i])), "lch_name": hierarchy.label(int(measures["lch"][i])),
               "height": int(measures["height"][i]) if measures["height"][i] >= 0 else None,
               "node": hierarchy.name(int(measures["node"][i])),
               "node_name": hierarchy.label(int(measures["node"][i])),
               "node_height": int(measures["node_height"][i]) if measures["node_height"][i] >= 0 else None,
               "subtree_purity": float(measures["subtree_purity"][i])}
        if top_labels is not None:
            row["top_labels"] = [hierarchy.label(int(t)) for t in top_labels[i]]
        rows.append(row)
    return rows


def _examples(measures: dict, k: int) -> np.ndarray:
    """Up to k kept latents spread over their node height (then subtree purity)."""
    total = measures["node"].size
    if total == 0 or k == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((-measures["subtree_purity"], measures["node_height"]))
    pick = np.unique(np.linspace(0, total - 1, min(k, total)).round().astype(np.int64))
    return order[pick]


def layer_ontology(sae, features, labels: Sequence[str] | np.ndarray, hierarchy: Hierarchy,
                   settings: OntologySettings = OntologySettings(), *, progress: bool = False) -> dict:
    """One SAE over image-level features [n, d_in] with labels [n] (names in
    ``hierarchy``, or node ids int64 [n]) -> {"n_images", "d_in", "d_sae", "n_labels_seen",
    "latents": {"live", "in_band", "kept", "too_few_images"}, "sae": summarize(...),
    "nulls": {name: {"count" (candidate columns), "kept" (columns with > 0 on >= top_n
    images; summarize's n_latents), "too_few_images", **summarize(...)}}, "examples": rows, ["per_latent": rows]}."""
    x = as_features(features)
    n, d = x.shape
    settings.check(n)
    if d != sae.cfg.d_in:
        raise InputError(f"the features have {d} dimensions but the SAE reads d_in={sae.cfg.d_in}; pass the "
                         "features of the layer the SAE was trained on")
    ids = (np.asarray(labels, dtype=np.int64) if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu"
           else label_ids(labels, hierarchy, n))
    if ids.shape != (n,):
        raise InputError(f"{ids.shape[0]} labels for {n} images; give one label per image")
    from tqdm.auto import tqdm

    steps = tqdm(total=1 + len(settings.nulls), disable=not progress, desc="ontology", leave=False)
    top = top_images(sae_score(sae), x, settings.top_n, settings.chunk)
    steps.update()
    frequency = top.positive / n
    live = top.positive > 0
    in_band = live & (frequency >= settings.min_frequency) & (frequency <= settings.max_frequency)
    kept = np.intersect1d(np.flatnonzero(in_band), supported(top, settings.top_n))
    top_labels = ids[top.index[kept]]
    measures = latent_measures(top_labels, hierarchy, settings.need)
    attainable = attainable_nodes(hierarchy, ids)
    bands = depth_bands(hierarchy, settings.bands)
    result = {"n_images": n, "d_in": d, "d_sae": int(sae.cfg.d_sae), "n_labels_seen": int(np.unique(ids).size),
              "latents": {"live": int(live.sum()), "in_band": int(in_band.sum()), "kept": int(kept.size),
                          "too_few_images": int((in_band & (top.positive < settings.top_n)).sum())},
              "sae": summarize(measures, hierarchy, attainable, bands)}
    nulls = {}
    for i, name in enumerate(settings.nulls):
        seed = settings.seed * 1000 + i
        if name == "shuffled_labels":  # the SAE's kept latents: already supported
            perm = np.random.default_rng(seed).permutation(n)
            null = latent_measures(ids[perm][top.index[kept]], hierarchy, settings.need)
            n_null = n_kept = int(kept.size)
        elif kept.size == 0:
            null, n_null, n_kept = latent_measures(np.zeros((0, settings.top_n), dtype=np.int64), hierarchy,
                                                   settings.need), 0, 0
        else:
            score, n_null = null_scores(name, x, int(kept.size), seed, settings.chunk)
            null_top = top_images(score, x, settings.top_n, settings.chunk)
            # the latents' support rule: a column with fewer than top_n positives would be
            # measured on zero-score padding (the earliest rows), not on what it fires on
            ok = supported(null_top, settings.top_n)
            null = latent_measures(ids[null_top.index[ok]], hierarchy, settings.need)
            n_kept = int(ok.size)
        nulls[name] = {"count": n_null, "kept": n_kept, "too_few_images": n_null - n_kept,
                       **summarize(null, hierarchy, attainable, bands)}
        steps.update()
    steps.close()
    result["nulls"] = nulls
    result["examples"] = _rows(measures, hierarchy, kept, frequency[kept], top_labels,
                               _examples(measures, settings.examples))
    if settings.per_latent:
        result["per_latent"] = _rows(measures, hierarchy, kept, frequency[kept], top_labels, np.arange(kept.size))
    return result


def ontology(layers: Mapping[str, tuple], labels: Sequence[str], hierarchy: Hierarchy,
             settings: OntologySettings = OntologySettings(), *, progress: bool = False) -> dict:
    """Per layer: {layer: (sae, features [n, d_in])} with one label per image (the same
    images in every layer) -> {"settings", "hierarchy": hierarchy.summary(), "n_images",
    "layers": {layer: layer_ontology(...)}}."""
    if not layers:
        raise InputError("no layers given; pass {layer: (sae, features)} with at least one layer")
    from tqdm.auto import tqdm

    ids, n = None, None
    out = {}
    for name, pair in tqdm(layers.items(), disable=not progress, desc="layers"):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InputError(f"layer {name!r}: expected an (sae, features) pair, got {type(pair).__name__}")
        sae, features = pair
        x = as_features(features, f"layer {name!r} features")
        if n is None:
            n = x.shape[0]
            ids = label_ids(labels, hierarchy, n)
        elif x.shape[0] != n:
            raise InputError(f"layer {name!r} has {x.shape[0]} images, the first layer {n}; every layer must hold "
                             "the features of the same images in the same order")
        out[str(name)] = layer_ontology(sae, x, ids, hierarchy, settings, progress=progress)
    return {"settings": dataclasses.asdict(settings), "hierarchy": hierarchy.summary(), "n_images": n, "layers": out}


def describe_latent(sae, features, labels: Sequence[str], hierarchy: Hierarchy, latent: int,
                    top_n: int = 16, tau: float = 0.9) -> dict:
    """One latent's row (as in "per_latent", with its top images' indices): InputError
    for a latent outside 0..d_sae-1 or top_n outside 1..n_images."""
    if not is_int(latent) or not 0 <= latent < sae.cfg.d_sae:
        raise InputError(f"latent {latent!r} is out of range: this SAE has latents 0..{sae.cfg.d_sae - 1}")
    x = as_features(features)
    settings = OntologySettings(top_n=top_n, tau=tau).check(x.shape[0])
    ids = label_ids(labels, hierarchy, x.shape[0])
    score = sae_score(sae)
    top = top_images(lambda c: score(c)[:, latent:latent + 1], x, top_n, settings.chunk)
    fires = int(top.positive[0])
    index = top.index[0][:min(fires, top_n)]
    if index.size == 0:
        return {"latent": int(latent), "frequency": 0.0, "fires_on": 0, "top_images": []}
    measures = latent_measures(ids[index][None], hierarchy, max(1, math.ceil(tau * index.size - 1e-9)))
    row = _rows(measures, hierarchy, np.array([latent]), np.array([fires / x.shape[0]]), ids[index][None],
                np.array([0]))[0]
    return {**row, "fires_on": fires, "top_images": index.tolist()}
