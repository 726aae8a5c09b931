"""OOD-detection metrics of two score sets: AUROC, FPR at a TPR, AUPR-in / AUPR-out, ROC points.

Convention (every function): a score is higher for a more out-of-distribution (OOD)
sample. ``id_scores`` [n_id] are the in-distribution test samples' scores, ``ood_scores``
[n_ood] the OOD samples'. Formulas and sources are in docs/ood.md; in short:

- ``auroc``      = P(s_ood > s_id) + 1/2 P(s_ood = s_id) over all (ID, OOD) pairs, OOD
                   positive (= sklearn ``roc_auc_score`` with labels ood=1 and score s).
- ``fpr_at_tpr`` = OpenOOD's FPR@95TPR with ID as the positive ("kept") class: t = the
                   smallest ID score with #{s_id <= t} / n_id >= tpr (the empirical
                   inverted-CDF quantile of the ID scores); FPR = #{s_ood <= t} / n_ood.
                   Equals the smallest FPR with TPR >= tpr on sklearn's ``roc_curve``
                   with ID positive and score -s.
- ``aupr_in``    = average precision with ID positive and score -s; ``aupr_out`` with OOD
                   positive and score s (sklearn ``average_precision_score``: the step sum
                   sum_k (R_k - R_{k-1}) P_k over the distinct thresholds, no interpolation).

All are numpy, sort-based, O(n log n) in n = n_id + n_ood. Inputs are 1-D numpy arrays,
torch tensors or sequences of finite numbers, both non-empty (InputError otherwise).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError

__all__ = ["auroc", "fpr_at_tpr", "aupr_in", "aupr_out", "ood_metrics", "roc_points"]


def _as_scores(name: str, scores) -> np.ndarray:
    """A 1-D, non-empty, finite float64 copy of ``scores`` (numpy, torch or a sequence)."""
    if hasattr(scores, "detach") and hasattr(scores, "cpu"):  # a torch tensor, without importing torch here
        scores = scores.detach().cpu()
        if scores.is_complex():
            raise InputError(f"{name} is a complex tensor; pass real scores (one number per sample)")
        scores = scores.double().numpy()
    try:
        arr = np.asarray(scores)
    except (TypeError, ValueError) as err:  # ragged nested sequences
        raise InputError(f"{name} cannot be read as an array ({err}); pass a 1-D array of one score per "
                         "sample") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name} has dtype {arr.dtype}; pass a 1-D array of real numbers (one score per sample)")
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D (one score per sample), got shape {list(arr.shape)}; reduce "
                         "per-token scores to one per image first (e.g. .mean(1)) or flatten with .reshape(-1)")
    if arr.size == 0:
        raise InputError(f"{name} is empty; the OOD metrics need at least one ID and one OOD score")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InputError(f"{name} holds {int(bad.sum())} NaN or inf values of {arr.size} (first at index "
                         f"{int(np.argmax(bad))}); drop or fix those samples' scores first")
    return arr


def _pair(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    return _as_scores("id_scores", id_scores), _as_scores("ood_scores", ood_scores)


def _auroc(s_id: np.ndarray, s_ood: np.ndarray) -> float:
    # For each OOD score: #ID below it + 1/2 #ID equal to it, by binary search in the sorted
    # ID scores. The integer counts keep the pair sum exact (no rank-sum cancellation).
    sorted_id = np.sort(s_id)
    below = np.searchsorted(sorted_id, s_ood, side="left")
    not_above = np.searchsorted(sorted_id, s_ood, side="right")
    twice_wins = int(below.sum(dtype=np.int64)) + int(not_above.sum(dtype=np.int64))
    return twice_wins / (2.0 * s_id.size * s_ood.size)


def auroc(id_scores, ood_scores) -> float:
    """P(s_ood > s_id) + 0.5 P(s_ood = s_id): the area under the ROC curve, OOD positive.

    id_scores [n_id], ood_scores [n_ood]: higher = more OOD. 1.0 = every OOD sample scores
    above every ID sample, 0.5 = chance, 0.0 = reversed.
    """
    return _auroc(*_pair(id_scores, ood_scores))


def _check_tpr(tpr) -> float:
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(tpr)) or not 0.0 < float(tpr) <= 1.0:
        raise InputError(f"tpr={tpr!r} must be a number in (0, 1], the share of ID samples kept (0.95 for "
                         "FPR@95TPR)")
    return float(tpr)


def _fpr_at_tpr(s_id: np.ndarray, s_ood: np.ndarray, tpr: float) -> float:
    n = s_id.size
    # m = the fewest ID samples to keep: the smallest integer with m / n >= tpr, in the same
    # float comparison as a TPR array (so tpr * n rounding to just above an integer does not
    # ask for one sample more than sklearn's curve does).
    m = max(1, math.ceil(tpr * n))
    while m > 1 and (m - 1) / n >= tpr:
        m -= 1
    while m < n and m / n < tpr:
        m += 1
    threshold = np.partition(s_id, m - 1)[m - 1]  # the m-th smallest ID score: #{s_id <= t} >= m
    return float(np.count_nonzero(s_ood <= threshold)) / s_ood.size


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """The share of OOD samples accepted as ID at the threshold that keeps ``tpr`` of the ID
    samples (OpenOOD's FPR@95TPR; ID is the positive, "kept" class).

    t = the smallest ID score with #{s_id <= t} / n_id >= tpr; FPR = #{s_ood <= t} / n_ood.
    Samples scoring exactly t count as kept (ID-like), on both sides. 0.0 = no OOD sample
    passes, 1.0 = all do. tpr: in (0, 1].
    """
    tpr = _check_tpr(tpr)
    return _fpr_at_tpr(*_pair(id_scores, ood_scores), tpr)


def _threshold_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct score t, descending, of pos [P] and neg [Q] together: (true
    positives, samples predicted positive) of the rule "score >= t", int64 [K] each (a
    threshold admits a whole tie group)."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last = np.flatnonzero(np.append(np.diff(scores) != 0, True))  # the last index of each tie run
    return np.cumsum(is_pos)[last], last + 1


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """sklearn's average precision with ``pos`` [P] the positives' scores and ``neg`` the
    negatives' (higher = more positive): sum over distinct thresholds t (descending) of
    (R(t) - R(previous t)) * P(t), P and R of the rule "score >= t"."""
    tps, predicted = _threshold_counts(pos, neg)
    precision = tps / predicted
    recall_gain = np.diff(tps, prepend=0) / pos.size
    return float(min(1.0, np.sum(recall_gain * precision)))  # float rounding can pass 1 by a few ulps


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision of detecting ID samples (ID positive, score -s). Chance level is
    n_id / (n_id + n_ood)."""
    s_id, s_ood = _pair(id_scores, ood_scores)
    return _average_precision(-s_id, -s_ood)


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision of detecting OOD samples (OOD positive, score s). Chance level is
    n_ood / (n_id + n_ood)."""
    s_id, s_ood = _pair(id_scores, ood_scores)
    return _average_precision(s_ood, s_id)


def roc_points(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve, OOD positive, for plotting: (fpr [K+1], tpr [K+1]) float64, from (0, 0)
    to (1, 1), one point per distinct score value t (descending), of the rule "OOD if
    s >= t" (= sklearn ``roc_curve(..., drop_intermediate=False)``)."""
    s_id, s_ood = _pair(id_scores, ood_scores)
    tps, predicted = _threshold_counts(s_ood, s_id)
    fps = predicted - tps
    fpr = np.concatenate([[0.0], fps / s_id.size])
    tpr = np.concatenate([[0.0], tps / s_ood.size])
    return fpr, tpr


def ood_metrics(id_scores, ood_scores, tpr: float = 0.95) -> dict:
    """{"auroc", "fpr95", "aupr_in", "aupr_out", "n_id", "n_ood"} of one score on one
    (ID, OOD) pair of sets; "fpr95" is :func:`fpr_at_tpr` at ``tpr`` (0.95 by default)."""
    tpr = _check_tpr(tpr)
    s_id, s_ood = _pair(id_scores, ood_scores)
    return {"auroc": _auroc(s_id, s_ood), "fpr95": _fpr_at_tpr(s_id, s_ood, tpr),
            "aupr_in": _average_precision(-s_id, -s_ood), "aupr_out": _average_precision(s_ood, s_id),
            "n_id": int(s_id.size), "n_ood": int(s_ood.size)}
