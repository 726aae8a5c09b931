"""EleutherAI sparsify (https://github.com/EleutherAI/sparsify, ``eai-sparsify``) folders.

A hookpoint folder holds ``cfg.json`` (SparseCoderConfig + ``d_in``) and ``sae.safetensors``
(``encoder.weight`` [F, d], ``encoder.bias`` [F], ``W_dec`` [F, d], ``b_dec`` [d], and
``W_skip`` [d, d] with a skip connection); a run folder holds one subfolder per hookpoint
("layers.3", "layers.3.mlp", ...) next to the trainer's config.json and state files.
``from_pretrained(run_folder, hookpoint="layers.3")`` picks one; a run folder with a
single hookpoint needs none.

sparsify's SparseCoder: encode top-k of relu((x - b_dec) @ encoder.weight^T +
encoder.bias), decode acts @ W_dec + b_dec (+ x @ W_skip^T): saeengine's "topk" exactly,
field for field (its b_dec subtraction is saeengine's). Decoder rows are kept as stored
(sparsify normalizes them during training only). Weights are upcast to float32 (exact;
a bf16 SAE's own bf16 arithmetic is not reproduced, the float32 one is).

- ``transcode: true`` (a transcoder: the encoder reads x itself, no b_dec subtracted, and
  the decoder predicts another activation): loaded with the encoder bias folded
  (encoder.bias + b_dec @ encoder.weight^T), with a UserWarning: its "reconstruction" is
  the predicted output, so FVU against the input means nothing.
- Refused (CheckpointError): ``skip_connection`` / ``W_skip`` (the decoder output depends on
  x, which saeengine's decode cannot take; no exact form), ``activation: "groupmax"``
  (one latent per group, not a top-k).

Export (:func:`save`): TopK (and Matryoshka over TopK) SAEs as one hookpoint folder that
``SparseCoder.load_from_disk`` reads; normalization folded into the weights as for SAELens.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .._atomic import atomic_write
from ..errors import CheckpointError
from . import _common

NAME = "sparsify"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def _is_hookpoint(path: Path) -> bool:
    return path.is_dir() and (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def hookpoints(path: Path) -> list[str]:
    """The hookpoint subfolders of a run folder, sorted."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if _is_hookpoint(p))


def detect(path: Path) -> bool:
    path = Path(path)
    return _is_hookpoint(path) or bool(hookpoints(path))


def _pick(path: Path, hookpoint: str | None) -> Path:
    if _is_hookpoint(path) and hookpoint in (None, path.name):
        return path
    present = hookpoints(path)
    if hookpoint is None:
        if len(present) == 1:
            return path / present[0]
        raise CheckpointError(f"{path}: a sparsify run folder with {len(present)} hookpoints {present}; pass one, "
                              f"e.g. from_pretrained(path, hookpoint={present[0]!r}), or pass the hookpoint's own "
                              f"folder ({path / present[0]})" if present else
                              f"{path}: no sparsify hookpoint folder ({CFG_FILE} + {WEIGHTS_FILE}) here")
    if hookpoint in present:
        return path / hookpoint
    raise CheckpointError(f"{path}: no hookpoint {hookpoint!r} here; the hookpoints present are {present}"
                          + ("" if present else f" (this is hookpoint folder {path.name!r} itself)"))


def load(path: Path, *, hookpoint: str | None = None, device="cpu"):
    """One sparsify SparseCoder as a saeengine "topk" SAE (see the module docstring)."""
    folder = _pick(Path(path), hookpoint)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = _common.read_json(cfg_path)
    d = _common.field(cfg_path, cfg, "d_in", int)
    k = _common.field(cfg_path, cfg, "k", int)
    activation = _common.field(cfg_path, cfg, "activation", str, default="topk")
    if activation != "topk":
        raise CheckpointError(f"{cfg_path}: field 'activation' is {activation!r}: saeengine has top-k only (groupmax "
                              "keeps one latent per group of latents); not loaded")
    header, _ = _common.read_safetensors_header(weights_path)
    if _common.field(cfg_path, cfg, "skip_connection", bool, default=False) or "W_skip" in header:
        raise CheckpointError(f"{weights_path}: tensor 'W_skip' (cfg.json field 'skip_connection' true): the "
                              "decoder adds x @ W_skip^T, which a saeengine SAE cannot express (its decode reads "
                              "the code only); not loaded. Use sparsify itself for this SAE, or train one without "
                              "skip_connection")
    if "encoder.weight" not in header:
        raise CheckpointError(f"{weights_path}: tensor 'encoder.weight' is missing (it holds {sorted(header)}); "
                              "not a sparsify SparseCoder (saved with decoder=False?)")
    F = header["encoder.weight"]["shape"][0]
    num_latents = _common.field(cfg_path, cfg, "num_latents", int, default=0)
    expansion = _common.field(cfg_path, cfg, "expansion_factor", int, default=None)
    implied = num_latents or (d * expansion if expansion is not None else F)
    if implied != F:
        raise CheckpointError(f"{cfg_path}: fields 'num_latents'/'expansion_factor' imply {implied} latents but "
                              f"{weights_path.name} holds {F}; the weights and config come from different saves")
    shapes = {"encoder.weight": (F, d), "encoder.bias": (F,), "W_dec": (F, d), "b_dec": (d,)}
    t = {n: v.float() for n, v in _common.read_safetensors(weights_path, shapes, allow_extra=False).items()}
    b_enc = t["encoder.bias"]
    transcode = _common.field(cfg_path, cfg, "transcode", bool, default=False)
    if transcode:
        b_enc = b_enc + t["b_dec"] @ t["encoder.weight"].T  # its encoder reads x itself
        warnings.warn(f"{folder}: a sparsify transcoder: encode is exact, but decode predicts another activation "
                      "(its b_dec is that output's bias): reconstruction metrics against the input mean nothing",
                      UserWarning, stacklevel=3)
    provenance = {"format": NAME, "file": str(weights_path), "hookpoint": folder.name, "transcoder": transcode,
                  "peer_config": cfg}
    return _common.build_sae("topk", t["encoder.weight"], b_enc, t["W_dec"], t["b_dec"], k=k,
                             provenance=provenance, source=weights_path, device=device)


def save(sae, directory: Path) -> Path:
    """Write ``sae`` (TopK, or Matryoshka over TopK) as a sparsify hookpoint folder."""
    from safetensors.torch import save_file

    from .saelens import folded_weights

    directory = Path(directory)
    cfg = sae.cfg
    selection = cfg.matryoshka_inner if cfg.architecture == "matryoshka" else cfg.architecture
    if selection != "topk":
        raise CheckpointError(f"cannot export a {cfg.architecture!r} SAE to sparsify ({directory}): sparsify's "
                              "SparseCoder is TopK only; export it to 'saelens' instead")
    w = folded_weights(sae)
    tensors = {"encoder.weight": w["W_enc"].contiguous(), "encoder.bias": w["b_enc"].contiguous(),
               "W_dec": w["W_dec"].contiguous(), "b_dec": w["b_dec"].contiguous()}
    config = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": True,
              "num_latents": int(cfg.d_sae), "k": int(cfg.k), "multi_topk": False, "skip_connection": False,
              "transcode": False, "d_in": int(cfg.d_in)}
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: is a file; the sparsify export writes a folder")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / CFG_FILE, lambda p: p.write_text(json.dumps(config) + "\n"))
    return directory
