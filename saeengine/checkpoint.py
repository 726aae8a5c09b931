"""SAE checkpoints: ``sae.safetensors`` (tensors) + ``config.json`` (config and provenance).

Both files are written to a temporary name and renamed into place, so a crash never
leaves a half-written file under the real name. A random ``checkpoint_id`` stored in
both (the safetensors header metadata and config.json) detects a pair of files that do
not belong together (say, a crash between the two renames).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._atomic import atomic_write
from .config import SAEConfig

FORMAT = "saeengine.sae"
FORMAT_VERSION = 1
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or inconsistent; the message names it."""


def _state_tensors(sae) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}


def save_sae(sae, directory: str | Path, provenance: dict | None = None) -> Path:
    from . import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _state_tensors(sae)
    checkpoint_id = uuid.uuid4().hex
    atomic_write(directory / WEIGHTS_FILE,
                  lambda p: save_file(tensors, str(p), metadata={"format": FORMAT, "checkpoint_id": checkpoint_id}))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "library_version": __version__,
        "config": sae.cfg.to_dict(),
        "normalization": {"kind": sae.cfg.normalization, "present": sae.cfg.normalization != "none"},
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for name, t in tensors.items()},
        "provenance": {
            "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            **(provenance or {}),
        },
    }
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or corrupted") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    for field in ("format", "format_version", "checkpoint_id", "config", "tensors"):
        if field not in data:
            raise CheckpointError(f"{path}: field {field!r} is missing")
    if data["format"] != FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {data['format']!r}, expected {FORMAT!r}")
    if data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: field 'format_version' is {data['format_version']}; this saeengine "
                              f"reads up to {FORMAT_VERSION}, upgrade saeengine")
    return data


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}, fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the file is truncated or corrupted") from err


def load_sae(directory: str | Path, device: torch.device | str = "cpu"):
    from .sae import SAE

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass the folder that SAE.save wrote")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    data = _read_config(config_path)
    try:
        cfg = SAEConfig.from_dict(data["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: field 'config' is invalid: {err}") from err
    tensors, metadata = _read_tensors(weights_path)
    if metadata.get("checkpoint_id") != data["checkpoint_id"]:
        raise CheckpointError(f"{weights_path} and {config_path} come from different saves (checkpoint_id "
                              f"{metadata.get('checkpoint_id')!r} vs {data['checkpoint_id']!r}); save the SAE again")
    sae = SAE(cfg, device="meta")
    expected = sae.state_dict()
    for name, ref in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{weights_path}: tensor {name!r} is missing")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{weights_path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but "
                                  f"config.json (d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {tuple(ref.shape)}")
        if tensors[name].dtype != ref.dtype:
            raise CheckpointError(f"{weights_path}: tensor {name!r} has dtype {tensors[name].dtype}, but config.json "
                                  f"field 'dtype' implies {ref.dtype}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{weights_path}: unexpected tensors {extra} for architecture {cfg.architecture!r}")
    sae.load_state_dict(tensors, assign=True)
    return sae.to(device)
