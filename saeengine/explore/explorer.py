"""The explorer's state over one DIR and what every API call returns, as plain dicts (the
routes in api.py only parse requests and map errors to HTTP codes; the static export
calls the same methods). Field meanings: docs/explore.md."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .data import ExploreData, NotFound
from .model import Model, Unavailable
from .notes import Notes
from .source import open_directory
from .thumbs import Thumbs, render
from .uploads import Upload, Uploads, decode

TOP_CLASSES = 10
MAX_EDITS = 64
MAX_SCALE = 1000.0
_UPLOAD = re.compile(r"upload:([0-9a-f]{16})")
_INDEX = re.compile(r"[0-9]{1,12}")


def thumb_url(image, latent: int | None) -> str:
    """The page's <img src> for a thumbnail (the static export rewrites it)."""
    return f"/api/thumb/{image}" + ("" if latent is None else f"?latent={int(latent)}")


def _pass_key(summary: dict) -> str:
    """8 hex characters naming one encode pass (its SAE and store)."""
    import hashlib

    ident = f"{summary['sae'].get('checksum')}:{summary['store'].get('content_hash')}"
    return hashlib.blake2b(ident.encode(), digest_size=4).hexdigest()


class Explorer:
    """One DIR opened for exploring (see source.py for what DIR may be)."""

    def __init__(self, directory, *, images=None, store: str | None = None, progress: bool = False,
                 title: str | None = None):
        opened = open_directory(directory, images=images, store=store, progress=progress)
        self.root, self.encoded, self.store = opened.root, opened.encoded, opened.store
        self.image_note = opened.image_note
        self.cache = opened.cache
        self.data = ExploreData(self.encoded, self.store, self.cache)
        self.images = opened.images
        self.thumbs = Thumbs(self.data, self.images, self.cache, key=_pass_key(self.encoded.summary))
        self.notes = Notes(self.root)
        info = self.encoded.summary.get("store") or {}
        self.layer, self.backbone = info.get("layer") or "", info.get("backbone") or ""
        self.model = Model(self.encoded, self.store, self.layer, self.data.grid, self.data.prefix)
        self.uploads = Uploads()
        self.title = title or f"{self.root.name}: {self.backbone} {self.layer}, {self.data.d_sae} latents"
        self.compare: dict[str, Explorer] = {}
        self._effects: dict[int, dict | None] = {}

    def warm(self) -> None:
        """Build what the first latent page would otherwise wait for: the inverted index
        (once per encode output; later starts read it from the cache)."""
        self.data.index()
        for other in self.compare.values():
            other.data.index()

    # ----- info and the latent table ------------------------------------------------------
    def has_head(self) -> bool:
        return self.model.why_not() is None and self.images is not None

    def info(self) -> dict:
        d = self.data
        return {"d_sae": d.d_sae, "n_tokens": d.n_tokens, "n_images": d.n_images, "grid": list(d.grid),
                "has_head": self.has_head(), "head": "imagenet" if self.has_head() else None,
                "compare": sorted(self.compare), "layer": self.layer, "backbone": self.backbone, "title": self.title,
                "has_images": self.images is not None, "images_note": self.image_note,
                "model_note": self.model.why_not() or ("" if self.images is not None else
                                                       "no images: the image page needs the pixels"),
                "architecture": self.encoded.summary["sae"].get("architecture"),
                "metrics": {k: self.encoded.metrics.get(k) for k in ("fvu", "l0", "dead_fraction", "dense_fraction")}}

    def latents(self, **query) -> dict:
        return self.data.latents(notes=self.notes.all, **query)

    def latent(self, j, *, head_effect: bool = True) -> dict:
        d = self.data
        j = d.latent(j)
        exemplars = {rule: [{**e, "thumb": thumb_url(e["image"], j)} for e in rows]
                     for rule, rows in d.exemplars(j).items()}
        quantiles = [{**q, "thumb": thumb_url(q["image"], j)} for q in d.quantile_exemplars(j)]
        return {**d.row(j, self.notes.all), "histogram": d.latent_histogram(j), "exemplars": exemplars,
                "quantiles": quantiles, "coactivating": d.coactivating(j),
                "head_effect": self.head_effect(j) if head_effect else None}

    def head_effect(self, j: int) -> dict | None:
        """The decoder direction's effect on the head's classes (model.head_effect) over up
        to 4 of the latent's top images (patch rule), or None without a head / a dead latent."""
        if not self.has_head() or self.data.count[j] == 0:
            return None
        if j not in self._effects:
            images = [e["image"] for e in self.data.exemplars(j, per_rule=4).get("patch", [])][:4] or [0]
            pixels = torch.cat([self.model.pixels(self.images[i]) for i in images])
            self._effects[j] = self.model.head_effect(j, float(self.data.max[j]), pixels)
        return self._effects[j]

    def set_note(self, j, note) -> dict:
        j = self.data.latent(j)
        return {"id": j, "note": self.notes.set(j, note)}

    # ----- images -------------------------------------------------------------------------
    def parse_image(self, image) -> int | str:
        """A request's image: an index (int or digits) -> int, "upload:<16 hex>" -> its id;
        anything else (a path, "../x") is refused without touching the filesystem."""
        if isinstance(image, bool):
            raise InputError("image must be an image index or 'upload:<id>'")
        if isinstance(image, int):
            return self.data.image(image)
        if isinstance(image, str):
            if _INDEX.fullmatch(image):
                return self.data.image(int(image))
            found = _UPLOAD.fullmatch(image)
            if found:
                try:
                    self.uploads.get(found.group(1))
                except KeyError:
                    raise NotFound(f"no upload {image!r} here (uploads live in memory while the server runs; the "
                                   "newest 32 are kept): upload the image again") from None
                return found.group(1)
        raise InputError(f"image {str(image)[:40]!r} is neither an image index (0..{self.data.n_images - 1}) nor "
                         "'upload:<id>' (what POST /api/upload returned)")

    def _codes(self, image):
        if isinstance(image, str):
            up = self.uploads.get(image)
            return up.values, up.indices, up.positions
        return self.data.image_codes(image)

    def _pixels(self, image) -> torch.Tensor:
        if isinstance(image, str):
            return self.model.pixels(self.uploads.get(image).image)
        if self.images is None:
            raise Unavailable(f"the pixels of the images are unknown here ({self.image_note}); start the explorer "
                              "with --images FOLDER_OR_LIST")
        return self.model.pixels(self.images[image])

    def _classes(self, probs: np.ndarray, order: np.ndarray) -> list[dict]:
        names = self.model.class_names(probs.size)
        return [{"index": int(c), "name": names[int(c)], "p": float(probs[int(c)])} for c in order]

    def thumb(self, image, latent=None) -> bytes:
        image = self.parse_image(image)
        j = None if latent in (None, "") else self.data.latent(latent)
        if isinstance(image, str):
            up = self.uploads.get(image)
            heat = None if j is None else self.data.heat(up.values, up.indices, up.positions, j)
            return render(up.image, heat)
        return self.thumbs.png(image, j)

    def images_page(self, offset=0, limit=100) -> dict:
        for name, value, low in (("offset", offset, 0), ("limit", limit, 1)):
            if not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        limit = min(limit, 1000)
        rows = []
        for i in range(offset, min(offset + limit, self.data.n_images)):
            rows.append({"image": i, "name": self._name(i), "thumb": thumb_url(i, None)})
        return {"total": self.data.n_images, "rows": rows}

    def _name(self, i: int) -> str:
        try:
            return Path(self.encoded.image_path(i)).name
        except Exception:  # noqa: BLE001 - no recorded paths: a number
            return f"image {i}"

    def image(self, image) -> dict:
        key = self.parse_image(image)
        probs = None
        if self.has_head() or isinstance(key, str):
            p = self.uploads.get(key).probs if isinstance(key, str) else self.model.probabilities(self._pixels(key))
            if p is not None:
                probs = self._classes(p, np.argsort(-p, kind="stable")[:TOP_CLASSES])
        label = f"upload:{key}" if isinstance(key, str) else key
        return {"image": label, "grid": list(self.data.grid), "thumb": thumb_url(label, None), "probs": probs,
                "name": "upload" if isinstance(key, str) else self._name(key)}

    def upload(self, data: bytes) -> dict:
        picture = decode(data)
        why = self.model.why_not()
        if why:
            raise Unavailable(f"uploads need the model: {why}")
        pixels = self.model.pixels(picture)
        values, indices, positions = self.model.codes(pixels)
        probs = self.model.probabilities(pixels)
        key = self.uploads.add(Upload(picture, values, indices, positions, probs))
        return {"image": f"upload:{key}", "grid": list(self.data.grid)}

    def patches(self, image, patches) -> dict:
        key = self.parse_image(image)
        positions = self.data.patch_positions(patches)
        found = self.data.summed(*self._codes(key), positions)
        out = []
        for row in found:
            rows = self.data.exemplars(row["id"], per_rule=6).get("patch", [])
            out.append({**row, "exemplars": [{**e, "thumb": thumb_url(e["image"], row["id"])} for e in rows]})
        return {"image": image if isinstance(image, str) else key, "latents": out}

    def intervene(self, image, patches, edits) -> dict:
        key = self.parse_image(image)
        positions = None if patches is None else self.data.patch_positions(patches)
        if not isinstance(edits, list) or not edits:
            raise InputError("edits must be a non-empty list of {latent, scale}")
        if len(edits) > MAX_EDITS:
            raise InputError(f"{len(edits)} edits; at most {MAX_EDITS} latents at once")
        latents, scales = [], []
        for e in edits:
            if not isinstance(e, dict) or set(e) - {"latent", "scale"} or "latent" not in e or "scale" not in e:
                raise InputError(f"edit {str(e)[:60]}: give {{latent: id, scale: number}}")
            j = self.data.latent(e["latent"])
            s = e["scale"]
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s) or abs(s) > MAX_SCALE:
                raise InputError(f"scale {s!r} for latent {j}: a finite number within +-{MAX_SCALE:g} (the latent "
                                 "is set to scale x its max)")
            if j in latents:
                raise InputError(f"latent {j} is edited twice; list each latent once")
            latents.append(j)
            scales.append(float(s))
        maxima = torch.from_numpy(self.data.max.copy())
        before, after = self.model.intervene(self._pixels(key), latents, scales, maxima, positions)
        top = np.argsort(-before, kind="stable")[:TOP_CLASSES]
        return {"before": self._classes(before, top), "after": self._classes(after, top),
                "after_top": self._classes(after, np.argsort(-after, kind="stable")[:TOP_CLASSES]),
                "edits": [{"latent": j, "scale": s, "value": float(s * self.data.max[j])}
                          for j, s in zip(latents, scales)]}

    # ----- compare ------------------------------------------------------------------------
    def compare_image(self, image, other: str, top: int = 10) -> dict:
        if other not in self.compare:
            raise NotFound(f"no SAE named {other!r} to compare with; start the explorer with --compare "
                           f"{other}=DIR (known: {sorted(self.compare) or 'none'})")
        them = self.compare[other]
        key = self.parse_image(image)
        if isinstance(key, str):
            raise InputError("compare works on dataset images (an index), not uploads")
        if them.data.n_images != self.data.n_images:
            raise InputError(f"{other} encodes {them.data.n_images} images but this folder {self.data.n_images}: "
                             "compare needs two encodings of the same images")
        mine = self.data.summed(*self.data.image_codes(key), None, top)
        theirs = them.data.summed(*them.data.image_codes(key), None, top)
        for rows, who, sae in ((mine, self, ""), (theirs, them, f"&sae={other}")):
            for r in rows:
                r["thumb"] = thumb_url(key, r["id"]) + sae
                r["max"] = float(who.data.max[r["id"]])
        return {"image": key, "this": {"latents": mine}, "other": {"name": other, "latents": theirs},
                "nearest": self._nearest([r["id"] for r in mine], them)}

    def _nearest(self, ids: list[int], them) -> list[dict]:
        """[P] For each latent, the other SAE's latent whose per-image activation profile
        (the code summed over each image's tokens, [I]) has the highest cosine with its own."""
        if not ids:
            return []
        a, b = self.data.image_sums(), them.data.image_sums()
        norms_b = np.sqrt(np.asarray(b.multiply(b).sum(0)).ravel())
        out = []
        for j in ids:
            col = a[:, j]
            dots = np.asarray((b.T @ col).todense()).ravel()
            norm = float(np.sqrt(col.multiply(col).sum()))
            cos = dots / np.maximum(norms_b * norm, 1e-30)
            best = int(np.argmax(cos))
            out.append({"id": int(j), "other_id": best, "cosine": round(float(cos[best]), 6)})
        return out
