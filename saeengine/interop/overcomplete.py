"""overcomplete (Fel et al.; PyPI ``overcomplete``): the state dict of a ``TopKSAE``,
``BatchTopKSAE`` or ``JumpSAE`` as its users save it, ``torch.save(sae.state_dict(), path)``.

Model (overcomplete 0.3.0, default ``encoder_module=None``, 1-D ``input_shape``):
pre = x W^T + b (``encoder.final_block.0``; an untied ``TieableEncoder``: ``encoder.weight``
/ ``encoder.bias``; a tied one (``sae.tied()``): W = the dictionary, saved again under
``encoder.tied_to.*``), codes = relu(pre), and no input bias;
x_hat = z D with D = normalize(``dictionary._weights``) * exp(``dictionary.multiplier``), the
"fused dictionary" that ``.eval()`` computes (normalize: "l2" by default,
w / (||w||_2 + 1e-8) per concept). saeengine's b_dec is 0, W_dec = D (rows not unit).

- TopKSAE -> "topk": the ``top_k`` largest codes per token.
- BatchTopKSAE -> "batchtopk" (eval mode): codes kept where codes >= running_threshold.
  saeengine keeps act > threshold, so the threshold stored is the float32 just below
  running_threshold (the same set of kept codes, bit for bit).
- JumpSAE -> "jumprelu": codes kept where codes >= exp(``thresholds``) (its thresholds are
  stored in log space, as saeengine's); saeengine keeps pre > exp(log_threshold), so the
  log threshold stored is the float32 below ``thresholds`` where its exp is the float32
  just below exp(thresholds) (the same codes, bit for bit), else ``thresholds`` itself
  (the codes differ only where a pre-activation equals its threshold exactly).

What the state dict does not hold: ``top_k`` and ``running_threshold`` are plain attributes
(not buffers), and neither the class nor the dictionary's normalization is recorded. So a
sidecar ``overcomplete.json`` [P, saeengine's convention] beside the weights gives them::

    {"sae_class": "TopKSAE" | "BatchTopKSAE" | "JumpSAE",
     "top_k": 8,                          # TopKSAE, BatchTopKSAE
     "running_threshold": 0.42,           # BatchTopKSAE: float(sae.running_threshold)
     "dictionary_normalization": "l2",    # optional: "l2" (the default), "max_l2", "l1", "max_l1", "identity"
     "weights": "sae.pt"}                 # optional: the state dict's file name in this folder

A JumpSAE state dict (it holds ``thresholds``) loads without the sidecar, with the default
"l2" normalization (recorded in the provenance). Refused, naming the key or field: other
encoders (MLP, batch-norm, attention, resnet: their keys), other classes (archetypal,
matching pursuit, ...), multi-dimensional ``input_shape``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ._common import build_sae, field, read_json, safe_torch_load, take

NAME = "overcomplete"
SIDECAR = "overcomplete.json"
CLASSES = ("TopKSAE", "BatchTopKSAE", "JumpSAE")
MARKER = b"dictionary._weights"  # the DictionaryLayer's parameter, in every SAE state dict of overcomplete
MAX_PICKLE_PEEK = 16 << 20  # data.pkl holds the key names and tensor stubs only: small


def _normalize(name: str):
    """overcomplete's DictionaryLayer normalizations, by name ([F, d] -> [F, d])."""
    def l2(w):
        return w / (torch.norm(w, p=2, dim=1, keepdim=True) + 1e-8)

    def max_l2(w):
        return w / torch.amax(torch.norm(w, p=2, dim=1, keepdim=True), dim=0, keepdim=True)

    def l1(w):
        return w / (torch.norm(w, p=1, dim=1, keepdim=True) + 1e-8)

    def max_l1(w):
        return w / torch.amax(torch.norm(w, p=1, dim=1, keepdim=True), dim=0, keepdim=True)

    return {"l2": l2, "max_l2": max_l2, "l1": l1, "max_l1": max_l1, "identity": lambda w: w}.get(name)


def _has_marker(file: Path) -> bool:
    """Whether a torch zip's pickle names overcomplete's dictionary parameter (read as bytes,
    never unpickled)."""
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                if info.filename.endswith("data.pkl") and info.file_size <= MAX_PICKLE_PEEK:
                    return MARKER in archive.read(info)
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return False


def _weights_file(folder: Path, sidecar: dict | None) -> Path:
    if sidecar is not None and "weights" in sidecar:
        name = field(folder / SIDECAR, sidecar, "weights", str)
        if Path(name).name != name:
            raise CheckpointError(f"{folder / SIDECAR}: field 'weights' = {name!r} must be a file name in this folder")
        return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".pth") and p.is_file())
    if len(found) != 1:
        raise CheckpointError(f"{folder}: expected one .pt/.pth state dict, found {[p.name for p in found]}; name "
                              f"it in {SIDECAR}'s 'weights' field")
    return found[0]


def _files(path: Path) -> tuple[Path, dict | None, Path]:
    """(the state dict file, the sidecar's content or None, the sidecar's path)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    sidecar_path = folder / SIDECAR
    sidecar = read_json(sidecar_path) if sidecar_path.is_file() else None
    weights = _weights_file(folder, sidecar) if path.is_dir() else path
    return weights, sidecar, sidecar_path


def detect(path: Path) -> bool:
    """A folder with ``overcomplete.json``, or a ``.pt`` state dict (or a folder with one)
    whose pickle names ``dictionary._weights``."""
    path = Path(path)
    try:
        if path.is_dir():
            if (path / SIDECAR).is_file():
                return True
            found = [p for p in path.iterdir() if p.suffix in (".pt", ".pth") and p.is_file()]
            return len(found) == 1 and _has_marker(found[0])
        return path.is_file() and _has_marker(path)
    except OSError:
        return False


def _encoder(weights: Path, tensors: dict, D: torch.Tensor):
    """(W_enc [F, d], b_enc [F], which encoder) from the state dict's encoder keys."""
    F, d = D.shape
    keys = {name for name in tensors if name.startswith("encoder.")}
    linear = {"encoder.final_block.0.weight", "encoder.final_block.0.bias"}
    if "encoder.final_block.0.weight" in keys:
        if keys != linear:
            raise CheckpointError(f"{weights}: encoder tensors {sorted(keys - linear)} besides the linear layer: an "
                                  "MLP/batch-norm/layer-norm encoder (encoder_module 'mlp_*' or custom); saeengine's "
                                  "encoder is one linear layer, so it cannot reproduce this SAE")
        return (take(weights, tensors, "encoder.final_block.0.weight", (F, d)),
                take(weights, tensors, "encoder.final_block.0.bias", (F,)), "linear")
    bias = take(weights, tensors, "encoder.bias", (F,)) if "encoder.bias" in keys else torch.zeros(F)
    if "encoder.weight" in keys:
        if keys - {"encoder.weight", "encoder.bias"}:
            raise CheckpointError(f"{weights}: unexpected encoder tensors {sorted(keys)}; saeengine reads the linear "
                                  "encoders of overcomplete (default, tied, untied)")
        return take(weights, tensors, "encoder.weight", (F, d)), bias, "untied"
    tied = {"encoder.tied_to._weights", "encoder.tied_to.multiplier"}
    if keys - {"encoder.bias"} == tied:
        # sae.tied(): the encoder holds the dictionary layer itself (its tensors saved twice)
        same = all(torch.equal(tensors[f"encoder.tied_to.{name}"], tensors[f"dictionary.{name}"])
                   for name in ("_weights", "multiplier"))
        if not same:
            raise CheckpointError(f"{weights}: 'encoder.tied_to.*' differ from 'dictionary.*', but a tied encoder "
                                  "is the dictionary itself; the file was edited or is corrupted")
        return D, bias, "tied"
    if keys - {"encoder.bias"}:
        raise CheckpointError(f"{weights}: encoder tensors {sorted(keys)} are not a linear encoder's (attention, "
                              "resnet or a custom encoder_module?); saeengine cannot reproduce it")
    raise CheckpointError(f"{weights}: no encoder weights (an IdentityEncoder, or a custom encoder without "
                          "parameters); saeengine's encoder is a linear layer, so it cannot reproduce it")


def load(path: Path, *, hookpoint: str | None = None, device="cpu"):
    """The overcomplete SAE in ``path`` (a folder with its state dict and overcomplete.json,
    or the state dict file)."""
    weights, sidecar, sidecar_path = _files(path)
    if hookpoint is not None:
        raise CheckpointError(f"{weights}: an overcomplete state dict holds one SAE; drop hookpoint={hookpoint!r}")
    tensors = safe_torch_load(weights)
    if MARKER.decode() not in tensors:
        raise CheckpointError(f"{weights}: tensor 'dictionary._weights' is missing (it holds {sorted(tensors)[:8]}); "
                              "not the state dict of an overcomplete SAE")
    W = take(weights, tensors, "dictionary._weights", (None, None)).float()
    F, d = W.shape
    if sidecar is not None:
        sae_class = field(sidecar_path, sidecar, "sae_class", str)
    elif "thresholds" in tensors:
        sae_class = "JumpSAE"
    else:
        raise CheckpointError(
            f"{weights}: a TopKSAE or BatchTopKSAE state dict holds neither the class, top_k nor running_threshold "
            f"(plain attributes in overcomplete); write {sidecar_path} beside it: {{\"sae_class\": \"TopKSAE\", "
            "\"top_k\": <k>}} or {\"sae_class\": \"BatchTopKSAE\", \"top_k\": <k>, \"running_threshold\": "
            "<float(sae.running_threshold)>}")
    if sae_class not in CLASSES:
        raise CheckpointError(f"{sidecar_path}: field 'sae_class' = {sae_class!r}; saeengine converts {list(CLASSES)} "
                              "(the other overcomplete SAEs encode by other algorithms: archetypal, matching pursuit)")
    norm_name = field(sidecar_path, sidecar, "dictionary_normalization", str, "l2") if sidecar else "l2"
    normalize = _normalize(norm_name)
    if normalize is None:
        raise CheckpointError(f"{sidecar_path}: field 'dictionary_normalization' = {norm_name!r}; overcomplete's "
                              "are 'l2', 'max_l2', 'l1', 'max_l1', 'identity' (a custom callable cannot be converted)")
    multiplier = take(weights, tensors, "dictionary.multiplier", ()).float()
    D = normalize(W) * torch.exp(multiplier)  # the fused dictionary of DictionaryLayer.eval()
    W_enc, b_enc, encoder = _encoder(weights, tensors, D)
    known = {"dictionary._weights", "dictionary.multiplier"} | {n for n in tensors if n.startswith("encoder.")}
    if sae_class == "JumpSAE":
        known.add("thresholds")
    extra = sorted(set(tensors) - known)
    if extra:
        raise CheckpointError(f"{weights}: tensors {extra} are not a {sae_class}'s (sae_class in {sidecar_path} "
                              "right?); saeengine refuses rather than ignore them")
    provenance = {"format": NAME, "file": str(weights), "peer": {"library": "overcomplete", "sae_class": sae_class,
                  "encoder": encoder, "dictionary_normalization": norm_name,
                  "sidecar": str(sidecar_path) if sidecar is not None else None}}
    kwargs: dict = {}
    if sae_class == "JumpSAE":
        arch = "jumprelu"
        log_t = take(weights, tensors, "thresholds", (F,)).float()
        if not bool(torch.isfinite(log_t).all()):
            raise CheckpointError(f"{weights}: tensor 'thresholds' holds NaN or inf; the SAE diverged or the file is "
                                  "corrupted")
        kwargs["threshold"] = torch.exp(log_t)
    else:
        top_k = field(sidecar_path, sidecar, "top_k", int)
        if top_k < 1:
            raise CheckpointError(f"{sidecar_path}: field 'top_k' = {top_k}; expected a positive int")
        if sae_class == "TopKSAE":
            if top_k > F:
                raise CheckpointError(f"{sidecar_path}: field 'top_k' = {top_k} > the {F} concepts of {weights.name}")
            arch, kwargs["k"] = "topk", top_k
        else:
            arch = "batchtopk"
            t = torch.tensor(float(field(sidecar_path, sidecar, "running_threshold", (int, float))), dtype=torch.float32)
            if not bool(torch.isfinite(t)):  # the peer's eval keeps nothing at NaN; saeengine would top-k
                raise CheckpointError(f"{sidecar_path}: field 'running_threshold' = {float(t)}; expected a finite "
                                      "number (float(sae.running_threshold) of the trained BatchTopKSAE)")
            kwargs["threshold"] = float(torch.nextafter(t, torch.tensor(-float("inf"))))
            # overcomplete's top_k counts over a whole batch; saeengine's k is per token and only
            # matters for training further (inference uses the threshold)
            kwargs["k"] = min(top_k, F)
            provenance["peer"]["top_k_per_batch"] = top_k
    sae = build_sae(arch, W_enc, b_enc, D, torch.zeros(d), provenance=provenance, source=weights, device=device,
                    **kwargs)
    if sae_class == "JumpSAE":
        with torch.no_grad():
            sae.log_threshold.copy_(_at_least_log(log_t))
    return sae


def _at_least_log(log_t: torch.Tensor) -> torch.Tensor:
    """The log_threshold [F] with which saeengine's ``pre > exp(log_threshold)`` keeps what
    JumpSAE's ``relu(pre) >= exp(thresholds)`` keeps (float32, this CPU's exp): a float32 a
    few steps below log_t whose exp is the float32 just below exp(log_t) (then the sets are
    equal), else log_t itself (then they differ only where pre equals the threshold)."""
    below = torch.nextafter(torch.exp(log_t), torch.zeros_like(log_t))
    best, down = log_t.clone(), log_t
    for _ in range(8):  # where exp is flatter than the log grid, a few steps down reach ``below``
        down = torch.nextafter(down, torch.full_like(down, -float("inf")))
        best = torch.where((torch.exp(down) == below) & (best == log_t), down, best)
    return best
