"""What the intervention experiments measure: the classification effect of an edit
(Δp(true class), flip rate), saev's per-class F1 selection of a segmentation latent
(:func:`auto_select_latents`), and the target / other change rates of a patch probe's
predictions (:func:`change_rates`, :func:`pooled_change_rates`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError


# ----- classification ---------------------------------------------------------------------
def _check_probs(name: str, p: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(p).double()
    if p.ndim != 2:
        raise InputError(f"{name} must be probabilities [B, C], got shape {tuple(p.shape)}")
    if not bool(((p >= 0) & (p <= 1)).all()) or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-4):
        raise InputError(f"{name} rows are not probabilities (in [0, 1], summing to 1); run intervene with "
                         "softmax=True")
    return p


def classification_effect(before: torch.Tensor, after: torch.Tensor, true_labels) -> dict:
    """Effect of an edit on a classifier, from probabilities before/after [B, C] and the
    true classes [B]:

    - delta_p_true_mean / _std: mean and (population) std over images of
      p_after(true) - p_before(true);
    - p_true_before / p_true_after: the mean probabilities of the true class;
    - accuracy_before / accuracy_after: share whose top-1 is the true class;
    - flip_rate: among images whose top-1 was the true class before (n_correct_before of
      them), the share whose top-1 is another class after (NaN if none was correct);
    - top1_changed: share of all images whose top-1 class changed.
    """
    p0, p1 = _check_probs("before", before), _check_probs("after", after)
    if p0.shape != p1.shape:
        raise InputError(f"before {tuple(p0.shape)} and after {tuple(p1.shape)} must have the same shape")
    y = torch.as_tensor(np.asarray(true_labels)).long().reshape(-1)
    if y.numel() != p0.shape[0] or bool(((y < 0) | (y >= p0.shape[1])).any()):
        raise InputError(f"true_labels must be [B={p0.shape[0]}] class ids in 0..{p0.shape[1] - 1}")
    rows = torch.arange(y.numel())
    delta = p1[rows, y] - p0[rows, y]
    top0, top1 = p0.argmax(1), p1.argmax(1)
    correct0 = top0 == y
    n_correct = int(correct0.sum())
    flips = int((correct0 & (top1 != y)).sum())
    return {
        "n": int(y.numel()),
        "delta_p_true_mean": float(delta.mean()),
        "delta_p_true_std": float(delta.std(unbiased=False)),
        "p_true_before": float(p0[rows, y].mean()),
        "p_true_after": float(p1[rows, y].mean()),
        "accuracy_before": float(correct0.double().mean()),
        "accuracy_after": float((top1 == y).double().mean()),
        "n_correct_before": n_correct,
        "flip_rate": flips / n_correct if n_correct else float("nan"),
        "top1_changed": float((top0 != top1).double().mean()),
    }


# ----- segmentation -----------------------------------------------------------------------
def _positive_entries(codes):
    """codes: dense [P, F] or (values [P, w], indices [P, w]) -> (rows, latents, values) of
    the entries > 0, and P."""
    if isinstance(codes, (tuple, list)):
        values, indices = (torch.as_tensor(c) for c in codes)
        if values.shape != indices.shape or values.ndim != 2:
            raise InputError(f"codes (values, indices) must both be [P, w], got {tuple(values.shape)} and "
                             f"{tuple(indices.shape)}")
        on = values > 0
        rows = torch.arange(values.shape[0])[:, None].expand_as(values)[on]
        return rows, indices[on].long(), values[on].float(), values.shape[0]
    dense = torch.as_tensor(codes)
    if dense.ndim != 2:
        raise InputError(f"codes must be dense [P, F] or a (values, indices) pair, got shape {tuple(dense.shape)}")
    rows, latents = torch.nonzero(dense > 0, as_tuple=True)
    return rows, latents, dense[rows, latents].float(), dense.shape[0]


def auto_select_latents(codes, patch_labels, purity, *, d_sae: int | None = None,
                        thresholds: Sequence[float] = (0.0, 0.1, 0.3, 1.0), max_freq: float = 0.1,
                        min_purity: float = 0.9, classes: Sequence[int] | None = None) -> dict[int, dict]:
    """Per class c, the latent whose "z_j > t" best predicts "patch is c" (saev's
    auto-selection):

    on the patches with purity >= ``min_purity`` (share of their pixels carrying the
    patch's label), for each latent j and threshold t, F1 = 2TP / (2TP + FP + FN) with
    TP = pure c-patches where z_j > t, FP = other pure patches where z_j > t, FN = pure
    c-patches where z_j <= t (so 2TP + FP + FN = fired + n_c). A latent scores its best t
    (the smallest on ties); latents that fire (z > 0) on >= ``max_freq`` of ALL given
    patches are masked; the top F1 wins (the smallest id on ties).

    Args:
        codes: [P, F] dense codes or a (values [P, w], indices [P, w]) pair.
        patch_labels: [P] int labels; purity: [P] float in [0, 1].
        d_sae: number of latents (default: F of a dense code, else the largest index + 1).
        classes: the classes to select for (default: every label with a pure patch).
    Returns {c: {"latent": int, "f1": float, "threshold": float, "n_patches": int}} for
    every class with at least one pure patch and a latent of F1 > 0 outside the
    max_freq mask (a class where every latent is masked, or none fires, is left out).
    """
    rows, latents, values, n = _positive_entries(codes)
    labels = torch.as_tensor(np.asarray(patch_labels)).long().reshape(-1)
    pure = torch.as_tensor(np.asarray(purity)).double().reshape(-1) >= min_purity
    if labels.numel() != n or pure.numel() != n:
        raise InputError(f"codes have {n} patches but patch_labels {labels.numel()} and purity {pure.numel()}; "
                         "give one label and purity per patch")
    if any(t < 0 for t in thresholds) or not thresholds:
        raise InputError(f"thresholds {tuple(thresholds)} must be >= 0 (and at least one)")
    if d_sae is None:
        dense_f = None if isinstance(codes, (tuple, list)) else torch.as_tensor(codes).shape[1]
        d_sae = dense_f if dense_f is not None else int(latents.max()) + 1 if latents.numel() else 1
    if latents.numel() and int(latents.max()) >= d_sae:
        raise InputError(f"codes name latent {int(latents.max())} but d_sae={d_sae}; pass the SAE's d_sae")
    if labels.numel() and int(labels.min()) < 0:
        raise InputError(f"patch_labels holds {int(labels.min())}; labels must be class ids >= 0 (drop ignored "
                         "patches with the purity mask instead)")
    n_cls = int(labels.max()) + 1 if labels.numel() else 1
    frequency = torch.bincount(latents, minlength=d_sae).double() / max(n, 1)
    masked = frequency >= max_freq
    keep = pure[rows]
    p_rows, p_lat, p_val = rows[keep], latents[keep], values[keep]
    p_lab = labels[p_rows]
    n_c = torch.bincount(labels[pure], minlength=n_cls).double()
    wanted = sorted(set(int(c) for c in (classes if classes is not None else torch.nonzero(n_c).flatten().tolist())))
    best_f1 = torch.full((d_sae, n_cls), -1.0, dtype=torch.float64)
    best_t = torch.zeros((d_sae, n_cls), dtype=torch.float64)
    for t in thresholds:  # increasing order is not assumed: ties keep the smallest t
        on = p_val > t
        fired = torch.bincount(p_lat[on], minlength=d_sae).double()
        tp = torch.bincount(p_lat[on] * n_cls + p_lab[on], minlength=d_sae * n_cls).double().view(d_sae, n_cls)
        denom = fired[:, None] + n_c[None, :]
        f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
        better = (f1 > best_f1) | ((f1 == best_f1) & (t < best_t))
        best_f1 = torch.where(better, f1, best_f1)
        best_t = torch.where(better, torch.full_like(best_t, float(t)), best_t)
    out = {}
    for c in wanted:
        if c >= n_cls or n_c[c] == 0:
            continue
        scores = torch.where(masked, torch.full_like(best_f1[:, c], -1.0), best_f1[:, c])
        j = int(torch.argmax(scores))  # first maximum: the smallest id on ties
        if scores[j] <= 0:  # every latent masked by max_freq, or none fires on the class: nothing to pick
            continue
        out[c] = {"latent": j, "f1": float(max(scores[j], 0.0)), "threshold": float(best_t[j, c]),
                  "n_patches": int(n_c[c])}
    return out


@dataclass
class ChangeCounts:
    """Patches of class c (target) and of the other classes whose prediction changed."""

    target_changed: int
    target_total: int
    other_changed: int
    other_total: int


def change_counts(pred_before, pred_after, patch_labels, c: int) -> ChangeCounts:
    """Counts of changed predictions ([P] class ids before/after) among the patches labelled
    c and among the rest."""
    p0, p1, y = (torch.as_tensor(np.asarray(a)).long().reshape(-1) for a in (pred_before, pred_after, patch_labels))
    if not p0.numel() == p1.numel() == y.numel():
        raise InputError(f"pred_before {p0.numel()}, pred_after {p1.numel()} and patch_labels {y.numel()} "
                         "must all be [P] for the same patches")
    changed = p0 != p1
    target = y == int(c)
    return ChangeCounts(int((changed & target).sum()), int(target.sum()),
                        int((changed & ~target).sum()), int((~target).sum()))


def change_rates(pred_before, pred_after, patch_labels, c: int) -> tuple[float, float]:
    """(target change rate, other change rate): the share of c-patches whose prediction
    changed, and the same share over the non-c patches (NaN where there are none)."""
    k = change_counts(pred_before, pred_after, patch_labels, c)
    nan = float("nan")
    return (k.target_changed / k.target_total if k.target_total else nan,
            k.other_changed / k.other_total if k.other_total else nan)


def pooled_change_rates(counts: Sequence[ChangeCounts]) -> dict:
    """saev's summary over classes: target_rate / other_rate = the counts pooled over
    classes (sum changed / sum total); target_std / other_std = the population std of the
    per-class rates (classes without such patches left out); n_classes."""
    def pooled(changed, total):
        return sum(changed) / sum(total) if sum(total) else float("nan")

    def std(changed, total):
        rates = [a / b for a, b in zip(changed, total) if b]
        return float(np.std(rates)) if rates else float("nan")

    tc, tt = [k.target_changed for k in counts], [k.target_total for k in counts]
    oc, ot = [k.other_changed for k in counts], [k.other_total for k in counts]
    return {"target_rate": pooled(tc, tt), "target_std": std(tc, tt), "other_rate": pooled(oc, ot),
            "other_std": std(oc, ot), "n_classes": len(counts)}
