"""SAELens (https://github.com/jbloomAus/SAELens, v6) folders: ``cfg.json`` +
``sae_weights.safetensors`` (+ ``sparsity.safetensors``, ``activation_scaler.json``,
``runner_cfg.json``, ``trainer_state.pt``, which are not needed).

SAELens layout: W_enc [d_in, d_sae] (saeengine's transposed), b_enc [d_sae], W_dec
[d_sae, d_in], b_dec [d_in]; encode relu-family((x - b_dec * apply_b_dec_to_input) @ W_enc +
b_enc), decode acts @ W_dec + b_dec.

Architectures (cfg.json "architecture"), both the inference layout (``save_model``) and
the training layout (``save_model`` of a TrainingSAE; ``save_inference_model`` writes the
inference one):

- "standard" -> saeengine "relu".
- "topk" -> "topk". ``rescale_acts_by_decoder_norm`` (ranks hidden_pre * ||W_dec_j|| and
  decodes with unit rows) is folded: W_enc rows and b_enc times ||W_dec_j||, W_dec rows
  divided by it (what SAELens's own inference save does).
- "jumprelu" -> "jumprelu" (``threshold``, or an older training file's ``log_threshold``).
  SAELens's relu(pre) * (pre > t) equals saeengine's pre * (pre > t) for t > 0; a t <= 0
  latent fires as a ReLU latent, kept as the smallest float32 threshold.
- "gated" -> "jumprelu", exactly in arithmetic: the gate (x~ @ W_enc + b_gate > 0) fires
  where the magnitude pre-activation m = x~ @ (W_enc * exp(r_mag)) + b_mag exceeds
  theta = b_mag - exp(r_mag) * b_gate, so the code is m * (m > max(theta, 0)).
- "batchtopk" (training layout only; SAELens saves it for inference as "jumprelu") ->
  "batchtopk" with its inference threshold ``topk_threshold`` (saeengine's eval mode
  thresholds at it, as SAELens's inference JumpReLU does); an integral k is required.
- "matryoshka_batchtopk" (training layout) -> "matryoshka" (inner "batchtopk", prefixes
  = matryoshka_widths), same threshold.

Normalization (cfg.json "normalize_activations"): "none"; "expected_average_only_in" only
with its factor s in ``activation_scaler.json`` (SAELens scales inputs by s outside the
SAE and unscales outputs): folded as saeengine's "mean_norm" with norm_mean 0 and
norm_scale 1/s. Refused: "constant_norm_rescale" and "layer_norm" (per-token statistics:
saeengine's normalization is one affine map), "covariance_whitening" (fold it with
SAELens's ``fold_activation_whitening`` and save again), and the architectures
saeengine has no exact form for (transcoders, skip transcoders, abstopk, matching
pursuit, temporal).

``apply_b_dec_to_input=False`` is folded into the encoder bias: b_enc + b_dec @ W_enc.
Weights of any dtype are upcast to float32 (exact). Decoder rows are kept as stored.

Export (:func:`save`) writes the inference layout SAELens's ``SAE.load_from_disk`` reads;
saeengine's "mean_norm" statistics are folded into the weights (b_dec' = mu + s b_dec,
W_enc' = W_enc / s, W_dec' = s W_dec), BatchTopK becomes SAELens's JumpReLU with its
threshold on every latent (as SAELens does), Matryoshka its inner selection.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._atomic import atomic_write
from ..errors import CheckpointError
from . import _common

NAME = "saelens"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
SUPPORTED = ("standard", "topk", "jumprelu", "gated", "batchtopk", "matryoshka_batchtopk")
_NOT_EXPRESSIBLE = {
    "transcoder": "it maps one activation to another (a transcoder), not an autoencoder of its input",
    "skip_transcoder": "it adds a skip connection x @ W_skip to the decoder output",
    "jumprelu_transcoder": "it maps one activation to another (a transcoder)",
    "jumprelu_skip_transcoder": "it adds a skip connection x @ W_skip to the decoder output",
    "abstopk": "its top-k by |pre-activation| keeps negative activations",
    "matching_pursuit": "its encoder is iterative matching pursuit",
    "temporal": "its encoder attends over previous tokens",
}


def detect(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _architecture(cfg_path: Path, cfg: dict) -> str:
    arch = _common.field(cfg_path, cfg, "architecture", str, default="standard")  # pre-v5 files: "standard"
    if arch in SUPPORTED:
        return arch
    why = _NOT_EXPRESSIBLE.get(arch, "saeengine does not know it")
    raise CheckpointError(f"{cfg_path}: field 'architecture' is {arch!r}: not loadable into saeengine exactly "
                          f"({why}). Loadable SAELens architectures: {list(SUPPORTED)}")


def _normalization(path: Path, cfg_path: Path, cfg: dict) -> float | None:
    """None, or the input scale 1/s of "expected_average_only_in"."""
    mode = _common.field(cfg_path, cfg, "normalize_activations", str, default="none")
    if mode == "none":
        return None
    if mode == "expected_average_only_in":
        scaler = path / SCALER_FILE
        factor = _common.read_json(scaler).get("scaling_factor") if scaler.is_file() else None
        if factor is None:
            raise CheckpointError(f"{cfg_path}: field 'normalize_activations' is 'expected_average_only_in' but the "
                                  f"folder has no scaling factor ({scaler} missing or its scaling_factor null): "
                                  "SAELens applies it outside the SAE. Fold it with SAELens "
                                  "(sae.fold_activation_norm_scaling_factor(s); sae.save_model(...)) or write "
                                  f'{{"scaling_factor": s}} to {scaler.name}')
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
            raise CheckpointError(f"{scaler}: field 'scaling_factor' is {factor!r}; expected a positive number")
        return 1.0 / float(factor)
    if mode == "covariance_whitening":
        raise CheckpointError(f"{cfg_path}: field 'normalize_activations' is 'covariance_whitening': not folded by "
                              "saeengine. Fold it with SAELens (sae.fold_activation_whitening(...)) and save again")
    raise CheckpointError(f"{cfg_path}: field 'normalize_activations' is {mode!r}: it normalizes each token by its "
                          "own statistics, which saeengine's one affine normalization cannot express; not loaded")


def _k(cfg_path: Path, cfg: dict, arch: str) -> int:
    k = _common.field(cfg_path, cfg, "k", (int, float))
    if float(k) != int(k) or k < 1:
        raise CheckpointError(f"{cfg_path}: field 'k' is {k!r}; saeengine's {arch} needs an integer k >= 1. For a "
                              "BatchTopK SAE, save SAELens's inference model (save_inference_model: a JumpReLU "
                              "SAE) and load that")
    return int(k)


def load(path: Path, *, hookpoint: str | None = None, device="cpu"):
    """The SAELens SAE in folder ``path`` as a saeengine SAE (see the module docstring)."""
    path = Path(path)
    if hookpoint is not None:
        raise CheckpointError(f"{path}: a SAELens folder holds one SAE; drop hookpoint={hookpoint!r}")
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    cfg = _common.read_json(cfg_path)
    arch = _architecture(cfg_path, cfg)
    d, F = (_common.field(cfg_path, cfg, name, int) for name in ("d_in", "d_sae"))
    scale = _normalization(path, cfg_path, cfg)
    shapes = {"W_enc": (d, F), "W_dec": (F, d), "b_dec": (d,)}
    shapes.update({"b_gate": (F,), "b_mag": (F,), "r_mag": (F,)} if arch == "gated" else {"b_enc": (F,)})
    t = {name: v.float() for name, v in _common.read_safetensors(weights_path, shapes).items()}
    W_enc = t["W_enc"].T.contiguous()  # [F, d]
    W_dec, b_dec = t["W_dec"], t["b_dec"]
    threshold, k, arch_out, extra = None, None, arch, {}
    if arch == "gated":
        gain = t["r_mag"].exp()
        W_enc = W_enc * gain[:, None]
        b_enc = t["b_mag"]
        threshold = t["b_mag"] - gain * t["b_gate"]
        arch_out = "jumprelu"
    else:
        b_enc = t["b_enc"]
    if not _common.field(cfg_path, cfg, "apply_b_dec_to_input", bool, default=True):
        b_enc = b_enc + t["b_dec"] @ t["W_enc"]  # the encoder reads x, not x - b_dec
    if arch == "standard":
        arch_out = "relu"
    elif arch == "jumprelu":
        if "threshold" in t:
            threshold = _common.check_shape(weights_path, "threshold", t["threshold"], (F,))
        elif "log_threshold" in t:
            threshold = _common.check_shape(weights_path, "log_threshold", t["log_threshold"], (F,)).exp()
        else:
            raise CheckpointError(f"{weights_path}: a jumprelu SAE needs tensor 'threshold' [{F}]; it holds "
                                  f"{sorted(t)}")
    elif arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        k = _k(cfg_path, cfg, arch)
        training_only = arch != "topk"  # the training configs default to rescaling
        if _common.field(cfg_path, cfg, "rescale_acts_by_decoder_norm", bool, default=training_only):
            norms = W_dec.norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
        if arch != "topk":
            if "topk_threshold" not in t:
                raise CheckpointError(f"{weights_path}: a {arch} SAE needs tensor 'topk_threshold'; it holds "
                                      f"{sorted(t)}")
            threshold = float(t["topk_threshold"].reshape(()))
            arch_out = "batchtopk"
        if arch == "matryoshka_batchtopk":
            widths = _common.field(cfg_path, cfg, "matryoshka_widths", list)
            if not widths or widths[-1] != F:
                widths = [*widths, F]
            arch_out, extra = "matryoshka", {"matryoshka_inner": "batchtopk", "matryoshka_prefixes": tuple(widths)}
    provenance = {"format": NAME, "file": str(weights_path), "architecture": arch,
                  "peer_config": json.loads(json.dumps(cfg, default=str))}
    return _common.build_sae(arch_out, W_enc, b_enc, W_dec, b_dec, k=k, threshold=threshold,
                             norm_mean=None if scale is None else torch.zeros(d), norm_scale=scale,
                             provenance=provenance, source=weights_path, config=extra, device=device)


# ----- export ----------------------------------------------------------------------------------
def folded_weights(sae) -> dict[str, torch.Tensor]:
    """saeengine's weights with its normalization folded in (no normalization left):
    W_enc [F, d], b_enc [F], W_dec [F, d], b_dec [d] for an encoder reading x - b_dec."""
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().float().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if sae.cfg.normalization != "none":
        mean, scale = sae.norm_mean.detach().float().cpu(), float(sae.norm_scale)
        W_enc, W_dec, b_dec = W_enc / scale, W_dec * scale, mean + scale * b_dec
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}


def _selection(sae) -> str:
    cfg = sae.cfg
    return cfg.matryoshka_inner if cfg.architecture == "matryoshka" else cfg.architecture


def save(sae, directory: Path) -> Path:
    """Write ``sae`` as a SAELens inference folder (cfg.json + sae_weights.safetensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    arch = _selection(sae)
    w = folded_weights(sae)
    F, d = w["W_enc"].shape
    tensors = {"W_enc": w["W_enc"].T.contiguous(), "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    extra: dict = {}
    if arch == "relu":
        name = "standard"
    elif arch == "topk":
        name, extra = "topk", {"k": int(sae.cfg.k), "rescale_acts_by_decoder_norm": False}
    elif arch == "jumprelu":
        name = "jumprelu"
        tensors["threshold"] = sae.log_threshold.detach().float().cpu().exp()
    elif arch == "batchtopk":
        value = float(sae.threshold)
        if value != value:
            raise CheckpointError(f"cannot export to SAELens ({directory}): this BatchTopK SAE's inference "
                                  "threshold is not set (NaN: it never trained); SAELens stores BatchTopK as a "
                                  "JumpReLU with that threshold. Train it, or set sae.threshold")
        name = "jumprelu"
        tensors["threshold"] = torch.full((F,), value)
    else:
        raise CheckpointError(f"cannot export a {sae.cfg.architecture!r} SAE to SAELens")
    cfg = {"architecture": name, "d_in": int(d), "d_sae": int(F), "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"exported_by": "saeengine", "saeengine_architecture": sae.cfg.architecture,
                        **{key: value for key, value in sae.cfg.metadata.items() if isinstance(value, str)}},
           **extra}
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: is a file; the SAELens export writes a folder")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / CFG_FILE, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return directory
