"""SAE checkpoints: ``sae.safetensors`` (tensors) + ``config.json`` (config, checksum, provenance).

Format version 2 (what :func:`save_sae` writes):

- ``sae.safetensors``: every tensor of the SAE's state_dict; its header metadata holds
  ``format``, ``checkpoint_id`` and ``sae_config`` (the SAEConfig as saved, JSON).
- ``config.json``: ``format``, ``format_version``, ``checkpoint_id``, ``library_version``,
  ``config`` (every SAEConfig field), ``normalization`` ({kind, present}), ``tensors``
  ({name: {shape, dtype}}), ``weights`` ({file, bytes, sha256} of sae.safetensors) and
  ``provenance``.

Saving refuses a poisoned SAE (NaN or inf in a parameter or in the normalization
statistics: NonFiniteError, nothing written). Both files are written under temporary
names; config.json is renamed into place once the weights are whole on disk, then the
weights. A failed save (an exception, a full disk) leaves the checkpoint already there as
it was; a crash in the instant between the two renames leaves a pair whose
``checkpoint_id`` differ, which loading refuses ("different saves").

Loading raises CheckpointError naming the file and the field, unless:

- config.json holds every field of its format version with its type and no other, and a
  ``format_version`` this library reads (a newer one: upgrade saeengine);
- ``config`` holds every SAEConfig field, valid (none takes a default on load);
- the two files come from one save (their checkpoint_ids match);
- sae.safetensors has the recorded size and SHA-256 (a flipped byte anywhere, header or
  data: "corrupted: checksum mismatch");
- its tensors have the names, shapes and dtypes config.json declares and the config
  implies, and it was saved with the config that config.json holds (an edit of any field
  but the free-form ``metadata`` is refused), with ``normalization`` agreeing;
- every value is finite (NaN or inf: the SAE diverged; only BatchTopK's ``threshold``
  buffer may be NaN, meaning "not set yet"), and with ``normalization="none"`` the
  statistics are the identity (an edit from "mean_norm" would drop fitted ones).

Format version 1 (no checksum, no recorded config) still loads, with a UserWarning that it
is unverified (corruption of its data bytes cannot be detected); the SAEConfig fields
added since version 1 was written (``LEGACY_V1_FIELDS``) take the values that the version
which wrote it used. Save it again to get a verified checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._atomic import atomic_write
from .config import SAEConfig
from .errors import CheckpointError, ConfigError, NonFiniteError

FORMAT = "saeengine.sae"
FORMAT_VERSION = 2  # 2: the weights' size and SHA-256 in config.json, the config in the weights' header
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
NORM_BUFFERS = ("norm_mean", "norm_scale")

# The top-level fields of config.json by format version, with the JSON type each holds.
_FIELDS_V1: dict[str, type] = {"format": str, "format_version": int, "checkpoint_id": str, "library_version": str,
                               "config": dict, "normalization": dict, "tensors": dict, "provenance": dict}
_FIELDS = {1: _FIELDS_V1, 2: {**_FIELDS_V1, "weights": dict}}
# SAEConfig fields that saeengine gained after writing format-1 checkpoints, with the value
# its code behaved as before (Matryoshka did not exist; JumpReLU's bandwidth was this).
LEGACY_V1_FIELDS = {"jumprelu_bandwidth": 1e-3, "matryoshka_inner": "topk", "matryoshka_prefixes": [],
                    "matryoshka_random_prefixes": 10}
_CHUNK = 1 << 20


# ----- saving ---------------------------------------------------------------------------
def _state_tensors(sae) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}


def _nan_markers(sae) -> set[str]:
    """Buffers in which NaN means "not set yet" (BatchTopK's threshold before training);
    parameters and the normalization statistics must be finite."""
    return {name for name, _ in sae.named_buffers()} - set(NORM_BUFFERS)


def _nonfinite(tensors: dict[str, torch.Tensor], nan_markers: set[str]) -> list[str]:
    """'name (n of m values)' for each floating tensor holding a value it must not."""
    found = []
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        bad = int(torch.isinf(t).sum()) if name in nan_markers else int((~torch.isfinite(t)).sum())
        if bad:
            found.append(f"{name!r} ({bad} of {t.numel()} values)")
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def save_sae(sae, directory: str | Path, provenance: dict | None = None) -> Path:
    """Write ``sae`` to ``directory`` (format version 2, see the module docstring).

    Raises NonFiniteError (nothing written) for an SAE with NaN or inf in a parameter or
    in its normalization statistics, CheckpointError for a ``provenance`` that JSON cannot
    hold, DiskFullError for a full disk; each leaves a checkpoint already in ``directory``
    as it was.
    """
    from . import __version__

    directory = Path(directory)
    tensors = _state_tensors(sae)
    poisoned = _nonfinite(tensors, _nan_markers(sae))
    if poisoned:
        raise NonFiniteError(f"refusing to save a poisoned SAE to {directory}: {', '.join(poisoned)} hold NaN or "
                             "inf (its training diverged, or the data held NaN); nothing was written and a "
                             "checkpoint already there is kept. Lower the learning rate or clean the data")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: is a file; SAE.save writes a folder ({CONFIG_FILE}, {WEIGHTS_FILE})")
    checkpoint_id = uuid.uuid4().hex
    header = {"format": FORMAT, "checkpoint_id": checkpoint_id,
              "sae_config": json.dumps(sae.cfg.to_dict(), sort_keys=True)}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "library_version": __version__,
        "config": sae.cfg.to_dict(),
        "normalization": {"kind": sae.cfg.normalization, "present": sae.cfg.normalization != "none"},
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for name, t in tensors.items()},
        "weights": {"file": WEIGHTS_FILE, "bytes": 0, "sha256": ""},  # filled in once the file is written
        "provenance": {
            "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            **(provenance or {}),
        },
    }
    try:  # before any file is touched
        json.dumps(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save to {directory}: provenance is not JSON-serializable ({err}); "
                              f"{CONFIG_FILE} stores it: pass str, int, float, bool, None, lists and dicts") from None
    directory.mkdir(parents=True, exist_ok=True)

    def write_weights(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except SafetensorError as err:
            # It carries the OS error only in its text ("... (os error 28)") and deletes its
            # file, so neither an errno nor the free space would tell atomic_write the disk is full.
            found = re.search(r"\(os error (\d+)\)", str(err))
            if found is None:
                raise
            raise OSError(int(found.group(1)), f"writing {tmp} failed: {err}") from err
        config["weights"].update(bytes=tmp.stat().st_size, sha256=_sha256(tmp))
        # config.json goes into place only once the weights are whole in their temporary file:
        # a failure up to here changes nothing; a crash before the weights' rename leaves a
        # pair whose checkpoint_ids differ.
        atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))

    atomic_write(directory / WEIGHTS_FILE, write_weights)
    return directory


# ----- loading: config.json -------------------------------------------------------------
def _type_name(value: Any) -> str:
    return {dict: "a JSON object", list: "a list", str: "a str", bool: "a bool", int: "an int", float: "a float",
            type(None): "null"}.get(type(value), type(value).__name__)


def _expect(path: Path, field: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise CheckpointError(f"{path}: field {field!r} is {shown} ({_type_name(value)}); expected {expected}. "
                              "The file was edited or written by another tool: save the SAE again")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or corrupted") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {_type_name(data)}")
    for field in ("format", "format_version"):
        if field not in data:
            raise CheckpointError(f"{path}: field {field!r} is missing")
    _expect(path, "format", data["format"], data["format"] == FORMAT, repr(FORMAT))
    version = data["format_version"]
    _expect(path, "format_version", version, _is_int(version) and version >= 1, "an int >= 1")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: field 'format_version' is {version}; this saeengine reads up to "
                              f"{FORMAT_VERSION}: upgrade saeengine (pip install -U saeengine) to load it")
    fields = _FIELDS[version]
    missing = [field for field in fields if field not in data]
    if missing:
        which = f"field {missing[0]!r} is" if len(missing) == 1 else f"fields {missing} are"
        raise CheckpointError(f"{path}: {which} missing (format_version {version} holds {list(fields)})")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: unknown fields {unknown} for format_version {version} (it holds "
                              f"{list(fields)}); the file was edited or written by another tool")
    for field, kind in fields.items():
        _expect(path, field, data[field], isinstance(data[field], kind) and not isinstance(data[field], bool),
                _type_name(kind()))
    _check_blocks(path, data)
    return data


def _check_blocks(path: Path, data: dict) -> None:
    """The nested fields' layout: normalization, tensors, weights."""
    norm = data["normalization"]
    _expect(path, "normalization", norm, set(norm) == {"kind", "present"} and isinstance(norm["kind"], str)
            and isinstance(norm["present"], bool), '{"kind": str, "present": bool}')
    for name, spec in data["tensors"].items():
        _expect(path, f"tensors.{name}", spec, isinstance(spec, dict) and set(spec) == {"shape", "dtype"}
                and isinstance(spec["shape"], list) and all(_is_int(n) and n >= 0 for n in spec["shape"])
                and isinstance(spec["dtype"], str), '{"shape": [ints >= 0], "dtype": str}')
    if "weights" in data:
        w = data["weights"]
        _expect(path, "weights", w, set(w) == {"file", "bytes", "sha256"} and w["file"] == WEIGHTS_FILE
                and _is_int(w["bytes"]) and w["bytes"] >= 0 and isinstance(w["sha256"], str)
                and len(w["sha256"]) == 64 and all(c in "0123456789abcdef" for c in w["sha256"]),
                f'{{"file": "{WEIGHTS_FILE}", "bytes": int, "sha256": 64 hex digits}}')


def _config_from(path: Path, data: dict) -> tuple[SAEConfig, list[str]]:
    """The SAEConfig of config.json, and the legacy fields a format-1 file lacked."""
    raw, filled = data["config"], []
    if data["format_version"] == 1 and raw.get("architecture") != "matryoshka":
        filled = [name for name in LEGACY_V1_FIELDS if name not in raw]
        raw = {**{name: LEGACY_V1_FIELDS[name] for name in filled}, **raw}
    try:
        cfg = SAEConfig.from_dict(raw)
    except ConfigError as err:
        raise CheckpointError(f"{path}: field 'config' is invalid: {err}") from err
    norm = data["normalization"]
    if norm != {"kind": cfg.normalization, "present": cfg.normalization != "none"}:
        raise CheckpointError(f"{path}: field 'normalization' is {norm} but field 'config' has normalization="
                              f"{cfg.normalization!r}; the file was edited: restore it (the statistics are in "
                              f"{WEIGHTS_FILE})")
    return cfg, filled


# ----- loading: sae.safetensors ---------------------------------------------------------
def _header(path: Path) -> dict | None:
    """The weights file's header metadata, or None when the header cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the file is truncated or corrupted") from err


def _read_weights(weights_path: Path, config_path: Path, data: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Verify the pair, the size and the checksum, then read -> (tensors, header metadata)."""
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing; a checkpoint directory holds {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE}")
    header = _header(weights_path)
    # Checked first: a save interrupted between its renames leaves a pair that differs here,
    # and "different saves" says more than the checksum mismatch that follows from it.
    if header is not None and header.get("checkpoint_id") != data["checkpoint_id"]:
        raise CheckpointError(f"{weights_path} and {config_path} come from different saves (checkpoint_id "
                              f"{header.get('checkpoint_id')!r} vs {data['checkpoint_id']!r}): a save was "
                              "interrupted between its two files, or files were mixed up; save the SAE again")
    if data["format_version"] >= 2:
        recorded, size = data["weights"], weights_path.stat().st_size
        if size != recorded["bytes"]:
            raise CheckpointError(f"{weights_path}: truncated or replaced: it has {size} bytes but {config_path} "
                                  f"records {recorded['bytes']}; restore it from a backup or save the SAE again")
        actual = _sha256(weights_path)
        if actual != recorded["sha256"]:
            raise CheckpointError(f"{weights_path}: corrupted: checksum mismatch (sha256 {actual[:16]}..., "
                                  f"{config_path} records {recorded['sha256'][:16]}...); restore it from a backup "
                                  "or save the SAE again")
    tensors = _read_tensors(weights_path)
    if header is None or header.get("format") != FORMAT:
        raise CheckpointError(f"{weights_path}: its header does not name the format {FORMAT!r} (it has "
                              f"{None if header is None else header.get('format')!r}); not a saeengine SAE file")
    return tensors, header


def _describe(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _check_tensors(sae, cfg: SAEConfig, data: dict, tensors: dict, header: dict,
                   config_path: Path, weights_path: Path) -> None:
    """Names, shapes and dtypes (declared and implied), the recorded config, finiteness and
    the normalization statistics of the tensors read; ``sae`` is the meta-device SAE."""
    declared = {name: f"{spec['shape']} {spec['dtype']}" for name, spec in data["tensors"].items()}
    if set(declared) != set(tensors):
        raise CheckpointError(f"{config_path}: field 'tensors' declares {sorted(declared)} but {weights_path} "
                              f"holds {sorted(tensors)}; the files were edited")
    for name, t in tensors.items():
        if declared[name] != _describe(t):
            raise CheckpointError(f"{config_path}: field 'tensors' declares {name!r} as {declared[name]}, but "
                                  f"{weights_path} holds {_describe(t)}; the files were edited")
    expected = sae.state_dict()
    for name, ref in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{weights_path}: tensor {name!r} is missing (architecture {cfg.architecture!r} "
                                  "has it)")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{weights_path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but "
                                  f"config.json (d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {tuple(ref.shape)}")
        if tensors[name].dtype != ref.dtype:
            raise CheckpointError(f"{weights_path}: tensor {name!r} has dtype {tensors[name].dtype}, but config.json "
                                  f"field 'dtype' implies {ref.dtype}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{weights_path}: unexpected tensors {extra} for architecture {cfg.architecture!r}")
    if data["format_version"] >= 2:
        _check_recorded_config(cfg, header, config_path, weights_path)
    poisoned = _nonfinite(tensors, _nan_markers(sae))
    if poisoned:
        raise CheckpointError(f"{weights_path}: tensors {', '.join(poisoned)} hold NaN or inf: the SAE was saved "
                              "after its training diverged and cannot be used; train it again (lower the learning "
                              "rate, or clean the data)")
    mean, scale = tensors["norm_mean"], tensors["norm_scale"]
    if cfg.normalization == "none" and (bool(mean.any()) or float(scale) != 1.0):
        raise CheckpointError(f"{config_path}: field 'config' has normalization='none', but {weights_path} holds "
                              "fitted normalization statistics (norm_mean, norm_scale) that loading would drop; "
                              "the field was edited: restore normalization='mean_norm'")
    if cfg.normalization != "none" and not float(scale) > 0:
        raise CheckpointError(f"{weights_path}: norm_scale is {float(scale)}; normalization={cfg.normalization!r} "
                              "divides by it, so it must be > 0. Fit the normalization again and save")


def _check_recorded_config(cfg: SAEConfig, header: dict, config_path: Path, weights_path: Path) -> None:
    """config.json's config must be the one the weights were saved with (but metadata,
    free-form provenance that may be edited)."""
    try:
        saved = json.loads(header["sae_config"])
    except (KeyError, TypeError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{weights_path}: its header lacks the config it was saved with; the file was "
                              "written by another tool or edited: save the SAE again")
    mine = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as saved
    changed = [f"{name}={mine.get(name)!r} (saved: {saved.get(name)!r})" for name in sorted(set(mine) | set(saved))
               if name != "metadata" and mine.get(name) != saved.get(name)]
    if changed:
        raise CheckpointError(f"{config_path}: field 'config' was edited after the save: {', '.join(changed)}; "
                              f"{weights_path} was saved with the other values. Restore config.json, or load "
                              "the SAE and build the config you want from it")


# ----- loading --------------------------------------------------------------------------
def load_sae(directory: str | Path, device: torch.device | str = "cpu"):
    """Read a checkpoint written by :func:`save_sae`, verified as the module docstring
    lists; every failure is a CheckpointError naming the file and the field."""
    from .sae import SAE

    directory = Path(directory)
    if not directory.is_dir():
        hint = (f"; pass its folder {directory.parent}" if directory.name in (CONFIG_FILE, WEIGHTS_FILE)
                and directory.is_file() else "")
        raise CheckpointError(f"{directory}: not a directory; pass the folder that SAE.save wrote{hint}")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    data = _read_config(config_path)
    cfg, filled = _config_from(config_path, data)
    tensors, header = _read_weights(weights_path, config_path, data)
    sae = SAE(cfg, device="meta")
    _check_tensors(sae, cfg, data, tensors, header, config_path, weights_path)
    if data["format_version"] == 1:
        legacy = f"; the fields added since ({', '.join(filled)}) took their values of then" if filled else ""
        warnings.warn(f"{directory}: unverified: a format_version 1 checkpoint keeps no checksum, so a corrupted "
                      f"{WEIGHTS_FILE} cannot be detected{legacy}. Save it again (SAE.load(...).save(...)) to "
                      "get a verified one", UserWarning, stacklevel=3)
    sae.load_state_dict(tensors, assign=True)
    return sae.to(device)
