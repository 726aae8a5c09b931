"""OOD scores of feature vectors: from an SAE's code (:class:`SAEScorer`) and baselines on
the dense features (:class:`DenseScorer`). Every score is higher = more OOD; feed them to
:mod:`saeengine.eval.ood` (``auroc(id_scores, ood_scores)`` ...). Formulas, signs and
sources: docs/ood.md.

Both scorers are fitted on in-distribution (ID) *training* features and then score any
features [m, d] with :meth:`scores` -> {name: float64 numpy [m]}. Score held-out ID test
data as the ID side of the metrics: the kNN scores of a training row find the row itself
(distance 0) among its neighbours, and the probe and the class statistics were fitted on
it, so training rows look more ID than unseen ID data would.

SAE scores (z = the dense code [F] of x, zeros included; x^ = decode(z), raw space):
- "reconstruction" = ||x - x^||^2 / ||x||^2
- "max_latent"     = -max_j z_j     (a strong latent = ID-like, hence the minus)
- "energy"         = -logsumexp_j z_j over all F latents
- "knn"            = 1 - cos(z, k-th nearest ID code)  (cosine distance)
- "class_profile"  = 1 - max_c Spearman(z, p_c), p_c = mean code of ID class c [S: CAP,
                     arXiv 2604.26409]; only with ID labels of >= 2 classes.
Dense baselines on x: "msp" = -max softmax(probe logits), "energy" = -logsumexp(logits),
"mahalanobis" = min_c (x - mu_c)^T Sigma^+ (x - mu_c) (shared covariance, pseudo-inverse),
"knn" = cosine distance to the k-th nearest ID feature.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..architectures import DenseCode
from ..errors import InputError
from ._args import count
from .probes import as_features, as_labels, default_device, fit_probe

__all__ = ["SAEScorer", "DenseScorer", "SAE_SCORES", "DENSE_SCORES", "average_ranks", "spearman_rows"]

SAE_SCORES = ("reconstruction", "max_latent", "energy", "knn", "class_profile")
DENSE_SCORES = ("msp", "energy", "mahalanobis", "knn")
_BUDGET = 2 ** 24  # elements of one chunk's [rows, width] work matrix (64 MiB in float32)


def _rows(chunk: int, width: int) -> int:
    """Rows per chunk: at most ``chunk``, and at most _BUDGET elements of width ``width``."""
    return max(1, min(chunk, _BUDGET // max(1, width)))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (its cosine to anything is 0)."""
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _check_knn_k(knn_k, n: int, who: str) -> int:
    k = count("knn_k", knn_k, 1)
    if k > n:
        # Clipped, not refused: a small ID set (a test, a quick look) still gets a kNN score.
        warnings.warn(f"{who}: knn_k={k} exceeds the {n} ID rows; using k={n} (the farthest ID row). Fit on "
                      f"more ID rows or pass knn_k <= {n}", UserWarning, stacklevel=3)
        k = n
    return k


def _class_ids(id_labels, n: int, who: str, what: str) -> tuple[torch.Tensor, np.ndarray]:
    """Labels [n] -> (contiguous class index [n] int64 in 0..C-1, the C original labels);
    InputError unless >= 2 classes are present."""
    y, _ = as_labels(id_labels, n, None, what="id_labels")
    classes, inverse = np.unique(y.numpy(), return_inverse=True)
    if classes.size < 2:
        raise InputError(f"{what} needs >= 2 ID classes; id_labels hold only class {classes.tolist()}. Pass the "
                         f"labels of an ID set with several classes (a profile or a probe of one class cannot "
                         f"tell classes apart), or {who}")
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64)), classes


class _KNearest:
    """Cosine distance to the k-th nearest of the reference rows [n, w] (kept unit-norm,
    float32, on ``device``), by chunked matmul + top-k."""

    def __init__(self, reference: torch.Tensor, k: int, own: bool = False):
        # own=True: ``reference`` is a float32 buffer nobody else holds; it is scaled in
        # place (no second n x w copy at the peak).
        reference = reference.float()
        if own:
            norm = reference.norm(dim=1, keepdim=True)
            self.reference = reference.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))
        else:
            self.reference = _unit_rows(reference)
        self.k = k

    def distance(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [m, w] -> [m] float64: 1 - the k-th largest cosine to the reference."""
        q = _unit_rows(rows.to(self.reference.device, torch.float32))
        n = self.reference.shape[0]
        step = _rows(q.shape[0], n)
        out = [1.0 - torch.topk(q[i:i + step] @ self.reference.T, self.k, dim=1).values[:, -1].double()
               for i in range(0, q.shape[0], step)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=q.device)


# ----- ranks and Spearman (the class-profile score) -------------------------------------------
def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks of x [m, F] (1-based, ties get their average rank, like
    scipy.stats.rankdata(method="average")) -> float64 [m, F]."""
    m, f = x.shape
    values, order = torch.sort(x, dim=1, stable=True)
    pos = torch.arange(f, device=x.device).expand(m, f)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    # First / last sorted position of each element's tie group: a running max of the group
    # starts from the left, a running min of the group ends from the right.
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end = torch.where(last, pos, torch.full_like(pos, f)).flip(1).cummin(dim=1).values.flip(1)
    sorted_ranks = (first + end).double() / 2.0 + 1.0
    return torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)


def _centered_unit_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of each row minus their mean ((F+1)/2 whatever the ties), scaled to unit norm;
    a constant row (no spread) stays 0, so its correlation with anything is 0."""
    r = average_ranks(x)
    return _unit_rows(r - (x.shape[1] + 1) / 2.0)


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of every row of a [m, F] with every row of b [C, F] -> float64
    [m, C] (Pearson correlation of average-tie ranks; 0 where a row is constant)."""
    return _centered_unit_ranks(a) @ _centered_unit_ranks(b).T


# ----- the SAE scores ----------------------------------------------------------------------
class SAEScorer:
    """Scores from an SAE's code, fitted on ID training features.

    Args:
        sae: a :class:`saeengine.SAE` (any architecture); its device is used throughout.
        id_features: [n, d_in] ID training features (numpy or torch, finite).
        id_labels: [n] integer class ids, or None (then no "class_profile" score).
            With labels, >= 2 classes are needed (InputError otherwise).
        knn_k: the k of the kNN score; clipped to n with a UserWarning when larger.
        chunk: rows encoded per step (fewer when the dense [rows, d_sae] code would pass
            16M elements).

    Memory: the ID codes are kept dense and unit-norm, n * d_sae float32 on the SAE's
    device (60000 x 4096 = 0.98 GB); fit on a subsample of the ID training set when that
    is too much.
    """

    def __init__(self, sae, id_features, id_labels=None, *, knn_k: int = 50, chunk: int = 4096):
        self.sae = sae
        self.chunk = count("chunk", chunk, 1)
        self.device = next(sae.parameters()).device
        x = self._features(id_features, "id_features")
        if x.shape[0] == 0:
            raise InputError("id_features has no rows; fit the SAEScorer on the ID training features [n, d_in]")
        self.classes = None  # the ID labels in sorted order, with id_labels
        if id_labels is not None:
            y, self.classes = _class_ids(id_labels, x.shape[0], "pass id_labels=None to skip this score",
                                         "class_profile")
        self.knn_k = _check_knn_k(knn_k, x.shape[0], "SAEScorer")
        codes = torch.cat([self._codes(x[i:i + self._step()])[0] for i in range(0, x.shape[0], self._step())])
        self.profiles = None
        if id_labels is not None:
            y = y.to(codes.device)
            c = len(self.classes)
            sums = torch.zeros(c, codes.shape[1], dtype=torch.float64, device=codes.device)
            sums.index_add_(0, y, codes.double())
            counts = torch.bincount(y, minlength=c).double()
            self.profiles = (sums / counts[:, None]).float()  # [C, F]: the mean code of each ID class
            self._profile_ranks = _centered_unit_ranks(self.profiles)
        self._knn = _KNearest(codes, self.knn_k, own=True)  # last: it scales the codes in place

    def _step(self) -> int:
        return _rows(self.chunk, self.sae.cfg.d_sae)

    def _features(self, features, what: str) -> torch.Tensor:
        x = as_features(features, what)
        d_in = self.sae.cfg.d_in
        if x.shape[1] != d_in:
            raise InputError(f"{what} has width {x.shape[1]} but the SAE reads d_in={d_in}; pass the features of "
                             "the layer (and pooling) the SAE was trained on")
        return x

    @torch.no_grad()
    def _codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [m, d_in] -> (dense code [m, F] float32, reconstruction [m, d_in] float32, raw space)."""
        x = x.to(self.device)
        code = self.sae.encode(x)
        recon = self.sae.decode(code).float()
        dense = code.values if isinstance(code, DenseCode) else code.to_dense(self.sae.cfg.d_sae)
        return dense.float(), recon

    @torch.no_grad()
    def scores(self, features) -> dict[str, np.ndarray]:
        """features [m, d_in] -> {"reconstruction", "max_latent", "energy", "knn"
        (, "class_profile")}: float64 numpy [m] each, higher = more OOD."""
        x = self._features(features, "features")
        names = SAE_SCORES if self.profiles is not None else SAE_SCORES[:-1]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for i in range(0, x.shape[0], self._step()):
            rows = x[i:i + self._step()].to(self.device)
            z, recon = self._codes(rows)
            x64 = rows.double()
            err = (x64 - recon.double()).square().sum(1)
            # A zero input row would divide by 0: the floor keeps its score finite (and huge).
            parts["reconstruction"].append(err / x64.square().sum(1).clamp_min(1e-30))
            parts["max_latent"].append(-z.max(1).values.double())
            parts["energy"].append(-torch.logsumexp(z.double(), dim=1))
            parts["knn"].append(self._knn.distance(z))
            if self.profiles is not None:
                rho = _centered_unit_ranks(z) @ self._profile_ranks.T  # [m, C]
                parts["class_profile"].append(1.0 - rho.max(1).values)
        return {name: (torch.cat(p).cpu().numpy().astype(np.float64) if p else np.zeros(0))
                for name, p in parts.items()}


# ----- the dense baselines -------------------------------------------------------------------
class DenseScorer:
    """Baseline OOD scores on the dense features, fitted on ID training features + labels.

    Args:
        id_features: [n, d] ID training features; id_labels: [n] integer class ids, >= 2
            classes (non-negative ints, not necessarily contiguous; mapped to 0..C-1 in sorted order).
        knn_k: k of the kNN score (clipped to n with a UserWarning).
        probe_epochs: L-BFGS iterations of the linear probe (``fit_probe``, full batch,
            standardized features, weight decay 1e-4).
        seed: the probe's seed; device: None = CUDA when present; chunk: rows per step.

    Mahalanobis uses the class means mu_c and the shared (tied) covariance
    Sigma = (1/n) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T, inverted by the Moore-Penrose
    pseudo-inverse (as sklearn's EmpiricalCovariance.precision_), in float64.
    """

    def __init__(self, id_features, id_labels, *, knn_k: int = 50, probe_epochs: int = 100, seed: int = 0,
                 device=None, chunk: int = 4096):
        self.chunk = count("chunk", chunk, 1)
        self.device = default_device(device)
        x = as_features(id_features, "id_features")
        if x.shape[0] == 0:
            raise InputError("id_features has no rows; fit the DenseScorer on the ID training features [n, d]")
        y, self.classes = _class_ids(id_labels, x.shape[0], "use SAEScorer's label-free scores",
                                     "DenseScorer (its probe and class means)")
        self.knn_k = _check_knn_k(knn_k, x.shape[0], "DenseScorer")
        self.d = x.shape[1]
        self.probe = fit_probe(x, y, epochs=count("probe_epochs", probe_epochs, 1), seed=seed, device=self.device)
        x64, y = x.to(self.device, torch.float64), y.to(self.device)
        c = len(self.classes)
        sums = torch.zeros(c, self.d, dtype=torch.float64, device=self.device).index_add_(0, y, x64)
        self.means = sums / torch.bincount(y, minlength=c).double()[:, None]  # [C, d]
        resid = x64 - self.means[y]
        self.covariance = resid.T @ resid / x.shape[0]  # [d, d], shared by the classes
        self.precision = torch.linalg.pinv(self.covariance, hermitian=True)
        self._mu_p = self.means @ self.precision  # [C, d]
        self._mu_p_mu = (self._mu_p * self.means).sum(1)  # [C]
        self._knn = _KNearest(x.to(self.device), self.knn_k)

    @torch.no_grad()
    def mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, d] -> [m] float64: min_c (x - mu_c)^T Sigma^+ (x - mu_c)."""
        x = x.to(self.device, torch.float64)
        xp = x @ self.precision
        d2 = (xp * x).sum(1, keepdim=True) - 2.0 * x @ self._mu_p.T + self._mu_p_mu[None, :]
        return d2.min(1).values.clamp_min(0.0)  # rounding can dip a near-zero distance below 0

    @torch.no_grad()
    def scores(self, features) -> dict[str, np.ndarray]:
        """features [m, d] -> {"msp", "energy", "mahalanobis", "knn"}: float64 numpy [m],
        higher = more OOD."""
        x = as_features(features, "features")
        if x.shape[1] != self.d:
            raise InputError(f"features have width {x.shape[1]} but the DenseScorer was fitted on width {self.d}; "
                             "pass features of the same layer and pooling")
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in DENSE_SCORES}
        step = _rows(self.chunk, max(self.d, len(self.classes)))
        for i in range(0, x.shape[0], step):
            rows = x[i:i + step].to(self.device)
            logits = self.probe(rows).double()
            parts["msp"].append(-torch.softmax(logits, dim=1).max(1).values)
            parts["energy"].append(-torch.logsumexp(logits, dim=1))  # temperature T = 1
            parts["mahalanobis"].append(self.mahalanobis(rows))
            parts["knn"].append(self._knn.distance(rows))
        return {name: (torch.cat(p).cpu().numpy().astype(np.float64) if p else np.zeros(0))
                for name, p in parts.items()}

