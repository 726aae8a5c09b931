"""One OOD-detection run over one kind of feature: every SAE score and dense baseline on the
in-distribution (ID) test set and on named OOD sets, their metrics, and the OOD
generalization probes (paper 1's task 1, spec [P] in docs/ood-run.md).

Features of one kind are either
- image-level, [n, d] (a pooled embedding or a CLS token): every score is per row; or
- token-level, [n, T, d] (a block's spatial map, T positions per image). The SAE scores
  are computed per token and an image's score is the **mean over its T tokens** of its
  token scores (our choice [P]: every token is an equal vote, and a mean keeps a
  per-image score on the token score's own scale). The SAE scorer is fitted on the ID
  training tokens (each token labelled with its image's class), at most ``max_fit_rows``
  of them, drawn at random (seeded) to bound the kNN reference set. The dense baselines
  and the dense probe see the image's mean token [n, d]; the SAE probe sees the image's
  mean code [n, F].

Scores (``saeengine.eval.ood_scores``; higher = more OOD): ``sae.<name>`` from
SAEScorer (reconstruction, max_latent, energy, knn, class_profile) and ``dense.<name>``
from DenseScorer (msp, energy, mahalanobis, knn). Metrics (``saeengine.eval.ood``):
AUROC, FPR@95TPR, AUPR-in, AUPR-out of (ID test scores, OOD set scores), per score and
OOD set.

Generalization: a linear probe (``probes.fit_probe``, full-batch L-BFGS) trained on the
ID training images' SAE codes and one on their dense features; the accuracy of each on
the ID test set and on every OOD set that has labels (a shifted set of the same
classes: rotated digits, another style), and the ratio shifted / ID.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import DataMismatchError, InputError
from ._args import count

FORMAT, VERSION = "saeengine-ood", 1
GROUPS = ("near", "far", "")


@dataclasses.dataclass
class OODSet:
    """One named OOD set.

    features: [n, d] (image-level) or [n, T, d] (token-level), the same kind and width d
        as the ID features (T may differ from the ID's).
    labels: [n] int class ids in the ID classes' numbering (0..C-1), or None. A labelled
        set also serves the generalization probes (a shifted test set).
    group: "near", "far" or "" (no group): the report averages the metrics per group.
    """

    features: Any
    labels: Any = None
    group: str = ""


def _as_features(name: str, x, d: int | None = None, level: str | None = None) -> torch.Tensor:
    """[n, d] or [n, T, d] finite float32 (CPU); InputError naming ``name`` otherwise."""
    try:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name}: cannot be read as an array ({err}); pass features [n, d] or [n, T, d]") from None
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise InputError(f"{name}: features must be numbers, got dtype {x.dtype}")
    if x.ndim not in (2, 3):
        raise InputError(f"{name}: features must be [n, d] (one row per image) or [n, T, d] (T tokens per image), "
                         f"got shape {list(x.shape)}")
    if x.shape[0] == 0 or x.shape[-1] == 0 or (x.ndim == 3 and x.shape[1] == 0):
        raise InputError(f"{name}: no features (shape {list(x.shape)}); pass at least one image")
    found = "image" if x.ndim == 2 else "token"
    if level is not None and found != level:
        want = "[n, d]" if level == "image" else "[n, T, d]"
        raise InputError(f"{name}: {found}-level features (shape {list(x.shape)}) but the ID features are "
                         f"{level}-level {want}; give every set the same kind of feature")
    if d is not None and x.shape[-1] != d:
        raise InputError(f"{name}: features of width {x.shape[-1]} (shape {list(x.shape)}), but the ID features "
                         f"have width {d}; take every set from the same layer (and pooling) as the ID set")
    x = x.detach().to("cpu", torch.float32)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise InputError(f"{name}: {int(bad.sum())} NaN or inf feature values of {x.numel()}; clean those images' "
                         "features first")
    return x


def _as_labels(name: str, y, n: int, n_classes: int | None = None) -> np.ndarray:
    """int64 [n] class ids (in 0..n_classes-1 when given)."""
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"{name}: labels must be 1-D with one class id per image ({n}), got shape {list(y.shape)}")
    if y.dtype.kind not in "iu":
        raise InputError(f"{name}: labels must be integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise InputError(f"{name}: labels must be >= 0 (class ids), found {int(y.min())}")
    if n_classes is not None and y.size and y.max() >= n_classes:
        raise InputError(f"{name}: label {int(y.max())} is not an ID class (the ID training set has classes "
                         f"0..{n_classes - 1}); a labelled OOD set must use the ID classes' ids, or pass labels=None")
    return y


def _ood_sets(ood_sets: Mapping, d: int, level: str) -> dict[str, OODSet]:
    """Name -> OODSet (features checked); values may be OODSet, features, or (features, labels)."""
    if not isinstance(ood_sets, Mapping) or not ood_sets:
        raise InputError("ood_sets must be a non-empty mapping name -> OODSet (or features, or (features, labels))")
    out = {}
    for name, value in ood_sets.items():
        if not isinstance(name, str) or not name or name == "id":
            raise InputError(f"OOD set name {name!r}: give each set a non-empty name other than 'id'")
        if not isinstance(value, OODSet):
            value = OODSet(*value) if isinstance(value, tuple) else OODSet(value)
        if value.group not in GROUPS:
            raise InputError(f"OOD set {name!r}: group {value.group!r} must be one of 'near', 'far' or ''")
        x = _as_features(f"OOD set {name!r}", value.features, d, level)
        y = None if value.labels is None else _as_labels(f"OOD set {name!r}", value.labels, x.shape[0])
        out[name] = OODSet(x, y, value.group)
    return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _per_image(scores: np.ndarray, x: torch.Tensor) -> np.ndarray:
    """Token scores [n*T] -> image scores [n] (the mean over each image's T tokens)."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores if x.ndim == 2 else scores.reshape(x.shape[0], x.shape[1]).mean(1)


@torch.no_grad()
def image_codes(sae, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Dense SAE codes per image: x [n, d] -> [n, F]; x [n, T, d] -> the mean over each
    image's T token codes [n, F] (float32, CPU). Chunked, so at most ``chunk`` token codes
    are dense at once."""
    from .batch import code_pairs

    device = next(sae.parameters()).device
    F_ = sae.cfg.d_sae
    per = 1 if x.ndim == 2 else x.shape[1]
    images = max(1, chunk // per)
    out = []
    for start in range(0, x.shape[0], images):
        part = _flat(x[start:start + images]).to(device)
        values, indices = code_pairs(sae.encode(part))
        dense = torch.zeros(part.shape[0], F_, device=device).scatter_add_(1, indices, values.float())
        out.append(dense.view(-1, per, F_).mean(1).cpu())
    return torch.cat(out)


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """The dense baselines' input: x itself [n, d], or each image's mean token [n, d]."""
    return x if x.ndim == 2 else x.mean(1)


def _best(metrics: dict, sets: list[str]) -> dict:
    """Per OOD set and metric, the score names with the best value (max AUROC / AUPR, min
    FPR95); ties keep every best name."""
    best = {}
    for s in sets:
        best[s] = {}
        for metric, better in (("auroc", max), ("fpr95", min), ("aupr_in", max), ("aupr_out", max)):
            values = {score: per[s][metric] for score, per in metrics.items()}
            top = better(values.values())
            best[s][metric] = [score for score, v in values.items() if v == top]
    return best


def _group_means(metrics: dict, sets: dict[str, OODSet]) -> dict:
    """score -> {group: {"auroc", "fpr95", "n_sets"}}: plain means over the group's sets."""
    out = {}
    for score, per in metrics.items():
        out[score] = {}
        for group in ("near", "far"):
            names = [n for n, s in sets.items() if s.group == group]
            if names:
                out[score][group] = {"auroc": float(np.mean([per[n]["auroc"] for n in names])),
                                     "fpr95": float(np.mean([per[n]["fpr95"] for n in names])),
                                     "n_sets": len(names)}
    return out


def _generalization(sae, train_x, train_y, test_x, test_y, sets: dict[str, OODSet], n_classes: int, *,
                    epochs: int, weight_decay: float, seed: int, chunk: int) -> dict:
    """Probe accuracy on SAE codes vs dense features, on the ID test set and each labelled
    OOD set (accuracy and accuracy / ID accuracy)."""
    from .probes import accuracy, fit_probe

    labelled = {n: s for n, s in sets.items() if s.labels is not None}
    views = {"sae_codes": lambda x: image_codes(sae, x, chunk), "dense": _pooled}
    probes = {}
    for view, features in views.items():
        train = features(train_x)
        probe = fit_probe(train, torch.from_numpy(train_y), n_classes=n_classes, epochs=epochs,
                          weight_decay=weight_decay, seed=seed)
        id_acc = accuracy(probe, features(test_x), torch.from_numpy(test_y))
        shifted = {}
        for name, s in labelled.items():
            acc = accuracy(probe, features(s.features), torch.from_numpy(s.labels))
            shifted[name] = {"accuracy": acc, "ratio": acc / id_acc if id_acc > 0 else None,
                             "n": int(s.labels.size)}
        probes[view] = {"d": int(train.shape[1]), "id_test": id_acc, "train": accuracy(probe, train,
                                                                                          torch.from_numpy(train_y)),
                        "sets": shifted}
    return {"sets": list(labelled), "probes": probes, "epochs": epochs, "weight_decay": weight_decay}


def run_ood(id_train, id_train_labels, id_test, id_test_labels, ood_sets: Mapping, sae, *, knn_k: int = 50,
            max_fit_rows: int = 20000, probe_epochs: int = 100, probe_weight_decay: float = 1e-3,
            generalization: bool = True, seed: int = 0, chunk: int = 4096, progress: bool = False) -> dict:
    """Score the ID test set and every OOD set with every SAE score and dense baseline.

    Args:
        id_train: ID training features [n, d] or [n, T, d] (fit the scorers and probes).
        id_train_labels: [n] int class ids 0..C-1, C >= 2 (the class-profile score, MSP
            and Mahalanobis need classes).
        id_test, id_test_labels: the ID test set [m, d] / [m, T, d] and its [m] labels.
        ood_sets: name -> :class:`OODSet` (or features, or (features, labels)).
        sae: a saeengine SAE of input width d (for token-level features: trained on tokens).
        knn_k: k of both kNN scores (clamped to the number of reference rows).
        max_fit_rows: at most this many ID training rows (tokens, for token-level
            features) fit the SAE scorer; drawn at random with ``seed`` when more.
        probe_epochs: L-BFGS iterations of the dense baseline's probe (MSP, energy) and
            of the generalization probes; probe_weight_decay: the generalization probes'.
        generalization: also fit the generalization probes.

    Returns a dict (JSON-able except "arrays"): {"level" ("image" | "token"), "tokens_per_image"
    ({"id_train", "id_test", set...}), "d_in", "d_sae", "n_classes", "n_id_train",
    "n_id_test", "sets" ({name: {"n", "group", "labelled"}}), "scores" (names),
    "metrics" ({score: {set: ood_metrics dict}}), "best" ({set: {metric: [score
    names]}}), "group_means" ({score: {"near"|"far": {"auroc", "fpr95", "n_sets"}}}),
    "id_score_means" ({score: mean over the ID test set}), "generalization" (None or
    {"sets", "probes": {"sae_codes"|"dense": {"d", "train", "id_test", "sets": {name:
    {"accuracy", "ratio", "n"}}}}, "epochs", "weight_decay"}), "settings", "seconds",
    "arrays" ({score: {"id": [m], set: [n_set]}} float64 per-image scores)}.
    """
    from tqdm.auto import tqdm

    from .ood import ood_metrics
    from .ood_scores import DenseScorer, SAEScorer

    start = time.perf_counter()
    knn_k, max_fit_rows, probe_epochs = (count("knn_k", knn_k), count("max_fit_rows", max_fit_rows),
                                         count("probe_epochs", probe_epochs))
    train_x = _as_features("ID train", id_train)
    level, d = ("image" if train_x.ndim == 2 else "token"), train_x.shape[-1]
    test_x = _as_features("ID test", id_test, d, level)
    train_y = _as_labels("ID train", id_train_labels, train_x.shape[0])
    classes = np.unique(train_y)
    if classes.size < 2:
        raise InputError(f"the ID training set has {classes.size} class ({classes.tolist()}); the class-profile "
                         "score, MSP and Mahalanobis need >= 2 classes: label the ID images with their classes "
                         "(for stores: one subfolder per class)")
    n_classes = int(train_y.max()) + 1
    test_y = _as_labels("ID test", id_test_labels, test_x.shape[0], n_classes)
    sets = _ood_sets(ood_sets, d, level)
    for name, s in sets.items():
        if s.labels is not None:
            _as_labels(f"OOD set {name!r}", s.labels, s.labels.size, n_classes)
    if getattr(sae, "cfg", None) is None or sae.cfg.d_in != d:
        raise DataMismatchError(f"the SAE takes inputs of width {getattr(getattr(sae, 'cfg', None), 'd_in', '?')} "
                                f"but the features have width {d}; use the SAE trained on this layer's features")

    # The SAE scorer's reference rows: every ID training row, or a seeded draw of them.
    fit_x = _flat(train_x)
    fit_y = np.repeat(train_y, 1 if level == "image" else train_x.shape[1])
    if fit_x.shape[0] > max_fit_rows:
        pick = np.sort(np.random.default_rng(seed).choice(fit_x.shape[0], max_fit_rows, replace=False))
        fit_x, fit_y = fit_x[pick], fit_y[pick]
    sae_k = min(knn_k, fit_x.shape[0])
    dense_k = min(knn_k, train_x.shape[0])
    steps = tqdm(total=3 + len(sets) + int(generalization), desc="ood", disable=not progress)
    sae_scorer = SAEScorer(sae, fit_x, fit_y, knn_k=sae_k, chunk=chunk)
    dense_scorer = DenseScorer(_pooled(train_x), train_y, knn_k=dense_k, probe_epochs=probe_epochs, seed=seed)
    steps.update()

    def score(x: torch.Tensor) -> dict[str, np.ndarray]:
        found = {f"sae.{k}": _per_image(v, x) for k, v in sae_scorer.scores(_flat(x)).items()}
        found.update({f"dense.{k}": np.asarray(v, dtype=np.float64)
                      for k, v in dense_scorer.scores(_pooled(x)).items()})
        return found

    arrays: dict[str, dict[str, np.ndarray]] = {}
    for name, value in score(test_x).items():
        arrays[name] = {"id": value}
    steps.update()
    for set_name, s in sets.items():
        for name, value in score(s.features).items():
            arrays[name][set_name] = value
        steps.update()
    metrics = {name: {s: ood_metrics(per["id"], per[s]) for s in sets} for name, per in arrays.items()}
    steps.update()
    general = None
    if generalization:
        general = _generalization(sae, train_x, train_y, test_x, test_y, sets, n_classes, epochs=probe_epochs,
                                  weight_decay=probe_weight_decay, seed=seed, chunk=chunk)
        steps.update()
    steps.close()

    def tokens(x: torch.Tensor) -> int:
        return 1 if x.ndim == 2 else int(x.shape[1])
    return {"level": level, "d_in": int(d), "d_sae": int(sae.cfg.d_sae), "n_classes": n_classes,
            "n_id_train": int(train_x.shape[0]), "n_id_test": int(test_x.shape[0]),
            "tokens_per_image": {"id_train": tokens(train_x), "id_test": tokens(test_x),
                                 **{n: tokens(s.features) for n, s in sets.items()}},
            "sets": {n: {"n": int(s.features.shape[0]), "group": s.group, "labelled": s.labels is not None}
                     for n, s in sets.items()},
            "scores": list(arrays), "metrics": metrics, "best": _best(metrics, list(sets)),
            "group_means": _group_means(metrics, sets),
            "id_score_means": {name: float(per["id"].mean()) for name, per in arrays.items()},
            "generalization": general,
            "settings": {"knn_k_sae": sae_k, "knn_k_dense": dense_k, "max_fit_rows": max_fit_rows,
                         "fit_rows": int(fit_x.shape[0]), "probe_epochs": probe_epochs,
                         "probe_weight_decay": probe_weight_decay, "seed": seed,
                         "token_reduction": "mean over the image's tokens of the token scores" if level == "token"
                         else None},
            "seconds": time.perf_counter() - start, "arrays": arrays}
