"""What every format module of :mod:`saeengine.interop` shares: safe readers for the
files other libraries write, shape checks, and :func:`build_sae`, which turns converted
tensors into a saeengine :class:`~saeengine.SAE` exactly.

Safety: nothing here executes pickled code. ``.pt``/``.pth`` files go through
``torch.load(weights_only=True)`` (a pickle naming a custom class is refused, naming the
file); a safetensors file's header is read and checked (offsets, sizes, dtypes, the
expected names and shapes) before any tensor is allocated, so a truncated or hostile
file fails before memory is spent on it.

Every failure is a :class:`~saeengine.errors.CheckpointError` naming the file, the field
and what to do.

Decoder rows: saeengine trains with unit-norm decoder rows, but encode and decode never
assume it. A converted SAE keeps the peer's rows as they are (no folding of row norms
into the encoder), because rescaling a latent changes TopK's ranking and every code
value: exactness first. ``provenance["decoder_row_norms"]`` records whether they were
unit; tools that read decoder rows as directions (steering) should normalize them.
"""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError

# A header bigger than this is not a weights file's (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 2**20
# torch.load reads the whole file into memory; refuse absurd sizes before it does.
MAX_TORCH_FILE_BYTES = 64 * 2**30

SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}

Shape = tuple  # of ints, or None for "any size" in that dimension
SMALLEST_THRESHOLD = float(torch.finfo(torch.float32).tiny) * 2.0**-23  # 1.4e-45: pre > it <=> pre > 0


def _file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (or not a file); pass the folder that holds it, or the right "
                              "format= for this folder")
    return path


# ----- JSON -------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """The JSON object in ``path``; CheckpointError when missing, not JSON or not an object."""
    path = _file(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or corrupted: download or "
                              "save it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def field(path: Path, data: Mapping, name: str, kind: type | tuple = object, default: Any = ...) -> Any:
    """``data[name]`` checked to be a ``kind`` (bool is not an int); CheckpointError naming
    the file and the field when it is missing (and no default) or of another type."""
    if name not in data:
        if default is not ...:
            return default
        raise CheckpointError(f"{path}: field {name!r} is missing; the file was not written by the library this "
                              "format= names, or by a version that stored it elsewhere")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise CheckpointError(f"{path}: field {name!r} is {value!r}; expected "
                              f"{' or '.join(k.__name__ for k in kinds)}")
    return value


# ----- safetensors --------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, every
    entry checked against the file's size (no tensor data is read)."""
    path = _file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupted: its header claims {n} bytes but the file has "
                                  f"{size}; download or save it again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupted safetensors header ({err}); download or save it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - n
    for name, info in header.items():
        ok = (isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES
              and isinstance(info.get("shape"), list) and all(isinstance(s, int) and s >= 0 for s in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2)
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed or unsupported header entry {info!r}")
        start, end = info["data_offsets"]
        expected = math.prod(info["shape"]) * SAFETENSORS_DTYPES[info["dtype"]][1]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end) or end - start != expected:
            raise CheckpointError(f"{path}: tensor {name!r}: offsets {info['data_offsets']} do not hold its shape "
                                  f"{info['shape']} of {info['dtype']}; the file is corrupted")
        if end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {8 + n + end} but the file has "
                                  f"{size} bytes; download or save it again")
    return header, metadata


def read_safetensors(path: Path, expected: Mapping[str, Shape] | None = None, *,
                     allow_extra: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU, as stored), read after the header is checked.

    expected: {name: shape} that must be present with those shapes (None in a shape: any
        size); the check runs on the header, before allocation. ``allow_extra=False``
        also refuses tensors not listed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    header, _ = read_safetensors_header(path)
    if expected is not None:
        missing = [name for name in expected if name not in header]
        if missing:
            raise CheckpointError(f"{path}: tensors {missing} are missing (it holds {sorted(header)}); the file "
                                  "is not this format's, or comes from another version: pass format= explicitly")
        for name, shape in expected.items():
            _check_dims(path, name, tuple(header[name]["shape"]), shape)
        extra = sorted(set(header) - set(expected))
        if extra and not allow_extra:
            raise CheckpointError(f"{path}: unexpected tensors {extra}; this format holds only {sorted(expected)}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read the tensors ({err}); the file is corrupted") from None


# ----- torch pickles -------------------------------------------------------------------------
def safe_torch_object(path: Path, *, offset: int = 0, max_bytes: int = MAX_TORCH_FILE_BYTES) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` (from byte ``offset``: a file with a
    header before the pickle), on the CPU. A pickle naming a class outside torch's
    allow-list (a whole pickled module, a custom config class) raises CheckpointError:
    it would run code."""
    path = _file(path)
    size = path.stat().st_size
    if not 0 <= offset < size:
        raise CheckpointError(f"{path}: empty or truncated ({size} bytes, data expected from byte {offset})")
    if size - offset > max_bytes:
        raise CheckpointError(f"{path}: {size} bytes, more than the {max_bytes} this reader accepts; convert it "
                              "to safetensors")
    try:
        if offset:
            with open(path, "rb") as f:
                f.seek(offset)
                source = io.BytesIO(f.read())
        else:
            source = str(path)
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (pickle, zip and torch raise many kinds)
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"{path}: refused: the pickle names classes outside torch's safe allow-list "
                                  f"({text}); loading it would execute code. Re-save only the state_dict "
                                  "(torch.save(model.state_dict(), ...)) or convert it to safetensors") from None
        raise CheckpointError(f"{path}: cannot be read as a torch file ({text}); it is truncated or corrupted") \
            from None


def _flatten(obj: Mapping, prefix: str, out: dict, path: Path) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            _flatten(value, name + ".", out, path)


def safe_torch_load(path: Path, *, offset: int = 0, max_bytes: int = MAX_TORCH_FILE_BYTES) -> dict[str, torch.Tensor]:
    """The tensors of a torch file as {name: tensor}; nested dicts are flattened with "."
    ({"state_dict": {"W": t}} -> {"state_dict.W": t}), non-tensor leaves dropped (read
    them with :func:`safe_torch_object`). Same safety as :func:`safe_torch_object`."""
    obj = safe_torch_object(path, offset=offset, max_bytes=max_bytes)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors (a state_dict); "
                              "re-save it with torch.save(model.state_dict(), ...)")
    out: dict[str, torch.Tensor] = {}
    _flatten(obj, "", out, Path(path))
    return out


# ----- shapes ----------------------------------------------------------------------------------
def _check_dims(file: Path, name: str, got: tuple, shape: Shape) -> None:
    if len(got) != len(shape) or any(s is not None and g != s for g, s in zip(got, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise CheckpointError(f"{file}: tensor {name!r} has shape {list(got)}, but the config implies {want}; the "
                              "weights and the config disagree (edited, or from different saves)")


def check_shape(file: Path, name: str, tensor: torch.Tensor, shape: Shape) -> torch.Tensor:
    """``tensor`` if its shape is ``shape`` (None: any size), else CheckpointError naming
    the file and the tensor."""
    _check_dims(Path(file), name, tuple(tensor.shape), tuple(shape))
    return tensor


def take(file: Path, tensors: Mapping[str, torch.Tensor], name: str, shape: Shape) -> torch.Tensor:
    """``tensors[name]`` checked to have ``shape``; CheckpointError when missing."""
    if name not in tensors:
        raise CheckpointError(f"{file}: tensor {name!r} is missing (it holds {sorted(tensors)})")
    return check_shape(file, name, tensors[name], shape)


# ----- building the SAE -------------------------------------------------------------------------
def exact_log(threshold: torch.Tensor) -> torch.Tensor:
    """log(threshold) [F] in float32, chosen (among log's float32 rounding and its two
    neighbours) so that ``exp(log_threshold)`` on this machine's CPU is as close to
    ``threshold`` as float32 allows: bit for bit where exp reaches it, else within an ulp
    or two (for |log t| > 1 the float32 grid of exp's outputs skips values). JumpReLU
    compares pre-activations against exp(log_threshold), so only a pre-activation within
    that ulp of its threshold could fire differently: smaller than the pre-activations'
    own rounding."""
    t = threshold.float()
    mid = torch.log(t.double()).float()
    candidates = torch.stack([mid, torch.nextafter(mid, torch.full_like(mid, math.inf)),
                              torch.nextafter(mid, torch.full_like(mid, -math.inf))])
    error = (torch.exp(candidates).double() - t.double()).abs()
    return candidates.gather(0, error.argmin(0, keepdim=True))[0]


def build_sae(arch: str, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
              k: int | None = None, threshold: torch.Tensor | float | None = None,
              norm_mean: torch.Tensor | None = None, norm_scale: torch.Tensor | float | None = None,
              provenance: dict | None = None, source: str | Path | None = None, config: dict | None = None,
              device="cpu"):
    """A saeengine SAE holding exactly these weights (float32; an upcast is exact).

    arch: a saeengine architecture ("topk", "batchtopk", "relu", "jumprelu").
    W_enc [F, d] (rows are latents, as saeengine's), b_enc [F], W_dec [F, d] (rows may be
        non-unit: kept as they are), b_dec [d] (subtracted from the normalized input
        before the encoder and added after the decoder, saeengine's convention).
    k: active latents per token ("topk", "batchtopk"; required there).
    threshold: "jumprelu": [F] positive thresholds (stored as log_threshold, see
        :func:`exact_log`); "batchtopk": a scalar (its inference threshold), or None.
    norm_mean [d] / norm_scale (scalar): when either is given the SAE normalizes its input
        as (x - norm_mean) / norm_scale ("mean_norm") and maps reconstructions back.
    provenance: JSON-serializable dict stored in ``cfg.metadata["interop"]`` (the source
        format, file, peer config).
    source: the file named in errors (default: provenance["file"]).
    config: further SAEConfig fields (e.g. matryoshka_inner, matryoshka_prefixes).
    """
    from ..config import SAEConfig
    from ..errors import ConfigError
    from ..sae import SAE

    provenance = dict(provenance or {})
    where = Path(source) if source is not None else Path(str(provenance.get("file", "<converted SAE>")))
    if W_enc.dim() != 2:
        raise CheckpointError(f"{where}: the encoder weight has shape {list(W_enc.shape)}; expected [d_sae, d_in]")
    F, d = W_enc.shape
    for name, t, shape in (("W_dec", W_dec, (F, d)), ("b_enc", b_enc, (F,)), ("b_dec", b_dec, (d,))):
        check_shape(where, name, t, shape)
    if norm_mean is not None:
        check_shape(where, "norm_mean", norm_mean, (d,))
    row_norms = W_dec.double().norm(dim=1)
    provenance.setdefault("decoder_row_norms", "unit" if bool(((row_norms - 1).abs() < 1e-4).all()) else "not unit")
    metadata = {"interop": provenance}
    normalization = "mean_norm" if norm_mean is not None or norm_scale is not None else "none"
    if arch in ("topk", "batchtopk") and k is None:
        raise CheckpointError(f"{where}: a {arch} SAE needs its k; the config does not give one")
    try:
        kwargs = dict(d_in=int(d), d_sae=int(F), architecture=arch, normalization=normalization, metadata=metadata,
                      **(config or {}))
        if k is not None:
            kwargs["k"] = int(k)
        elif get_k_default(arch, F) is not None:
            kwargs["k"] = get_k_default(arch, F)
        cfg = SAEConfig(**kwargs)
    except ConfigError as err:
        raise CheckpointError(f"{where}: cannot be expressed as a saeengine SAE: {err}") from None
    sae = SAE(cfg, device="meta")
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
             "norm_mean": norm_mean if norm_mean is not None else torch.zeros(d),
             "norm_scale": torch.as_tensor(1.0 if norm_scale is None else norm_scale).reshape(())}
    if arch == "jumprelu":
        if threshold is None:
            raise CheckpointError(f"{where}: a JumpReLU SAE needs its threshold [d_sae]; none found")
        threshold = check_shape(where, "threshold", torch.as_tensor(threshold), (F,)).float()
        if not bool(torch.isfinite(threshold).all()):
            raise CheckpointError(f"{where}: field 'threshold' holds NaN or inf; the SAE diverged or the file is "
                                  "corrupted")
        # A threshold <= 0 makes that latent a ReLU latent in the peers' JumpReLU (relu(pre) * (pre > t)):
        # the smallest float32 (a subnormal) is the positive threshold with the same firing set.
        threshold = torch.where(threshold > 0, threshold, torch.full_like(threshold, SMALLEST_THRESHOLD))
        state["log_threshold"] = exact_log(threshold)
    elif arch == "batchtopk" or (arch == "matryoshka" and (config or {}).get("matryoshka_inner") == "batchtopk"):
        state["threshold"] = torch.as_tensor(float("nan") if threshold is None else float(threshold)).reshape(())
    elif threshold is not None:
        raise CheckpointError(f"{where}: a threshold was given for a {arch} SAE, which has none")
    state = {name: t.detach().to(torch.float32).contiguous().clone() for name, t in state.items()}
    bad = [name for name, t in state.items() if not (name == "threshold" or bool(torch.isfinite(t).all()))]
    if bad:
        raise CheckpointError(f"{where}: tensors {bad} hold NaN or inf; the SAE diverged or the file is corrupted")
    expected = set(sae.state_dict())
    if set(state) != expected:  # an architecture with state this builder does not know
        raise CheckpointError(f"{where}: the {arch} architecture needs tensors {sorted(expected)}; the converter "
                              f"gives {sorted(state)}")
    sae.load_state_dict(state, assign=True)
    return sae.to(device).eval()


def get_k_default(arch: str, F: int) -> int | None:
    """The k stored for architectures that do not read it (relu, jumprelu): SAEConfig's
    default, capped so the config stays valid for tiny dictionaries."""
    if arch in ("relu", "jumprelu"):
        return min(32, int(F))
    return None
