"""Verifying an SAE checkpoint as it is loaded: config.json's fields and types, the SAEConfig
it holds, the weights' pairing, size, SHA-256 and header, and the tensors' names, shapes,
dtypes, recorded config, finiteness and normalization statistics (the list in
saeengine/checkpoint.py's docstring). Every failure is a CheckpointError naming the file
and the field. Also the two checks saving shares: non-finite values and the SHA-256."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint_format import (_FIELDS, CONFIG_FILE, FORMAT, FORMAT_VERSION, LEGACY_V1_FIELDS, NORM_BUFFERS,
                                WEIGHTS_FILE)
from ._hashing import hash_files
from .config import SAEConfig
from .errors import CheckpointError, ConfigError



# ----- shared with saving -----------------------------------------------------------------
def nan_markers(sae) -> set[str]:
    """Buffers in which NaN means "not set yet" (BatchTopK's threshold before training);
    parameters and the normalization statistics must be finite."""
    return {name for name, _ in sae.named_buffers()} - set(NORM_BUFFERS)


def nonfinite_counts(tensors: dict[str, torch.Tensor], markers: set[str]) -> dict[str, torch.Tensor]:
    """For each floating tensor, how many of its values it must not hold (NaN is allowed
    only in ``markers``, see :func:`nan_markers`): a 0-d int64 tensor on the tensor's
    device, not read on the host (a caller reads many at once)."""
    return {name: (torch.isinf(t) if name in markers else ~torch.isfinite(t)).sum()
            for name, t in tensors.items() if t.is_floating_point()}


def listed_nonfinite(tensors: dict[str, torch.Tensor], counts: dict[str, int]) -> list[str]:
    """'name (n of m values)' for each tensor with a nonzero count (``counts``: the
    values of :func:`nonfinite_counts`, read on the host)."""
    return [f"{name!r} ({n} of {tensors[name].numel()} values)" for name, n in counts.items() if n]


def nonfinite(tensors: dict[str, torch.Tensor], markers: set[str]) -> list[str]:
    """'name (n of m values)' for each floating tensor holding a value it must not (NaN is
    allowed only in ``markers``, see :func:`nan_markers`); one host read (the tensors
    share a device)."""
    counts = nonfinite_counts(tensors, markers)
    read = torch.stack(list(counts.values())).tolist() if counts else []
    return listed_nonfinite(tensors, dict(zip(counts, read)))


def sha256(path: Path) -> str:
    """The file's SHA-256, hex."""
    return hash_files(path)


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


def read_json_object(path: Path, holds: str) -> dict:
    """The JSON object in ``path``; CheckpointError when it is missing (``holds`` names
    what the folder should hold), not JSON, or not an object."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {holds}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or corrupted") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {_type_name(data)}")
    return data


def read_config(path: Path) -> dict:
    """config.json at ``path``, every field checked against its format version."""
    data = read_json_object(path, f"a checkpoint directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
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


def config_from(path: Path, data: dict) -> tuple[SAEConfig, list[str]]:
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


def read_weights(weights_path: Path, config_path: Path, data: dict) -> tuple[dict[str, torch.Tensor], dict]:
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
        actual = sha256(weights_path)
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


def check_tensors(sae, cfg: SAEConfig, data: dict, tensors: dict, header: dict,
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
    poisoned = nonfinite(tensors, nan_markers(sae))
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
