"""``saeengine eval``'s work: read an encode output folder, summarize its latents, splice the
SAE into its backbone for the downstream metrics (when asked), run the chosen experiments,
and write eval.json and the self-contained report.html. Every field: docs/eval-report.md.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._atomic import atomic_write_bytes
from ..errors import ConfigError, DataMismatchError, InputError
from ._args import count
from ._json import jsonable

FORMAT, VERSION = "saeengine-eval", 1
SIZES = ("small", "full")
# Quantiles of the per-latent firing frequency reported in eval.json (numpy's linear method).
FREQUENCY_QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
DENSE_FREQUENCY = 1e-2


def _experiment(module: str, function: str) -> Callable[..., dict]:
    def run(**kwargs) -> dict:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.experiments.{module}"), function)(**kwargs)
    return run


# --experiments name -> the function (size=, seed=, progress=) -> a JSON-able dict
EXPERIMENTS: dict[str, Callable[..., dict]] = {
    "classification": _experiment("classification", "run_classification_experiment"),
    "segmentation": _experiment("segmentation", "run_segmentation_experiment"),
    "model-comparison": _experiment("model_comparison", "run_model_comparison"),
}


def check_experiments(names: Sequence[str]) -> tuple[str, ...]:
    """The experiment names, checked (ConfigError naming the valid ones), duplicates dropped."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ConfigError(f"unknown experiment {', '.join(map(repr, unknown))}: choose from "
                          f"{', '.join(EXPERIMENTS)} (comma-separated)")
    return tuple(dict.fromkeys(names))


def latent_summary(stats: dict) -> dict:
    """The "latents" field of eval.json from a LatentStats result: counts of alive, dead and
    dense latents, their fractions, and the quantiles of the per-latent firing frequency."""
    frequency = np.asarray(stats["frequency"], dtype=np.float64)
    count = np.asarray(stats["count"], dtype=np.int64)
    d_sae = int(frequency.size)
    dead = int((count == 0).sum())
    dense = int((frequency > DENSE_FREQUENCY).sum())
    quantiles = np.quantile(frequency, FREQUENCY_QUANTILES) if d_sae else np.zeros(len(FREQUENCY_QUANTILES))
    return {"d_sae": d_sae, "n_tokens": int(stats["n_tokens"]), "alive": d_sae - dead, "dead": dead,
            "dense": dense, "dead_fraction": dead / d_sae if d_sae else 0.0,
            "dense_fraction": dense / d_sae if d_sae else 0.0,
            "frequency_quantiles": {f"{q:g}": float(v) for q, v in zip(FREQUENCY_QUANTILES, quantiles)}}


def _store(encoded):
    """The activation store the encode pass read, or None (with a warning) when it cannot be
    opened or is no longer the store that was encoded (its content hash changed)."""
    from ..store import ActivationStore

    info = encoded.summary.get("store") or {}
    where = info.get("dir")
    try:
        store = ActivationStore(where)
    except (TypeError, OSError, ValueError, RuntimeError) as exc:
        warnings.warn(f"the encoded store {where} cannot be opened ({exc}); the report shows no image paths",
                      stacklevel=3)
        return None
    if info.get("content_hash") and store.content_hash != info["content_hash"]:
        warnings.warn(f"the store now at {where} is not the one encoded (content hash {store.content_hash}, "
                      f"encoded {info['content_hash']}); the report shows no image paths", stacklevel=3)
        return None
    return store


def image_source(encoded, store, images) -> tuple[Any, list[str] | None, str]:
    """(images indexed by store image id or None, captions or None, a note for the report).

    images: None (the store's recorded paths, used when every one is a file as seen from
    here), a folder or file list in the store's image order, or a list of arrays / PIL
    images. A given source must hold as many images as the store records, with the same
    relative paths where both have them."""
    from ..backbones.images import ImageSource

    recorded = list(store.image_paths) if store is not None and store.n_images else []
    captions = recorded or None
    if images is not None:
        source = ImageSource(images)
        if len(source) < encoded.n_images or (recorded and len(source) != len(recorded)):
            held = len(recorded) if recorded else f"at least {encoded.n_images}"
            raise DataMismatchError(f"images: {len(source)} images given, but the encoded store holds {held}; "
                                    "pass the images in the store's order (the folder or file list it recorded)")
        relative = recorded and not any(Path(p).is_absolute() for p in recorded)  # record writes relative paths
        if relative and source.names is not None and source.names != recorded:
            first = next(i for i, (a, b) in enumerate(zip(source.names, recorded)) if a != b)
            raise DataMismatchError(f"images: image {first} is {source.names[first]!r} but the store recorded "
                                    f"{recorded[first]!r}; pass the folder or file list the store was recorded from")
        return source, captions or [source.name(i) for i in range(len(source))], "Images: as given."
    if recorded and all(Path(p).is_file() for p in recorded):
        return ImageSource(recorded), captions, "Images: the store's recorded paths."
    why = ("the store's recorded image paths are relative to the folder it was recorded from; pass that folder "
           "(--images) to see the images" if recorded else "the store recorded no image paths")
    return None, captions, f"Heatmaps alone, on white: {why}."


def downstream_sample(n_images: int, limit: int | None) -> np.ndarray:
    """The image ids the downstream metrics run on: all, or ``limit`` evenly spaced ones
    (first and last included), so memory for the pixels stays bounded."""
    if limit is None or limit >= n_images:
        return np.arange(n_images)
    return np.unique(np.linspace(0, n_images - 1, limit).round().astype(np.int64))


def _downstream(encoded, store, backbone, source, limit: int | None, batch_size: int = 32,
                progress: bool = False) -> dict:
    from ..backbones import load_backbone
    from ..sae import SAE
    from .downstream import downstream_metrics

    if source is None:
        raise InputError("downstream metrics need the images the store was recorded from: pass images (CLI "
                         "--images FOLDER_OR_LIST), in the store's order")
    layer = encoded.summary.get("store", {}).get("layer") or (store.meta.layer if store is not None else "")
    if not layer:
        raise InputError("downstream metrics need the layer the store was recorded at, but the encoded store "
                         "names none; encode a store written by saeengine record")
    recorded_size = (store.meta.extra or {}).get("image_size") if store is not None else None
    if isinstance(backbone, str):
        backbone = load_backbone(backbone)
        if recorded_size:  # the SAE learned the tokens of images at the recorded size
            backbone.image_size = int(recorded_size)
    elif recorded_size and getattr(backbone, "image_size", recorded_size) != recorded_size:
        warnings.warn(f"the backbone runs images at {backbone.image_size} px but the store was recorded at "
                      f"{recorded_size} px; the SAE sees other tokens than it was trained on (set "
                      f"backbone.image_size = {recorded_size})", stacklevel=3)
    sae_dir = (encoded.summary.get("sae") or {}).get("dir")
    if not sae_dir:
        raise InputError("the encoded folder does not say where its SAE is (summary.json sae.dir is empty): "
                         "encode again with the SAE's folder (encode_store(..., sae_dir=DIR), or the CLI's --sae)")
    sae = SAE.load(sae_dir, device=backbone.device)
    # Images the recording skipped as unreadable have no tokens: leave them out.
    chosen = [int(i) for i in downstream_sample(len(source), limit)
              if i < encoded.n_images and encoded.image_rows(int(i)).size]
    pixels = backbone.preprocess([source[i] for i in chosen])
    metrics = downstream_metrics(backbone, layer, sae, pixels, batch_size=batch_size, progress=progress)
    return {"backbone": backbone.name, "layer": layer, **jsonable(metrics)}


def default_out_dir(encoded_dir) -> Path:
    """<encoded_dir>-eval, beside the encode folder: inside it, the encode folder would no
    longer read as encode's own (a rerun of encode would refuse it)."""
    encoded_dir = Path(encoded_dir)
    return encoded_dir.with_name(encoded_dir.name + "-eval")


def evaluate(encoded_dir, out_dir=None, *, experiments: Sequence[str] = (), size: str = "small", backbone=None,
             images=None, n_latents: int = 24, per_latent: int = 8, progress: bool = True,
             downstream_images: int | None = 512) -> dict:
    """Evaluate an encode output folder; write out_dir/eval.json and out_dir/report.html.

    encoded_dir: a folder written by encode_store (EncodedDataset's errors for others).
    out_dir: default <encoded_dir>-eval (beside it). experiments: names from EXPERIMENTS, each run with
    (size, seed=0). backbone: None (no downstream metrics), a Backbone, or a name for
    load_backbone (e.g. "efficientnet-lite0"). images: the store's images in its order (a
    folder, a file list, or a list of arrays; default the store's recorded paths). n_latents
    latents get a card with per_latent exemplars per rule. downstream_images: the downstream
    metrics run on this many images, evenly spaced in store order (None: all; their pixels
    are held in memory at once). Returns what eval.json holds.
    """
    from .encoded import EncodedDataset
    from .report import render_report
    from .report_latents import choose_latents, latent_cards

    experiments = check_experiments(experiments)
    if size not in SIZES:
        raise ConfigError(f"size={size!r}: choose one of {', '.join(SIZES)}")
    n_latents, per_latent = count("n_latents", n_latents, 0), count("per_latent", per_latent, 1)
    if downstream_images is not None:
        downstream_images = count("downstream_images", downstream_images, 1)
    encoded = EncodedDataset(encoded_dir)
    out_dir = default_out_dir(encoded_dir) if out_dir is None else Path(out_dir)
    stats = encoded.stats
    store = _store(encoded)
    source, captions, note = image_source(encoded, store, images)
    latents = latent_summary(stats)
    shown, rule = choose_latents(np.asarray(stats["frequency"], dtype=np.float64),
                                 np.asarray(stats["mean_nonzero"], dtype=np.float64), n_latents)
    latents["shown"] = {"rule": rule, "latents": shown.tolist()}
    downstream = (_downstream(encoded, store, backbone, source, downstream_images, progress=progress)
                  if backbone is not None else None)
    results = {name: jsonable(EXPERIMENTS[name](size=size, seed=0, progress=progress)) for name in experiments}
    result = {"format": FORMAT, "version": VERSION, "encoded": str(Path(encoded_dir).resolve()),
              "metrics": jsonable(encoded.metrics), "latents": latents, "downstream": downstream,
              "experiments": results, "report": "report.html"}
    token_kinds = (store.meta.extra or {}).get("token_kinds") if store is not None else None
    cards = latent_cards(encoded, shown, images=source, captions=captions, token_kinds=token_kinds,
                         per_latent=per_latent, progress=progress)
    page = render_report(result, stats, cards, images_note=note)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "eval.json", json.dumps(result, indent=2, allow_nan=False).encode() + b"\n")
    atomic_write_bytes(out_dir / "report.html", page.encode())
    return result
