"""A recording's settings: checking record_activations' arguments and its out_dir, building
the settings that recording.json keeps (backbone, a fingerprint of its weights, layers,
keep, dtype, batch and shard sizes, image size, the images), writing that file, and
matching a resumed recording's settings against it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_write_bytes
from .._lock import LOCK_FILE
from ..errors import ConfigError, DataMismatchError, StoreCorruptError
from ..store.metadata import DTYPES
from .base import Backbone
from .images import ImageSource

RECORDING_FILE = "recording.json"
RECORDING_FORMAT = "saeengine-recording"


# ----- arguments ---------------------------------------------------------------------------
def check_arguments(backbone: Backbone, layers, keep, batch_size, dtype, shard_tokens
                    ) -> tuple[dict[str, str], tuple[str, ...]]:
    """ConfigError unless record_activations' settings are valid -> ({layer as given:
    canonical "blocks.i"}, keep as a tuple)."""
    layer_names = check_layers(backbone, layers)
    keep = check_keep(backbone, keep)
    for name, value in (("batch_size", batch_size), ("shard_tokens", shard_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return layer_names, keep


def settings_of(backbone: Backbone, items, layer_names: dict[str, str], keep: tuple[str, ...], dtype: str,
                batch_size: int, shard_tokens: int) -> dict:
    """What recording.json keeps of a recording of ``items`` (what backbone.load_inputs gave)."""
    return {"backbone": backbone.name, "weights": weights_fingerprint(backbone.model),
            "layers": list(layer_names.values()), "keep": list(keep), "dtype": dtype,
            "batch_size": int(batch_size), "shard_tokens": int(shard_tokens),
            "image_size": getattr(backbone, "image_size", None),
            "images": {"count": len(items), "fingerprint": inputs_fingerprint(items)}}


def check_layers(backbone: Backbone, layers) -> dict[str, str]:
    """{layer as given: canonical "blocks.i"}; a layer named twice (also as blocks.-1 and
    blocks.<n-1>) or unknown raises ConfigError."""
    layers = [layers] if isinstance(layers, str) else list(layers) if hasattr(layers, "__iter__") else layers
    if not isinstance(layers, list) or not layers:
        raise ConfigError(f"layers must name at least one layer, e.g. ['blocks.{len(backbone.blocks) - 1}'] "
                          f"(valid: blocks.0 .. blocks.{len(backbone.blocks) - 1}); got {layers!r}")
    canonical: dict[str, str] = {}
    for layer in layers:
        name = f"blocks.{backbone.layer_index(layer)}"
        if name in canonical.values() or layer in canonical:
            first = next(given for given, c in canonical.items() if c == name)
            raise ConfigError(f"layer {layer!r} is named twice (as {first!r} and {layer!r}): every token would be "
                              "recorded twice; name each layer once")
        canonical[layer] = name
    return canonical


def check_keep(backbone: Backbone, keep) -> tuple[str, ...]:
    keep = (keep,) if isinstance(keep, str) else tuple(keep) if hasattr(keep, "__iter__") else keep
    valid = backbone.token_kind_names()
    if not isinstance(keep, tuple) or not keep:
        raise ConfigError(f"keep must name at least one token kind; {backbone.name} labels {valid}")
    unknown = [kind for kind in keep if kind not in valid]
    if unknown:
        raise ConfigError(f"keep names unknown token kinds {unknown}; {backbone.name} labels {valid}")
    if len(set(keep)) != len(keep):
        raise ConfigError(f"keep names a token kind twice: {list(keep)}; name each kind once")
    return tuple(keep)


def _is_bookkeeping(name: str) -> bool:
    """The lock, or a recording.json write killed before its rename: no recorded data."""
    return name == LOCK_FILE or name.startswith(f".{RECORDING_FILE}.tmp-")


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """ConfigError unless out_dir can take a new recording (or, with resume, continue one)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file; pass a folder for the stores")
    if out_dir.is_dir() and any(not _is_bookkeeping(p.name) for p in out_dir.iterdir()):
        if not resume:
            raise ConfigError(f"out_dir {out_dir} is not empty; record into a new folder, or pass resume=True "
                              "(CLI: --resume) to continue the recording in it")
        if not (out_dir / RECORDING_FILE).exists():
            raise ConfigError(f"cannot resume in out_dir {out_dir}: it holds no {RECORDING_FILE}, so it is not a "
                              "recording that record_activations started; record into a new folder")


# ----- recording.json ----------------------------------------------------------------------
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the weights: every parameter's name, shape, dtype and first 64
    values (exact bytes; the same on any device)."""
    h = hashlib.blake2b(digest_size=16)
    for name, param in model.state_dict().items():
        head = param.detach().reshape(-1)[:64].cpu().contiguous()
        h.update(f"{name}{tuple(param.shape)}{param.dtype}".encode() + head.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def inputs_fingerprint(items) -> str:
    if isinstance(items, ImageSource):
        return items.fingerprint()
    h = hashlib.blake2b(digest_size=16)

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if isinstance(value, np.ndarray):
            h.update(f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                feed(key)
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for v in value:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(value).encode())

    feed(list(items))
    return h.hexdigest()


def write_settings(out_dir: Path, settings: dict) -> None:
    body = {"format": RECORDING_FORMAT, "version": 1, **settings}
    atomic_write_bytes(out_dir / RECORDING_FILE, (json.dumps(body, indent=1) + "\n").encode())


def check_same_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / RECORDING_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreCorruptError(f"{path} cannot be read ({exc}); the recording's settings are lost: record "
                                "into a new folder") from exc
    if saved.get("format") != RECORDING_FORMAT:
        raise StoreCorruptError(f"{path} is not a saeengine recording file")
    differences = []
    for key, now in settings.items():
        then = saved.get(key)
        if then == now:
            continue
        if key == "images":
            differences.append(f"images: {then.get('count')} (list {then.get('fingerprint')}) when recorded, "
                               f"{now['count']} (list {now['fingerprint']}) now")
        elif key == "weights":
            differences.append(f"weights: other parameters (fingerprint {then} when recorded, {now} now)")
        else:
            differences.append(f"{key}: {then!r} when recorded, {now!r} now")
    if differences:
        raise DataMismatchError(f"cannot resume the recording in {out_dir}: it was recorded with other settings ("
                                + "; ".join(differences) + "). Resume with the same settings, or record into a "
                                "new folder")
