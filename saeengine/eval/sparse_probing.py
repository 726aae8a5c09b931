"""SAEBench-style sparse probing: how much of a binary concept k latents carry.

Per binary task (one-vs-rest per class of integer labels, or given boolean labels):
1. on the training rows, rank latents by |mean_pos - mean_neg| of their (image-level,
   e.g. summed or mean-pooled) codes and keep the top k (ties: the smaller latent id);
2. fit an L2-regularized logistic regression on those k columns (standardized with the
   training rows' mean and std when ``standardize``; a constant column is left as is);
3. report the test accuracy, for every k in ``ks``; and the same logistic regression on
   all columns of the dense activations (the baseline) when given.

The logistic regression (:func:`fit_logistic`) minimizes scikit-learn's objective
    C * sum_i log(1 + exp(-s_i (w.x_i + b))) + ||w||^2 / 2,   s_i = +-1,
(the intercept b is not penalized) by Newton's method with a backtracking line search in
float64: deterministic, and it agrees with sklearn.linear_model.LogisticRegression(C=C,
solver="lbfgs") to the solvers' tolerance. Its cost is O(N d^2 + d^3) per step: meant for
k latents or a dense width up to a few thousand.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError
from .probes import as_features


def fit_logistic(x, y, *, C: float = 1.0, max_iter: int = 100, tol: float = 1e-8) -> tuple[torch.Tensor, float]:
    """x [N, d] features, y [N] bool (or 0/1) -> (coef [d] float64, intercept float) of the
    L2-regularized logistic regression above (both classes must occur in y)."""
    x = as_features(x, "logistic regression features", dtype=torch.float64)
    y = torch.as_tensor(y)
    if y.shape != (x.shape[0],):
        raise InputError(f"logistic regression labels must be [N={x.shape[0]}], got shape {list(y.shape)}")
    y = y.to(x.device).double()
    if not bool(((y == 0) | (y == 1)).all()):
        raise InputError("logistic regression labels must be boolean (0/1)")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        raise InputError(f"logistic regression needs both classes; got {n_pos} positives of {y.numel()} rows")
    if not (isinstance(C, (int, float)) and C > 0):
        raise InputError(f"logistic regression: C must be a number > 0, got {C!r}")
    n, d = x.shape
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], 1)   # [N, d+1], last column: intercept
    penal = torch.ones(d + 1, dtype=x.dtype, device=x.device)
    penal[-1] = 0.0
    s = 2 * y - 1

    def objective(theta):
        return C * torch.nn.functional.softplus(-s * (xa @ theta)).sum() + 0.5 * (penal * theta * theta).sum()

    theta = torch.zeros(d + 1, dtype=x.dtype, device=x.device)
    f = objective(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(xa @ theta)
        grad = C * (xa.T @ (p - y)) + penal * theta
        if float(grad.abs().max()) <= tol * max(1.0, C * n):
            break
        weight = (p * (1 - p)).clamp_min(1e-12)
        hess = C * (xa.T * weight) @ xa + torch.diag(penal + 1e-12)
        step = torch.linalg.solve(hess, grad)
        t, decrease = 1.0, float(grad @ step)
        while True:   # Armijo backtracking: Newton steps can overshoot on nearly separable data
            candidate = theta - t * step
            fc = objective(candidate)
            if float(fc) <= float(f) - 1e-4 * t * decrease or t < 1e-10:
                break
            t *= 0.5
        theta, f = candidate, fc
    return theta[:d].clone(), float(theta[d])


def predict_logistic(coef: torch.Tensor, intercept: float, x) -> torch.Tensor:
    """[N] bool: x [N, d] @ coef + intercept > 0."""
    return (as_features(x, dtype=torch.float64).to(coef.device) @ coef + intercept) > 0


def _standardizer(train: torch.Tensor):
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return lambda m: (m - mean) / std


def _binary_tasks(y_train, y_test, n_train: int, n_test: int, names):
    """-> list of (name, pos_train [N] bool, pos_test [M] bool)."""
    y_train, y_test = torch.as_tensor(y_train), torch.as_tensor(y_test)
    if y_train.shape[0] != n_train or y_test.shape[0] != n_test or y_train.ndim != y_test.ndim:
        raise InputError(f"labels must have one row per code row: y_train {list(y_train.shape)} for {n_train} rows, "
                         f"y_test {list(y_test.shape)} for {n_test} rows")
    if y_train.dtype == torch.bool:
        if y_train.ndim == 1:
            y_train, y_test = y_train[:, None], y_test[:, None]
        if y_train.ndim != 2 or y_train.shape[1] != y_test.shape[1] or y_test.dtype != torch.bool:
            raise InputError("boolean labels must be [N] or [N, n_tasks], the same tasks for train and test")
        n_tasks = y_train.shape[1]
        names = list(names) if names is not None else [f"task {t}" for t in range(n_tasks)]
        return [(names[t], y_train[:, t], y_test[:, t]) for t in range(n_tasks)]
    if y_train.ndim != 1 or y_train.is_floating_point() or y_test.is_floating_point():
        raise InputError("labels must be integer class ids [N] (one-vs-rest tasks) or boolean [N, n_tasks]")
    classes = torch.unique(y_train).tolist()
    if len(classes) < 2:
        raise InputError(f"one-vs-rest sparse probing needs at least 2 classes in y_train, got {classes}")
    names = list(names) if names is not None else [f"class {c}" for c in classes]
    return [(names[i], y_train == c, y_test == c) for i, c in enumerate(classes)]


def top_latents_by_mean_difference(codes: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """codes [N, F], positives [N] bool -> [k] int64 latent ids with the largest
    |mean over positives - mean over negatives| (ties: the smaller id first)."""
    codes = codes.double()
    diff = (codes[positives].mean(0) - codes[~positives].mean(0)).abs()
    return torch.sort(diff, descending=True, stable=True).indices[:k]


def _fit_and_score(train: torch.Tensor, pos_train, test: torch.Tensor, pos_test, C: float, standardize: bool) -> float:
    if standardize:
        scale = _standardizer(train)
        train, test = scale(train), scale(test)
    coef, intercept = fit_logistic(train, pos_train, C=C)
    return float((predict_logistic(coef, intercept, test) == pos_test.to(coef.device)).double().mean())


def sparse_probing(codes_train, y_train, codes_test, y_test, ks: Sequence[int] = (1, 2, 5), dense_train=None,
                   dense_test=None, *, C: float = 1.0, standardize: bool = True,
                   task_names: Sequence[str] | None = None) -> dict:
    """Sparse probing of image-level codes (see the module docstring).

    Args:
        codes_train [N, F], codes_test [M, F]: per-image codes (summed or mean-pooled).
        y_train [N], y_test [M]: integer class ids (one task per class of y_train,
            one-vs-rest), or bool [N] / [N, n_tasks] binary tasks.
        ks: the numbers of latents to probe with (each <= F).
        dense_train [N, d], dense_test [M, d]: the dense activations for the baseline.
    Returns a JSON-able dict: {"ks", "C", "standardize", "n_train", "n_test", "d_sae",
    "d_dense", "tasks": [{"name", "n_pos_train", "n_pos_test", "majority_accuracy" (test
    accuracy of always predicting the training majority), "latents": {str(k): [ids]},
    "accuracy": {str(k): acc}, "dense_accuracy": acc or None}], "mean_accuracy":
    {str(k): mean over tasks}, "mean_dense_accuracy", "mean_majority_accuracy"}.
    """
    tr = as_features(codes_train, "codes_train", dtype=torch.float64)
    te = as_features(codes_test, "codes_test", dtype=torch.float64)
    if tr.shape[1] != te.shape[1]:
        raise InputError(f"codes_train has {tr.shape[1]} latents but codes_test has {te.shape[1]}; encode both "
                         "with the same SAE")
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 or k > tr.shape[1] for k in ks):
        raise InputError(f"ks must be integers in 1..{tr.shape[1]} (the number of latents), got {ks}")
    dense = dense_train is not None or dense_test is not None
    if dense:
        if dense_train is None or dense_test is None:
            raise InputError("give both dense_train and dense_test (or neither)")
        dtr = as_features(dense_train, "dense_train", dtype=torch.float64)
        dte = as_features(dense_test, "dense_test", dtype=torch.float64)
        if dtr.shape != (tr.shape[0], dtr.shape[1]) or dte.shape != (te.shape[0], dtr.shape[1]):
            raise InputError(f"dense_train {list(dtr.shape)} / dense_test {list(dte.shape)} must have the rows of "
                             f"codes_train ({tr.shape[0]}) / codes_test ({te.shape[0]}) and one width")
    tasks = []
    for name, pos_tr, pos_te in _binary_tasks(y_train, y_test, tr.shape[0], te.shape[0], task_names):
        n_pos = int(pos_tr.sum())
        if n_pos in (0, pos_tr.numel()):
            raise InputError(f"sparse probing task {name!r} has {n_pos} positives of {pos_tr.numel()} training rows; "
                             "each task needs both classes in training")
        ranked = top_latents_by_mean_difference(tr, pos_tr, max(ks))
        row = {"name": name, "n_pos_train": n_pos, "n_pos_test": int(pos_te.sum()),
               "majority_accuracy": float((pos_te == (2 * n_pos >= pos_tr.numel())).double().mean()),
               "latents": {}, "accuracy": {}, "dense_accuracy": None}
        for k in ks:
            cols = ranked[:k]
            row["latents"][str(k)] = cols.tolist()
            row["accuracy"][str(k)] = _fit_and_score(tr[:, cols], pos_tr, te[:, cols], pos_te, C, standardize)
        if dense:
            row["dense_accuracy"] = _fit_and_score(dtr, pos_tr, dte, pos_te, C, standardize)
        tasks.append(row)
    mean = lambda key: sum(t[key] for t in tasks) / len(tasks)  # noqa: E731
    return {"ks": ks, "C": float(C), "standardize": bool(standardize), "n_train": int(tr.shape[0]),
            "n_test": int(te.shape[0]), "d_sae": int(tr.shape[1]), "d_dense": int(dtr.shape[1]) if dense else None,
            "tasks": tasks,
            "mean_accuracy": {str(k): sum(t["accuracy"][str(k)] for t in tasks) / len(tasks) for k in ks},
            "mean_dense_accuracy": mean("dense_accuracy") if dense else None,
            "mean_majority_accuracy": mean("majority_accuracy")}
