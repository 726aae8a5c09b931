"""saeengine.eval.ood: AUROC, FPR@TPR, AUPR-in/out and the ROC points against scikit-learn,
scipy and brute force (random sets, heavy ties, separable, reversed, n = 1, torch inputs),
and the input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from saeengine.errors import InputError
from saeengine.eval.ood import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics, roc_points


def _labels(s_id, s_ood):
    """(labels with OOD = 1, the concatenated scores) for sklearn."""
    return np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))], np.r_[s_id, s_ood]


def _brute_fpr(s_id, s_ood, tpr):
    """Every candidate threshold t (each score value, and -inf): keep t's with
    #{s_id <= t}/n_id >= tpr, return the smallest #{s_ood <= t}/n_ood. A plain loop."""
    best = None
    for t in sorted(set(list(s_id) + list(s_ood))):
        kept = sum(1 for s in s_id if s <= t) / len(s_id)
        if kept >= tpr:
            fpr = sum(1 for s in s_ood if s <= t) / len(s_ood)
            best = fpr if best is None else min(best, fpr)
    return best


def _sklearn_fpr(s_id, s_ood, tpr):
    """sklearn's ROC with ID positive and score -s: the smallest FPR where TPR >= tpr."""
    y, s = _labels(s_id, s_ood)
    fpr, tp, _ = roc_curve(1 - y, -s, drop_intermediate=False)
    return fpr[tp >= tpr].min()


def _sets(rng, kind):
    n_id, n_ood = int(rng.integers(1, 60)), int(rng.integers(1, 60))
    if kind == "continuous":
        return rng.normal(size=n_id), rng.normal(0.7, 1.3, size=n_ood)
    if kind == "ties":  # few distinct values: most pairs tie
        return rng.integers(0, 4, n_id).astype(float), rng.integers(1, 5, n_ood).astype(float)
    return np.round(rng.normal(size=n_id), 1), np.round(rng.normal(0.5, size=n_ood), 1)  # "rounded"


@pytest.mark.parametrize("kind", ["continuous", "ties", "rounded"])
def test_metrics_equal_sklearn_and_brute_force(kind):
    rng = np.random.default_rng({"continuous": 0, "ties": 1, "rounded": 2}[kind])
    for _ in range(60):
        s_id, s_ood = _sets(rng, kind)
        y, s = _labels(s_id, s_ood)
        assert auroc(s_id, s_ood) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert aupr_out(s_id, s_ood) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert aupr_in(s_id, s_ood) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
        for tpr in (0.95, 0.5, 0.8, 1.0):
            want = _brute_fpr(s_id, s_ood, tpr)
            assert fpr_at_tpr(s_id, s_ood, tpr) == pytest.approx(want, abs=1e-12)
            assert want == pytest.approx(_sklearn_fpr(s_id, s_ood, tpr), abs=1e-12)
        fpr, tp = roc_points(s_id, s_ood)
        ref_fpr, ref_tpr, _ = roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
        np.testing.assert_allclose(tp, ref_tpr, atol=1e-12)


def test_auroc_is_the_mann_whitney_probability_with_half_ties():
    rng = np.random.default_rng(3)
    s_id, s_ood = rng.integers(0, 3, 40).astype(float), rng.integers(0, 3, 25).astype(float)
    u = mannwhitneyu(s_ood, s_id, alternative="two-sided").statistic  # U of the OOD sample
    assert auroc(s_id, s_ood) == pytest.approx(u / (40 * 25), abs=1e-12)
    # All tied: every pair counts 1/2.
    assert auroc(np.zeros(5), np.zeros(3)) == 0.5


def test_fpr95_threshold_is_the_inverted_cdf_quantile_of_the_id_scores():
    s_id = np.arange(100, dtype=float)  # the 95th smallest ID score is 94
    assert fpr_at_tpr(s_id, [94.5]) == 0.0  # above t: rejected
    assert fpr_at_tpr(s_id, [94.0]) == 1.0  # equal to t: kept, like the ID samples at t
    assert fpr_at_tpr(s_id, [93.0, 95.0, 200.0, -1.0]) == 0.5
    rng = np.random.default_rng(4)
    for n in (1, 2, 7, 19, 20, 21, 100, 333):
        s_id, s_ood = rng.normal(size=n), rng.normal(size=50)
        t = np.quantile(s_id, 0.95, method="inverted_cdf")
        assert fpr_at_tpr(s_id, s_ood) == np.mean(s_ood <= t)


def test_fpr95_equals_openood_fpr_recall_without_ties_at_the_threshold():
    # OpenOOD v1.5's fpr_recall works on confidences c = -s (ID positive): it keeps the
    # floor(0.95 n_id) most confident ID samples, threshold = the smallest kept c, and counts
    # OOD samples with c > threshold. With 0.95 n_id an integer and distinct scores it is ours.
    rng = np.random.default_rng(7)
    for n_id in (20, 40, 100, 260):
        s_id, s_ood = rng.normal(size=n_id), rng.normal(0.5, size=77)
        conf_id, conf_ood = -s_id, -s_ood
        thresh = np.sort(conf_id)[-int(np.floor(0.95 * n_id))]
        assert fpr_at_tpr(s_id, s_ood) == np.sum(conf_ood > thresh) / 77


def test_separable_reversed_and_single_samples():
    s_id, s_ood = np.array([0.0, 0.1, 0.2]), np.array([1.0, 2.0])
    m = ood_metrics(s_id, s_ood)
    assert m == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0, "n_id": 3, "n_ood": 2}
    r = ood_metrics(s_ood, s_id)  # the same sets, roles swapped: OOD scores below ID
    assert r["auroc"] == 0.0 and r["fpr95"] == 1.0
    assert ood_metrics([0.0], [1.0])["auroc"] == 1.0
    assert ood_metrics([1.0], [0.0])["fpr95"] == 1.0
    one = ood_metrics([2.0], [2.0])
    assert one["auroc"] == 0.5 and one["fpr95"] == 1.0
    y, s = _labels([2.0], [2.0])
    assert one["aupr_out"] == pytest.approx(average_precision_score(y, s))
    assert one["aupr_in"] == pytest.approx(average_precision_score(1 - y, -s))
    fpr, tpr = roc_points([0.0], [1.0])
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 1.0, 1.0])


def test_torch_and_list_inputs_give_the_numpy_result():
    rng = np.random.default_rng(5)
    s_id, s_ood = rng.normal(size=30), rng.normal(1, size=20)
    want = ood_metrics(s_id, s_ood)
    t_id = torch.tensor(s_id, requires_grad=True)  # detached inside
    assert ood_metrics(t_id, torch.tensor(s_ood)) == want
    assert ood_metrics(list(s_id), tuple(s_ood)) == want
    f32 = ood_metrics(torch.tensor(s_id, dtype=torch.float32), s_ood.astype(np.float32))
    assert f32["auroc"] == pytest.approx(want["auroc"])
    assert auroc(torch.tensor([0, 1]), np.array([1, 2], dtype=np.int32)) == 0.875
    json.dumps(want, allow_nan=False)  # plain floats and ints


def test_large_sets_run_in_n_log_n():
    rng = np.random.default_rng(6)
    s_id, s_ood = rng.normal(size=200_000), rng.normal(0.3, size=200_000)  # O(n^2) would need 4e10 pairs
    y, s = _labels(s_id, s_ood)
    assert auroc(s_id, s_ood) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr_out(s_id, s_ood) == pytest.approx(average_precision_score(y, s), abs=1e-10)


@pytest.mark.parametrize("bad, words", [
    ([0.0, float("nan")], ["id_scores", "NaN or inf", "index 1"]),
    ([0.0, float("inf")], ["id_scores", "NaN or inf"]),
    ([], ["id_scores", "empty"]),
    (np.zeros((3, 2)), ["id_scores", "1-D", "[3, 2]"]),
    (torch.zeros(2, 2), ["id_scores", "1-D"]),
    (np.array(["a", "b"]), ["id_scores", "dtype"]),
    (torch.zeros(3, dtype=torch.complex64), ["id_scores", "complex"]),
    ([[1.0], [1.0, 2.0]], ["id_scores"]),
])
def test_bad_inputs_name_the_argument_and_the_fix(bad, words):
    for fn in (auroc, fpr_at_tpr, aupr_in, aupr_out, ood_metrics, roc_points):
        with pytest.raises(InputError) as err:
            fn(bad, [1.0, 2.0])
        for w in words:
            assert w in str(err.value)
    with pytest.raises(InputError, match="ood_scores"):
        auroc([1.0], [float("nan")])
    with pytest.raises(InputError, match="ood_scores.*empty"):
        ood_metrics([1.0], torch.zeros(0))


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5, float("nan"), "0.95", True])
def test_tpr_out_of_range(tpr):
    with pytest.raises(InputError, match="tpr"):
        fpr_at_tpr([0.0, 1.0], [1.0], tpr)
    with pytest.raises(InputError, match="tpr"):
        ood_metrics([0.0, 1.0], [1.0], tpr)
