"""Segmentation metrics: the confusion matrix, per-class IoU and mean IoU.

Conventions:
- ``confusion_matrix(pred, target, n_classes)[t, p]`` counts the pixels (or patches) of
  true class t predicted as p: rows are the truth, as in sklearn.metrics.confusion_matrix.
- ``ignore_index``: pixels whose *target* equals it are dropped before counting (an
  "unlabelled" value; it may lie outside 0..n_classes-1, e.g. 255).
- IoU_c = TP_c / (TP_c + FP_c + FN_c) = cm[c, c] / (row_c + col_c - cm[c, c]); NaN when
  class c is absent from both prediction and target (its union is 0).
- ``mean_iou(..., ignore_class=0)``: the mean of IoU_c over the classes c != ignore_class
  whose union is non-zero. The ignored class's pixels still count: a digit pixel
  predicted as background is a false negative of the digit (saev's "mIoU ignoring class
  0" on ADE20K, where class 0 is "other"). To drop those pixels instead, pass
  ``ignore_index=0``. Classes absent from both pred and target are left out of the mean
  (sklearn's jaccard_score would count them as 0 with a warning).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._args import is_int


def _as_ids(a, what: str) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{what} must hold integer class ids, got dtype {t.dtype}")
    return t.reshape(-1).long()


def confusion_matrix(pred, target, n_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """pred, target: integer arrays of one shape (any, e.g. [n_img, H, W]) -> [n_classes,
    n_classes] int64 counts, rows = target class, columns = predicted class."""
    if not is_int(n_classes) or n_classes < 1:
        raise InputError(f"n_classes must be an integer >= 1, got {n_classes!r}")
    if tuple(torch.as_tensor(pred).shape) != tuple(torch.as_tensor(target).shape):
        raise InputError(f"pred and target must have one shape, got {list(torch.as_tensor(pred).shape)} and "
                         f"{list(torch.as_tensor(target).shape)}")
    p = _as_ids(pred, "pred")
    t = _as_ids(target, "target").to(p.device)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    for what, ids in (("pred", p), ("target", t)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_classes):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise InputError(f"{what} holds class {bad}, outside 0..{n_classes - 1}; pass the right n_classes, or "
                             "ignore_index for unlabelled target pixels")
    return torch.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """[C, C] confusion matrix -> [C] float64 IoU per class (NaN where the union is 0)."""
    cm = torch.as_tensor(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise InputError(f"iou_per_class takes a square confusion matrix, got shape {list(cm.shape)}")
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(pred, target, n_classes: int, ignore_class: int | None = 0, ignore_index: int | None = None) -> float:
    """Mean IoU over the classes other than ``ignore_class`` that occur in pred or target
    (see the module docstring); NaN when no such class occurs."""
    iou = iou_per_class(confusion_matrix(pred, target, n_classes, ignore_index))
    keep = ~torch.isnan(iou)
    if ignore_class is not None:
        if not 0 <= ignore_class < n_classes:
            raise InputError(f"ignore_class must be a class in 0..{n_classes - 1} or None, got {ignore_class!r}")
        keep[ignore_class] = False
    return float(iou[keep].mean()) if bool(keep.any()) else float("nan")
