"""The latents the evaluation report shows, and each one's card: its statistics, its
activation histogram, and its exemplar thumbnails under the patch, image and CLS rules,
with the latent's per-patch heatmap read back from the encoded codes of each image."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .exemplars import RULES, heatmap
from .report_plots import BAND_LOG10_FREQUENCY, BAND_LOG10_MEAN, activation_histogram, exemplar_uri, heat_grid


@dataclasses.dataclass
class Thumb:
    image: int          # image index in the store
    score: float        # the rule's score (patch max, image sum, CLS value)
    caption: str        # the image's recorded path, or "image <i>"
    uri: str            # PNG data URI: the image (or white) under the red heatmap


@dataclasses.dataclass
class LatentCard:
    latent: int
    frequency: float
    mean_nonzero: float
    max: float
    p99: float
    histogram_uri: str
    rules: dict[str, list[Thumb]]   # rule -> exemplars, best first; rules with no entries left out


def choose_latents(frequency: np.ndarray, mean_nonzero: np.ndarray, n: int) -> tuple[np.ndarray, str]:
    """Which latents to show: up to n ids [S] int64 and how they were chosen.

    "band": latents with log10 frequency in [-6, -2] and log10 mean non-zero value in
    [-1, 1] (saev's browsing filter), n of them evenly spaced in order of frequency, when
    any qualify; else "most_frequent": the n most frequent alive latents (ties by id).
    frequency, mean_nonzero: [F] float.
    """
    alive = frequency > 0
    with np.errstate(divide="ignore"):
        log_f = np.where(alive, np.log10(np.where(alive, frequency, 1.0)), -np.inf)
        log_m = np.where(mean_nonzero > 0, np.log10(np.where(mean_nonzero > 0, mean_nonzero, 1.0)), -np.inf)
    in_band = np.flatnonzero(alive & (log_f >= BAND_LOG10_FREQUENCY[0]) & (log_f <= BAND_LOG10_FREQUENCY[1])
                             & (log_m >= BAND_LOG10_MEAN[0]) & (log_m <= BAND_LOG10_MEAN[1]))
    if in_band.size:
        ordered = in_band[np.argsort(-frequency[in_band], kind="stable")]
        take = np.unique(np.linspace(0, ordered.size - 1, min(n, ordered.size)).round().astype(np.int64))
        return ordered[take], "band"
    ordered = np.flatnonzero(alive)
    ordered = ordered[np.argsort(-frequency[ordered], kind="stable")]
    return ordered[:n].astype(np.int64), "most_frequent"


class _ImageCodes:
    """One image's codes from the encoded dataset, on the patch grid, cached per image.

    token_kinds: the store's kind of each position of an image's token sequence (its
    extra["token_kinds"]) or None (every position a patch). Patch positions are numbered
    0..P-1 in order, and the heat grid is ceil(sqrt(P)) square."""

    def __init__(self, encoded, token_kinds: Sequence[str] | None):
        self.encoded = encoded
        if token_kinds:
            patch = [p for p, kind in enumerate(token_kinds) if kind == "patch"]
            self.slot = {p: i for i, p in enumerate(patch)}
            self.cls = {p for p, kind in enumerate(token_kinds) if kind == "cls"}
        else:
            self.slot, self.cls = None, set()
        self.read = lru_cache(maxsize=256)(self._read)

    def _read(self, image: int):
        rows = np.asarray(self.encoded.image_rows(image), dtype=np.int64)
        values, indices = self.encoded.codes(rows)
        _, positions = self.encoded.sources(rows)
        values, indices, positions = np.asarray(values), np.asarray(indices), np.asarray(positions, dtype=np.int64)
        if self.slot is None:
            return values, indices, positions, int(positions.max()) + 1 if positions.size else 1
        keep = np.array([p in self.slot for p in positions.tolist()], dtype=bool)
        slots = np.array([self.slot[p] for p in positions[keep].tolist()], dtype=np.int64)
        return values[keep], indices[keep], slots, max(len(self.slot), 1)

    def heat(self, image: int, latent: int) -> np.ndarray:
        """[side, side] float32: the latent's value at each patch of the image."""
        values, indices, slots, n = self.read(int(image))
        return heat_grid(heatmap(values, indices, slots, int(latent), n).numpy())


def latent_cards(encoded, latents: np.ndarray, *, images=None, captions: Sequence[str] | None = None,
                 token_kinds: Sequence[str] | None = None, per_latent: int = 8, progress: bool = True,
                 thumb_size: int = 96) -> list[LatentCard]:
    """A card per latent in ``latents`` [S] int.

    encoded: an EncodedDataset (stats, exemplars(rule), image_rows, codes, sources).
    images: None, or a sequence indexed by store image id giving a PIL image or uint8
    array (e.g. an ImageSource); None shows each heatmap on white. captions: the name of
    each image (default "image <i>"). The patch and image rules overlay the latent's heatmap;
    the CLS rule shows the image alone (the CLS token has no place on the grid).
    """
    stats = encoded.stats
    tables = {}
    for rule in RULES:
        try:
            tables[rule] = encoded.exemplars(rule)
        except (KeyError, ValueError):  # an encode pass that did not keep this rule
            continue
    codes = _ImageCodes(encoded, token_kinds)
    edges = np.asarray(stats["histogram_edges"], dtype=np.float64)
    cards = []
    for latent in tqdm([int(j) for j in latents], desc="report latents", unit="latent", disable=not progress):
        rules = {}
        for rule, table in tables.items():
            ids = np.asarray(table["images"][latent][:per_latent])
            scores = np.asarray(table["scores"][latent][:per_latent], dtype=np.float64)
            thumbs = []
            for image, score in zip(ids.tolist(), scores.tolist()):
                if image < 0:
                    break  # padding: the latent fired on fewer images
                pixels = None if images is None else np.asarray(images[image])
                heat = None if rule == "cls" else codes.heat(image, latent)
                caption = captions[image] if captions is not None and image < len(captions) else f"image {image}"
                thumbs.append(Thumb(image, score, caption, exemplar_uri(pixels, heat, thumb_size)))
            if thumbs:
                rules[rule] = thumbs
        cards.append(LatentCard(latent, float(stats["frequency"][latent]), float(stats["mean_nonzero"][latent]),
                                float(stats["max"][latent]), float(stats["p99"][latent]),
                                activation_histogram(np.asarray(stats["histogram"][latent]), edges), rules))
    return cards
