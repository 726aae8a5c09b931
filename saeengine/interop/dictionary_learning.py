"""dictionary_learning (Marks, Karvonen et al.; PyPI ``dictionary-learning``): a trainer's
folder, ``ae.pt`` (``torch.save`` of the dictionary's state dict) + ``config.json``
(``{"trainer": trainer.config, "buffer": ...}``; ``trainer.dict_class`` names the class).

Conversions mirror the peer's own loader, ``dictionary_learning.utils.load_dictionary``
(dict_class -> ``<class>.from_pretrained(ae.pt)``), and the encode/decode of each class:

- ``AutoEncoder`` (StandardTrainer, StandardTrainerAprilUpdate, PAnnealTrainer) -> "relu":
  f = relu(W_enc (x - bias) + b_enc), x_hat = W_dec^T f + bias. Its ``from_pretrained``
  normalizes the decoder columns and multiplies the encoder rows and bias by their norms
  (unless all norms are already 1 within ``torch.allclose``); the same arithmetic is done
  here, so the codes are the ones the peer's loaded dictionary gives.
- ``AutoEncoderTopK`` -> "topk" with its ``k`` buffer: the default ``encode`` keeps the k
  largest relu pre-activations (``use_threshold=False``); the stored inference threshold
  is not used by that encode and goes to the provenance.
- ``BatchTopKSAE`` -> "batchtopk" with the stored scalar ``threshold``: its default
  ``encode`` (``use_threshold=True``) is relu(pre) kept where > threshold, which is
  saeengine's BatchTopK inference (a threshold of -1, never set, keeps every relu latent,
  in both).
- ``MatryoshkaBatchTopKSAE`` -> "matryoshka" (inner "batchtopk", prefixes = the ends of
  its ``group_sizes``), same threshold and encode (all groups active, as
  ``from_pretrained`` leaves them).
- ``GatedAutoEncoder`` -> "jumprelu", exactly in arithmetic: the gate W x' + b_gate > 0
  (x' = x - decoder_bias) fires where the magnitude pre-activation m = exp(r_mag) W x' +
  b_mag exceeds theta = b_mag - exp(r_mag) b_gate, and the code is relu(m) there: W_enc =
  exp(r_mag) W, b_enc = b_mag, threshold max(theta, 0). Rounding differs from the peer's
  (exp(r_mag) multiplies W, not W x'), so a pre-activation within float32 rounding of its
  gate could switch.
- ``JumpReluAutoEncoder`` -> "jumprelu": f = pre where pre > threshold, pre = x W_enc +
  b_enc; ``from_pretrained`` leaves ``apply_b_dec_to_input`` False, so b_dec is not
  subtracted; saeengine subtracts it, so b_enc + b_dec W_enc is stored as b_enc (equal up
  to fp32 rounding). The peer's relu(pre * (pre > t)) fires a latent with t <= 0 wherever
  pre > 0: a ReLU latent (build_sae keeps it with the smallest float32 threshold).

Refused, naming config.json's ``trainer.dict_class``: ``AutoEncoderNew`` (no trainer of
the released package writes it, so there is no fixture to check a conversion against) and
any other class. ``ae.pt`` files from ``normalize_activations=True`` runs need nothing more:
the trainer scales the biases by the norm factor before saving, so they read raw
activations.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ._common import build_sae, read_json, safe_torch_load, take

NAME = "dictionary_learning"
WEIGHTS = "ae.pt"
CONFIG = "config.json"
SUPPORTED = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder",
             "GatedAutoEncoder")


def _files(path: Path) -> tuple[Path, Path]:
    """(ae.pt, config.json) of a trainer folder, or of an ``ae.pt`` / ``checkpoints/ae_<step>.pt``."""
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS, path / CONFIG
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path, folder / CONFIG


def _trainer_config(config: Path) -> dict | None:
    try:
        data = read_json(config)
    except CheckpointError:
        return None
    trainer = data.get("trainer")
    return trainer if isinstance(trainer, dict) and ("dict_class" in trainer or "trainer_class" in trainer) else None


def detect(path: Path) -> bool:
    """A trainer folder (or its weights file) whose config.json has a ``trainer`` object
    naming ``dict_class`` / ``trainer_class``. Reads config.json only."""
    weights, config = _files(path)
    try:
        return weights.is_file() and config.is_file() and _trainer_config(config) is not None
    except OSError:
        return False


def _int(config: Path, trainer: dict, name: str) -> int:
    value = trainer.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{config}: field 'trainer.{name}' is {value!r}; expected a positive int")
    return value


def _k(weights: Path, config: Path, trainer: dict, tensors: dict) -> int:
    """k from the state dict's ``k`` buffer, which must agree with config.json's ``trainer.k``
    (the peer's from_pretrained raises on a disagreement too)."""
    stored = int(take(weights, tensors, "k", ()).item())
    if "k" in trainer and trainer["k"] != stored:
        raise CheckpointError(f"{config}: field 'trainer.k' = {trainer['k']!r} but {weights.name}'s 'k' buffer is "
                              f"{stored}; the config and the weights come from different runs")
    if stored < 1:
        raise CheckpointError(f"{weights}: its 'k' buffer is {stored}; expected a positive int")
    return stored


def _scalar_threshold(weights: Path, tensors: dict) -> float:
    """The inference threshold buffer (a scalar; -1 when the trainer never set it)."""
    value = float(take(weights, tensors, "threshold", ()).float())
    if value != value or value in (float("inf"), float("-inf")):
        raise CheckpointError(f"{weights}: tensor 'threshold' is {value}; expected a finite number (the peer's "
                              "encode would keep nothing at NaN)")
    return value


def _only(weights: Path, tensors: dict, names: set, dict_class: str) -> None:
    """Refuse state dicts with other tensors than the class has (another class's file)."""
    extra, missing = sorted(set(tensors) - names), sorted(names - set(tensors))
    if extra or missing:
        raise CheckpointError(f"{weights}: a {dict_class} state dict holds {sorted(names)}; this one lacks {missing} "
                              f"and has extra {extra}: the weights are not of config.json's dict_class (files of two "
                              "runs mixed up?)")


def _from_pretrained_normalized(W_enc, b_enc, W_dec_DF):
    """AutoEncoder.from_pretrained's normalize_decoder(): the decoder's columns [d, F] to
    unit norm, the encoder's rows and bias times the norms; skipped when the norms are
    already 1 (torch.allclose). Same ops, same order, float32 -> the same bits."""
    norms = torch.norm(W_dec_DF, dim=0)
    if torch.allclose(norms, torch.ones_like(norms)):
        return W_enc, b_enc, W_dec_DF, False
    return W_enc * norms[:, None], b_enc * norms, W_dec_DF / norms, True


def load(path: Path, *, hookpoint: str | None = None, device="cpu"):
    """The dictionary_learning SAE in ``path`` (a trainer folder, or its ``ae.pt``)."""
    weights, config = _files(path)
    if hookpoint is not None:
        raise CheckpointError(f"{weights.parent}: a dictionary_learning trainer folder holds one SAE; drop "
                              f"hookpoint={hookpoint!r} (pass the trainer_<i> folder itself)")
    data = read_json(config)
    trainer = data.get("trainer")
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{config}: field 'trainer' is missing or not an object; not a dictionary_learning "
                              "trainer config (it writes {\"trainer\": trainer.config, ...})")
    dict_class = trainer.get("dict_class")
    if dict_class not in SUPPORTED:
        raise CheckpointError(f"{config}: field 'trainer.dict_class' = {dict_class!r} (trainer_class "
                              f"{trainer.get('trainer_class')!r}) is not a dictionary class saeengine converts; it "
                              f"reads {list(SUPPORTED)}")
    d, F = _int(config, trainer, "activation_dim"), _int(config, trainer, "dict_size")
    tensors = safe_torch_load(weights)
    provenance = {"format": NAME, "file": str(weights), "config": str(config),
                  "peer": {"library": "dictionary_learning", "dict_class": dict_class,
                           "trainer_class": trainer.get("trainer_class"), "trainer": dict(trainer)}}
    kwargs: dict = {}
    if dict_class == "AutoEncoder":
        _only(weights, tensors, {"bias", "encoder.weight", "encoder.bias", "decoder.weight"}, dict_class)
        W_enc, b_enc, W_dec_DF, normalized = _from_pretrained_normalized(
            take(weights, tensors, "encoder.weight", (F, d)).float(), take(weights, tensors, "encoder.bias", (F,)).float(),
            take(weights, tensors, "decoder.weight", (d, F)).float())
        arch, W_dec, b_dec = "relu", W_dec_DF.T, take(weights, tensors, "bias", (d,))
        provenance["peer"]["decoder_normalized_on_load"] = normalized
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        _only(weights, tensors, {"k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"},
              dict_class)
        W_enc, b_enc = take(weights, tensors, "encoder.weight", (F, d)), take(weights, tensors, "encoder.bias", (F,))
        W_dec, b_dec = take(weights, tensors, "decoder.weight", (d, F)).T, take(weights, tensors, "b_dec", (d,))
        threshold = _scalar_threshold(weights, tensors)
        kwargs["k"] = _k(weights, config, trainer, tensors)
        if dict_class == "BatchTopKSAE":
            arch, kwargs["threshold"] = "batchtopk", threshold
        else:  # the default encode is the top k; the threshold only serves encode(use_threshold=True)
            arch = "topk"
            provenance["peer"]["unused_threshold"] = threshold
    elif dict_class == "MatryoshkaBatchTopKSAE":
        _only(weights, tensors, {"k", "threshold", "group_sizes", "W_enc", "b_enc", "W_dec", "b_dec"}, dict_class)
        W_enc, b_enc = take(weights, tensors, "W_enc", (d, F)).T, take(weights, tensors, "b_enc", (F,))
        W_dec, b_dec = take(weights, tensors, "W_dec", (F, d)), take(weights, tensors, "b_dec", (d,))
        groups = [int(g) for g in take(weights, tensors, "group_sizes", (None,)).tolist()]
        if sum(groups) != F or min(groups, default=0) < 1:
            raise CheckpointError(f"{weights}: 'group_sizes' {groups} must be positive and sum to dict_size={F}")
        arch, kwargs["k"] = "matryoshka", _k(weights, config, trainer, tensors)
        kwargs["threshold"] = _scalar_threshold(weights, tensors)
        prefixes = [sum(groups[:i + 1]) for i in range(len(groups))]  # the groups' ends, the last = dict_size
        kwargs["config"] = {"matryoshka_inner": "batchtopk", "matryoshka_prefixes": tuple(prefixes)}
    elif dict_class == "GatedAutoEncoder":
        _only(weights, tensors, {"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight"},
              dict_class)
        W, b_dec = take(weights, tensors, "encoder.weight", (F, d)).float(), take(weights, tensors, "decoder_bias", (d,))
        gain = take(weights, tensors, "r_mag", (F,)).float().exp()
        b_mag, b_gate = take(weights, tensors, "mag_bias", (F,)).float(), take(weights, tensors, "gate_bias", (F,)).float()
        # gate: W x' + b_gate > 0  <=>  m = gain W x' + b_mag > b_mag - gain b_gate (gain > 0), and
        # f = relu(m) there: a JumpReLU on m with threshold max(theta, 0) (theta <= 0: a ReLU latent)
        W_enc, b_enc, arch = W * gain[:, None], b_mag, "jumprelu"
        kwargs["threshold"] = b_mag - gain * b_gate
        W_dec = take(weights, tensors, "decoder.weight", (d, F)).T
    else:  # JumpReluAutoEncoder
        _only(weights, tensors, {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, dict_class)
        W_enc_DF = take(weights, tensors, "W_enc", (d, F)).float()
        W_dec, b_dec = take(weights, tensors, "W_dec", (F, d)), take(weights, tensors, "b_dec", (d,)).float()
        # from_pretrained: apply_b_dec_to_input = False, pre = x W_enc + b_enc; saeengine computes
        # (x - b_dec) W_enc + b_enc', so b_enc' = b_enc + b_dec W_enc.
        W_enc = W_enc_DF.T
        b_enc = take(weights, tensors, "b_enc", (F,)).float() + (b_dec.double() @ W_enc_DF.double()).float()
        arch, kwargs["threshold"] = "jumprelu", take(weights, tensors, "threshold", (F,))
        provenance["peer"]["b_dec_folded_into_b_enc"] = True
    return build_sae(arch, W_enc, b_enc, W_dec, b_dec, provenance=provenance, source=weights, device=device,
                     **kwargs)

