"""Linear probes: a linear classifier on frozen features (an image's pooled embedding, or
one row per patch), trained in torch, saved like an SAE (safetensors + JSON, checksummed).

A probe computes ``logits = W @ ((x - mean) / std) + b`` for features x [N, d_in]; the
per-feature mean and std are stored with it (identity when ``standardize=False``).

Training (:func:`fit_probe`) minimizes the mean cross-entropy over the rows:
- ``batch_size=None``: full batch, L-BFGS (strong-Wolfe line search) for ``epochs``
  iterations, loss + ``weight_decay / 2 * ||W||^2`` (the bias is not penalized);
- ``batch_size=B``: minibatch AdamW for ``epochs`` passes over shuffled rows (decoupled
  weight decay ``weight_decay``, the saev classification probe's recipe).
Weights start at zero and the shuffling comes from ``seed``, so a fit is deterministic on
one device.

On disk (:meth:`LinearProbe.save`), a folder with
- ``probe.safetensors``: weight [C, d_in], bias [C], feature_mean [d_in], feature_std
  [d_in], float32; its header metadata holds {"format": "saeengine.probe", "probe_id"};
- ``probe.json``: {"format", "version", "probe_id", "d_in", "n_classes", "class_names"
  (list or null), "standardize", "training" (the fit's settings and final loss),
  "tensors" ({name: {shape, dtype}}), "weights" ({file, bytes, sha256})}.
Both files are written atomically, the weights first. :meth:`LinearProbe.load` checks the
fields, the size and SHA-256 of the weights, the pairing (probe_id), the tensor names,
shapes, dtypes and finiteness; every failure is a CheckpointError naming the file and
the field. Nothing is unpickled.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._atomic import atomic_write
from .._hashing import hash_files
from ..errors import CheckpointError, DataMismatchError, InputError, NonFiniteError
from ._args import is_int

FORMAT = "saeengine.probe"
VERSION = 1
WEIGHTS_FILE = "probe.safetensors"
CONFIG_FILE = "probe.json"
_FIELDS = {"format": str, "version": int, "probe_id": str, "d_in": int, "n_classes": int,
           "class_names": (list, type(None)), "standardize": bool, "training": dict, "tensors": dict, "weights": dict}


# ----- input checks (shared with sparse_probing) ------------------------------------------
def as_features(x, what: str = "features", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 2-D numeric tensor (or array) [N, d] with finite values -> a ``dtype`` tensor."""
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise InputError(f"{what} must be a 2-D [N, d] array, got shape {list(x.shape)}; flatten per-patch "
                         "rows [n_img, T, d] with reshape(-1, d) (fit_patch_probe does it for probes)")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8, torch.bool)):
        raise InputError(f"{what} must hold numbers, got dtype {x.dtype}")
    x = x.to(dtype)
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{what} hold {bad} NaN or inf values of {x.numel()}; clean the features first")
    return x


def as_labels(y, n: int, n_classes: int | None, what: str = "labels") -> tuple[torch.Tensor, int]:
    """Integer class labels [n] in 0..n_classes-1 -> (int64 tensor, n_classes)."""
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"{what} must be a 1-D array of {n} class ids (one per feature row), got shape "
                         f"{list(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise InputError(f"{what} must be integer class ids (int64), got dtype {y.dtype}")
    y = y.long()
    if n == 0:
        raise InputError(f"{what}: no rows to train on; pass at least one labelled feature row")
    if n_classes is None:
        n_classes = int(y.max()) + 1
    if not is_int(n_classes) or n_classes < 1:
        raise InputError(f"n_classes must be an integer >= 1, got {n_classes!r}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise InputError(f"{what} must lie in 0..{n_classes - 1} (n_classes={n_classes}); found "
                         f"{lo if lo < 0 else hi}. "
                         "Pass n_classes, or drop rows with ignore labels (fit_patch_probe's ignore_index)")
    return y, n_classes


def default_device(device=None) -> torch.device:
    """The given device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----- the probe --------------------------------------------------------------------------
class LinearProbe(nn.Module):
    """logits [N, C] = linear((x - feature_mean) / feature_std) for features x [N, d_in].

    Args:
        d_in: feature width; n_classes: C.
        class_names: optional C names (saved in probe.json).
        standardize: apply the stored mean/std (set by :func:`fit_probe` from the training
            rows); when False they stay 0 and 1.
    """

    def __init__(self, d_in: int, n_classes: int, *, class_names: Sequence[str] | None = None,
                 standardize: bool = True):
        super().__init__()
        for name, value in (("d_in", d_in), ("n_classes", n_classes)):
            if not is_int(value) or value < 1:
                raise InputError(f"LinearProbe: {name} must be an integer >= 1, got {value!r}")
        if class_names is not None and len(class_names) != n_classes:
            raise InputError(f"LinearProbe: {len(class_names)} class_names given for n_classes={n_classes}; "
                             "give one name per class or none")
        self.d_in, self.n_classes = d_in, n_classes
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.standardize = bool(standardize)
        self.linear = nn.Linear(d_in, n_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("feature_mean", torch.zeros(d_in))
        self.register_buffer("feature_std", torch.ones(d_in))
        self.training_settings: dict = {}

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            raise InputError(f"a probe takes features [N, d_in={self.d_in}], got shape {list(x.shape)}")
        if x.shape[1] != self.d_in:
            raise DataMismatchError(f"a probe for d_in={self.d_in} given features of d_in={x.shape[1]}; use the "
                                    "features of the layer (and pooling) the probe was trained on, or train a "
                                    "new probe")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d_in] -> logits [N, n_classes] (float32, on the probe's device)."""
        x = self._check(x).to(self.linear.weight.device, torch.float32)
        return self.linear((x - self.feature_mean) / self.feature_std)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        """x [N, d_in] -> predicted class ids [N] int64 (on the probe's device)."""
        x = self._check(torch.as_tensor(x))
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.linear.weight.device)
        return torch.cat([self(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])

    # ----- saving ------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.linear.weight.detach(), "bias": self.linear.bias.detach(),
                "feature_mean": self.feature_mean, "feature_std": self.feature_std}

    def save(self, directory: str | Path) -> Path:
        """Write probe.safetensors and probe.json into ``directory`` (created), atomically."""
        directory = Path(directory)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self._tensors().items()}
        bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteError(f"refusing to save a probe with NaN or inf in {bad} to {directory}; its training "
                                 "diverged (lower lr, or standardize the features)")
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"{directory}: is a file; LinearProbe.save writes a folder ({CONFIG_FILE}, "
                                  f"{WEIGHTS_FILE})")
        probe_id = uuid.uuid4().hex
        config = {"format": FORMAT, "version": VERSION, "probe_id": probe_id, "d_in": self.d_in,
                  "n_classes": self.n_classes, "class_names": self.class_names, "standardize": self.standardize,
                  "training": dict(self.training_settings),
                  "tensors": {k: {"shape": list(v.shape), "dtype": "float32"} for k, v in tensors.items()},
                  "weights": {"file": WEIGHTS_FILE, "bytes": 0, "sha256": ""}}
        try:
            json.dumps(config)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"cannot save the probe to {directory}: its training settings are not "
                                  f"JSON-serializable ({err})") from None
        directory.mkdir(parents=True, exist_ok=True)

        def write_weights(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "probe_id": probe_id})
            config["weights"].update(bytes=tmp.stat().st_size, sha256=hash_files(tmp))
            # probe.json goes into place only once the weights are whole: a crash in between
            # leaves a pair whose probe_ids differ, which load reports.
            atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))

        atomic_write(directory / WEIGHTS_FILE, write_weights)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "LinearProbe":
        """Read a folder written by :meth:`save`, verified (see the module docstring)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        data = _read_config(config_path)
        tensors = _read_weights(weights_path, config_path, data)
        probe = cls(data["d_in"], data["n_classes"], class_names=data["class_names"], standardize=data["standardize"])
        expected = {k: list(v.shape) for k, v in probe._tensors().items()}
        if set(tensors) != set(expected):
            raise CheckpointError(f"{weights_path}: holds tensors {sorted(tensors)}; a probe holds {sorted(expected)}")
        for name, shape in expected.items():
            t = tensors[name]
            if list(t.shape) != shape or data["tensors"].get(name) != {"shape": shape, "dtype": "float32"}:
                raise CheckpointError(f"{weights_path}: field {name!r} has shape {list(t.shape)} (recorded "
                                      f"{data['tensors'].get(name)}); d_in={data['d_in']}, n_classes="
                                      f"{data['n_classes']} in {config_path} need {shape} float32")
            if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{weights_path}: field {name!r} is {t.dtype} or holds NaN/inf; expected finite "
                                      "float32: save the probe again")
        if not bool((tensors["feature_std"] > 0).all()):
            raise CheckpointError(f"{weights_path}: field 'feature_std' holds values <= 0; save the probe again")
        with torch.no_grad():
            probe.linear.weight.copy_(tensors["weight"])
            probe.linear.bias.copy_(tensors["bias"])
            probe.feature_mean.copy_(tensors["feature_mean"])
            probe.feature_std.copy_(tensors["feature_std"])
        probe.training_settings = data["training"]
        return probe.to(device).eval()


def _read_config(path: Path) -> dict:
    from ..checkpoint_checks import read_json_object

    data = read_json_object(path, f"a probe folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {data.get('format')!r}; expected {FORMAT!r} (not a "
                              "saeengine probe)")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path}: field 'version' is {data.get('version')!r}; this saeengine reads probe "
                              f"version {VERSION}: upgrade saeengine or save the probe again")
    for field, kind in _FIELDS.items():
        if field not in data:
            raise CheckpointError(f"{path}: field {field!r} is missing; save the probe again")
        value = data[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{path}: field {field!r} is {value!r:.60}; expected "
                                  f"{getattr(kind, '__name__', 'list or null')}. The file was edited: save the "
                                  "probe again")
    for field in ("d_in", "n_classes"):
        if data[field] < 1:
            raise CheckpointError(f"{path}: field {field!r} is {data[field]}; expected an integer >= 1")
    names = data["class_names"]
    if names is not None and (len(names) != data["n_classes"] or not all(isinstance(c, str) for c in names)):
        raise CheckpointError(f"{path}: field 'class_names' must be null or {data['n_classes']} strings")
    w = data["weights"]
    if not (set(w) == {"file", "bytes", "sha256"} and w["file"] == WEIGHTS_FILE and isinstance(w["bytes"], int)
            and isinstance(w["sha256"], str) and len(w["sha256"]) == 64):
        raise CheckpointError(f"{path}: field 'weights' is {w!r:.80}; expected "
                              f'{{"file": "{WEIGHTS_FILE}", "bytes": int, "sha256": 64 hex digits}}')
    return data


def _read_weights(path: Path, config_path: Path, data: dict) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a probe folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    size = path.stat().st_size
    if size != data["weights"]["bytes"]:
        raise CheckpointError(f"{path}: truncated or replaced: it has {size} bytes but {config_path} field "
                              f"'weights.bytes' records {data['weights']['bytes']}; save the probe again")
    actual = hash_files(path)
    if actual != data["weights"]["sha256"]:
        raise CheckpointError(f"{path}: corrupted: checksum mismatch (sha256 {actual[:16]}..., {config_path} field "
                              f"'weights.sha256' records {data['weights']['sha256'][:16]}...); save the probe again")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the file is truncated or corrupted") from err
    if header.get("format") != FORMAT or header.get("probe_id") != data["probe_id"]:
        raise CheckpointError(f"{path} and {config_path} come from different saves (field 'probe_id' "
                              f"{header.get('probe_id')!r} vs {data['probe_id']!r}); save the probe again")
    return tensors


# ----- training -----------------------------------------------------------------------------
def fit_probe(features, labels, *, n_classes: int | None = None, epochs: int = 100, lr: float | None = None,
              weight_decay: float = 1e-4, batch_size: int | None = None, standardize: bool = True,
              class_names: Sequence[str] | None = None, device=None, seed: int = 0,
              progress: bool = False) -> LinearProbe:
    """Train a linear probe on features [N, d] (float) with labels [N] (int64 in
    0..n_classes-1; n_classes defaults to max(labels) + 1).

    batch_size None: full-batch L-BFGS, ``epochs`` iterations, lr default 1.0, loss + wd/2
    ||W||^2. An int: minibatch AdamW, ``epochs`` passes, lr default 1e-3, decoupled weight
    decay. device: None = CUDA when present. Returns the probe (eval mode) on that device,
    with ``training_settings`` recording the settings and the final training loss.
    """
    x = as_features(features)
    y, n_classes = as_labels(labels, x.shape[0], n_classes)
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if value is not None and (not is_int(value) or value < low):
            raise InputError(f"fit_probe: {name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise InputError(f"fit_probe: weight_decay must be a number >= 0, got {weight_decay!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise InputError(f"fit_probe: lr must be a number > 0, got {lr!r}")
    dev = default_device(device)
    probe = LinearProbe(x.shape[1], n_classes, class_names=class_names, standardize=standardize).to(dev)
    x, y = x.to(dev), y.to(dev)
    if standardize:
        std = x.std(0, unbiased=False)
        probe.feature_mean.copy_(x.mean(0))
        probe.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant columns stay as they are
    params = list(probe.linear.parameters())
    if batch_size is None:
        lr = 1.0 if lr is None else float(lr)
        opt = torch.optim.LBFGS(params, lr=lr, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def objective():
            return F.cross_entropy(probe(x), y) + 0.5 * weight_decay * probe.linear.weight.square().sum()

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            final = float(objective())
    else:
        lr = 1e-3 if lr is None else float(lr)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        from tqdm.auto import trange
        final = float("nan")
        for _ in trange(epochs, disable=not progress, desc="probe"):
            order = torch.randperm(x.shape[0], generator=gen).to(dev)
            total = torch.zeros((), dtype=torch.float64, device=dev)  # on the device: no sync per step
            for start in range(0, x.shape[0], batch_size):
                rows = order[start:start + batch_size]
                opt.zero_grad()
                loss = F.cross_entropy(probe(x[rows]), y[rows])
                loss.backward()
                opt.step()
                total += loss.detach().double() * rows.numel()
            final = float(total) / x.shape[0]
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise NonFiniteError(f"fit_probe diverged (NaN/inf weights) with lr={lr}; lower lr or keep standardize=True")
    probe.training_settings = {"optimizer": "lbfgs" if batch_size is None else "adamw", "epochs": epochs, "lr": lr,
                               "weight_decay": float(weight_decay), "batch_size": batch_size, "seed": seed,
                               "n_rows": int(x.shape[0]), "final_loss": final}
    return probe.eval()


def fit_patch_probe(tokens, labels, *, ignore_index: int | None = None, **kwargs) -> LinearProbe:
    """A patch-level probe: tokens [n_img, T, d], labels [n_img, T] int64 -> :func:`fit_probe`
    on the n_img * T rows, without the rows labelled ``ignore_index``."""
    tokens, labels = torch.as_tensor(tokens), torch.as_tensor(labels)
    if tokens.ndim != 3 or labels.shape != tokens.shape[:2]:
        raise InputError(f"fit_patch_probe takes tokens [n_img, T, d] and labels [n_img, T]; got "
                         f"{list(tokens.shape)} and {list(labels.shape)}")
    x, y = tokens.reshape(-1, tokens.shape[2]), labels.reshape(-1)
    if ignore_index is not None:
        keep = y != ignore_index
        x, y = x[keep], y[keep]
    return fit_probe(x, y, **kwargs)


@torch.no_grad()
def accuracy(probe: LinearProbe, features, labels) -> float:
    """Share of rows of features [N, d_in] whose predicted class equals labels [N]."""
    x = torch.as_tensor(features)
    pred = probe.predict(x)
    y, _ = as_labels(labels, x.shape[0], probe.n_classes)
    return float((pred.cpu() == y).double().mean())
