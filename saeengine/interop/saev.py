"""saev (Stevens et al.; PyPI ``saev``): its ``sae.pt`` checkpoint.

Layout (saev 0.1.0, ``saev.nn.dump``): one line of JSON, the SAE's config
(``vars(config.SparseAutoencoder)``: d_vit, exp_factor, sparsity_coeff, ...), then a torch
state dict: ``W_enc`` [d_vit, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_vit],
``b_dec`` [d_vit], with d_sae = d_vit * exp_factor. The state dict is read with
``torch.load(weights_only=True)`` from the byte after the line (nothing is unpickled but
tensors; a pickle naming a custom class is refused).

Encoder (saev 0.1.0 ``SparseAutoencoder.forward``): f = relu((x - b_dec) @ W_enc + b_enc),
x_hat = f @ W_dec + b_dec: saeengine's "relu" architecture with W_enc transposed, exactly.

Normalization: saev normalizes the activations in its data loader (x <- (clamp(x) - mu) / s,
``saev.activations``), not in the SAE, and ``sae.pt`` does not store mu or s. The loaded
SAE therefore reads saev-normalized activations, as saev's own SAE does;
``cfg.metadata["interop"]["input"]`` says so, and ``["peer"]["data"]`` copies the
preprocessing fields (clamp, scale_mean, scale_norm, layer) of the run's ``config.json``
when it lies beside ``sae.pt``.

Refused: checkpoints whose first line carries a ``schema`` field (saev's later git
versions, not released on PyPI). Between those versions the encoder's convention changed
(whether b_dec is subtracted from the input) without a schema change, so the header does
not determine the computation; converting one would be a guess.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ._common import build_sae, safe_torch_load, take

NAME = "saev"
CHECKPOINT = "sae.pt"
MAX_HEADER_BYTES = 1 << 20  # the JSON line is a few hundred bytes; more is not saev's file
TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) format starts the state dict
# saev 0.1.0's config.SparseAutoencoder fields; none but d_vit and exp_factor changes inference
KNOWN_FIELDS = {"d_vit", "exp_factor", "sparsity_coeff", "n_reinit_samples", "ghost_grads", "remove_parallel_grads",
                "normalize_w_dec", "seed"}


def _checkpoint(path: Path) -> Path:
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def _read_header(file: Path) -> tuple[dict, int]:
    """(the JSON config line as a dict, the byte offset of the state dict after it)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a saev checkpoint is the {CHECKPOINT} that saev.nn.dump writes "
                              "(pass that file or the folder holding it)")
    with open(file, "rb") as f:
        head = f.read(MAX_HEADER_BYTES + 1)
    end = head.find(b"\n")
    if not head.startswith(b"{") or end < 0:
        raise CheckpointError(f"{file}: not a saev checkpoint: it does not start with saev's JSON config line "
                              "(saev.nn.dump writes one line of JSON, then the torch state dict)")
    try:
        header = json.loads(head[:end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: its first line is not valid JSON ({err}); the file is corrupted") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: its first line is JSON but not an object; not a saev checkpoint")
    return header, end + 1


def detect(path: Path) -> bool:
    """A saev ``sae.pt`` (the file, or a folder holding it): a JSON object on the first
    line, then a torch zip. Reads the first bytes only."""
    file = _checkpoint(path)
    try:
        if not file.is_file():
            return False
        header, offset = _read_header(file)
        with open(file, "rb") as f:
            f.seek(offset)
            return f.read(4) == TORCH_ZIP_MAGIC
    except (CheckpointError, OSError):
        return False


def _int_field(file: Path, header: dict, name: str) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{file}: config line field {name!r} is {value!r}; expected a positive int "
                              "(saev's config.SparseAutoencoder)")
    return value


def _run_data(file: Path) -> dict | None:
    """The preprocessing fields of the run's ``config.json`` beside ``sae.pt`` (saev's
    training writes its Train config there), for the provenance; None when absent."""
    try:
        data = json.loads((file.parent / "config.json").read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(data, dict):
        return None
    return {key: data[key] for key in ("layer", "patches", "clamp", "scale_mean", "scale_norm") if key in data}


def load(path: Path, *, hookpoint: str | None = None, device="cpu"):
    """The saev SAE in ``path`` (``sae.pt`` or its folder) as a saeengine "relu" SAE."""
    file = _checkpoint(path)
    if hookpoint is not None:
        raise CheckpointError(f"{file}: a saev checkpoint holds one SAE; drop hookpoint={hookpoint!r}")
    header, offset = _read_header(file)
    if "schema" in header:
        raise CheckpointError(
            f"{file}: config line field 'schema' = {header['schema']!r} (saev lib {header.get('lib', '?')!r}, commit "
            f"{header.get('commit', '?')!r}): a checkpoint of saev's later git versions, which saeengine does not "
            "read: their encoder convention (whether b_dec is subtracted from the input) changed without a schema "
            "change, so the file does not say how to compute its codes. Export the weights from saev yourself "
            "(W_enc.T, b_enc, W_dec, b_dec) into a saeengine SAE, or use a checkpoint of saev 0.1.0 (PyPI)")
    unknown = sorted(set(header) - KNOWN_FIELDS)
    if unknown:
        raise CheckpointError(f"{file}: config line fields {unknown} are not saev 0.1.0's (it has "
                              f"{sorted(KNOWN_FIELDS)}); they may change the computation (an activation other than "
                              "ReLU), so saeengine refuses rather than guess")
    d, expansion = _int_field(file, header, "d_vit"), _int_field(file, header, "exp_factor")
    F = d * expansion
    tensors = safe_torch_load(file, offset=offset)
    expected = {"W_enc": (d, F), "b_enc": (F,), "W_dec": (F, d), "b_dec": (d,)}
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{file}: state dict has tensors {extra} besides saev's {sorted(expected)}; not a "
                              "saev 0.1.0 ReLU SAE (saeengine refuses rather than ignore them)")
    W_enc, b_enc, W_dec, b_dec = (take(file, tensors, name, shape) for name, shape in expected.items())
    provenance = {
        "format": NAME, "file": str(file), "peer": {"library": "saev", "config": header, "data": _run_data(file)},
        "input": "saev-normalized activations: saev's data loader maps x -> (clamp(x) - mean) / scalar before its "
                 "SAE (config.json's data.scale_mean / scale_norm), and sae.pt stores neither; normalize the same "
                 "way before encoding",
    }
    return build_sae("relu", W_enc.T, b_enc, W_dec, b_dec, provenance=provenance, source=file, device=device)
