"""Linear probes, sparse probing and segmentation metrics against scikit-learn and brute
force on random data; probe save/load round trip and hostile inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import jaccard_score

from saeengine.errors import CheckpointError, DataMismatchError, InputError, NonFiniteError
from saeengine.eval.probes import CONFIG_FILE, WEIGHTS_FILE, LinearProbe, accuracy, fit_patch_probe, fit_probe
from saeengine.eval.segmentation_metrics import confusion_matrix, iou_per_class, mean_iou
from saeengine.eval.sparse_probing import fit_logistic, sparse_probing, top_latents_by_mean_difference

from hostile import case, hostile_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny shapes: extra threads only cost time here


def blobs(n=120, d=5, c=3, seed=0, spread=1.0):
    """Gaussian classes around random centres: features [n, d] f32, labels [n] int64."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * 2
    y = torch.arange(n) % c
    return centres[y] + spread * torch.randn(n, d, generator=g), y


# ----- LinearProbe / fit_probe ---------------------------------------------------------------
def test_full_batch_probe_matches_sklearn_multinomial():
    x, y = blobs(n=150, d=4, c=3, spread=2.0)  # overlapping classes: a finite, unique optimum
    wd = 1e-2
    probe = fit_probe(x, y, weight_decay=wd, standardize=False, epochs=200, device="cpu")
    # ours: mean CE + wd/2 ||W||^2; sklearn: C * sum CE + ||W||^2 / 2, so C = 1 / (N wd)
    ref = LogisticRegression(C=1.0 / (len(y) * wd), solver="lbfgs", tol=1e-12, max_iter=10_000)
    ref.fit(x.numpy(), y.numpy())
    ours = torch.softmax(probe(x).double(), 1).detach().numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x.numpy()), atol=2e-4)
    # the intercepts are defined up to a shift (unpenalized); the weights are unique
    np.testing.assert_allclose(probe.linear.weight.detach().numpy(), ref.coef_, atol=2e-3)
    assert (probe.predict(x).numpy() == ref.predict(x.numpy())).all()


def test_minibatch_probe_learns_and_is_deterministic():
    x, y = blobs(n=200, d=6, c=4, seed=1, spread=0.3)
    a = fit_probe(x * 5 + 3, y, batch_size=50, epochs=15, lr=3e-2, seed=3, device="cpu")
    b = fit_probe(x * 5 + 3, y, batch_size=50, epochs=15, lr=3e-2, seed=3, device="cpu")
    assert torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias)
    assert accuracy(a, x * 5 + 3, y) > 0.95
    # standardization is stored: the training rows' mean and std
    torch.testing.assert_close(a.feature_mean, (x * 5 + 3).mean(0))
    assert a.training_settings["optimizer"] == "adamw" and a.training_settings["n_rows"] == 200


def test_accuracy_matches_brute_force():
    x, y = blobs(n=90, d=3, c=3, seed=2, spread=1.5)
    probe = fit_probe(x, y, epochs=50, device="cpu")
    logits = probe(x).detach()
    expected = sum(int(logits[i].argmax()) == int(y[i]) for i in range(len(y))) / len(y)
    assert accuracy(probe, x, y) == pytest.approx(expected)
    assert 0.4 < expected < 1.0  # the classes overlap: the test can tell a wrong count


def test_patch_probe_drops_ignored_rows():
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(6, 5, 3, generator=g)
    labels = torch.randint(0, 3, (6, 5), generator=g)
    labels[0, :2] = 255
    patch = fit_patch_probe(tokens, labels, ignore_index=255, n_classes=3, epochs=30, device="cpu")
    keep = labels.reshape(-1) != 255
    flat = fit_probe(tokens.reshape(-1, 3)[keep], labels.reshape(-1)[keep], n_classes=3, epochs=30, device="cpu")
    assert torch.equal(patch.linear.weight, flat.linear.weight)
    assert patch.training_settings["n_rows"] == int(keep.sum()) == 28


def test_save_load_round_trip(tmp_path):
    x, y = blobs(n=60, d=4, c=3, seed=5)
    probe = fit_probe(x, y, class_names=["a", "b", "c"], epochs=20, device="cpu")
    probe.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = LinearProbe.load(tmp_path / "p")
    assert torch.equal(loaded(x), probe(x))
    assert loaded.class_names == ["a", "b", "c"] and loaded.training_settings == probe.training_settings
    meta = json.loads((tmp_path / "p" / CONFIG_FILE).read_text())
    assert (meta["format"], meta["version"], meta["d_in"], meta["n_classes"]) == ("saeengine.probe", 1, 4, 3)


# ----- hostile inputs -------------------------------------------------------------------------
def _saved(tmp: Path, name="p", d=4) -> Path:
    x, y = blobs(n=30, d=d, c=2, seed=6)
    return fit_probe(x, y, epochs=5, device="cpu").save(tmp / name)


def _flip_byte(tmp):
    path = _saved(tmp)
    raw = bytearray((path / WEIGHTS_FILE).read_bytes())
    raw[-3] ^= 0x01  # a byte of the tensor data
    (path / WEIGHTS_FILE).write_bytes(bytes(raw))
    return LinearProbe.load(path)


def _edit_json(edit):
    def run(tmp):
        path = _saved(tmp)
        meta = json.loads((path / CONFIG_FILE).read_text())
        edit(meta)
        (path / CONFIG_FILE).write_text(json.dumps(meta))
        return LinearProbe.load(path)
    return run


def _truncated(tmp):
    path = _saved(tmp)
    (path / WEIGHTS_FILE).write_bytes((path / WEIGHTS_FILE).read_bytes()[:40])
    return LinearProbe.load(path)


def _mixed_saves(tmp):
    """probe.json of one save, the (intact) weights of another, with size and hash updated."""
    a, b = _saved(tmp, "a"), _saved(tmp, "b")
    (a / WEIGHTS_FILE).write_bytes((b / WEIGHTS_FILE).read_bytes())
    meta = json.loads((a / CONFIG_FILE).read_text())
    meta["weights"] = json.loads((b / CONFIG_FILE).read_text())["weights"]
    (a / CONFIG_FILE).write_text(json.dumps(meta))
    return LinearProbe.load(a)


def _wrong_d_in(tmp):
    x, y = blobs(n=30, d=4, c=2)
    return fit_probe(x, y, epochs=5, device="cpu")(torch.randn(3, 7))


def _d_in_json(meta):
    meta["d_in"] = 5


CASES = [
    case("tampered-weights", _flip_byte, CheckpointError, WEIGHTS_FILE, "checksum"),
    case("truncated-weights", _truncated, CheckpointError, WEIGHTS_FILE, "truncated"),
    case("missing-json", lambda tmp: ((_saved(tmp) / CONFIG_FILE).unlink(), LinearProbe.load(tmp / "p")),
         CheckpointError, CONFIG_FILE, "missing"),
    case("json-not-json", lambda tmp: ((_saved(tmp) / CONFIG_FILE).write_text("{nope"), LinearProbe.load(tmp / "p")),
         CheckpointError, CONFIG_FILE, "not valid json"),
    case("json-field-missing", _edit_json(lambda m: m.pop("n_classes")), CheckpointError, "'n_classes'", "missing"),
    case("json-wrong-format", _edit_json(lambda m: m.update(format="saeengine.sae")), CheckpointError, "'format'"),
    case("json-shape-edited", _edit_json(_d_in_json), CheckpointError, WEIGHTS_FILE, "'weight'", "d_in=5"),
    case("json-bool-as-int", _edit_json(lambda m: m.update(n_classes=True)), CheckpointError, "'n_classes'"),
    case("mixed-saves", _mixed_saves, CheckpointError, "different saves", "probe_id"),
    case("wrong-d_in", _wrong_d_in, DataMismatchError, "a probe for d_in=4 given features of d_in=7"),
    case("labels-out-of-range", lambda tmp: fit_probe(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), n_classes=3),
         InputError, "0..2", "found 3"),
    case("negative-label", lambda tmp: fit_probe(torch.randn(3, 2), torch.tensor([0, -1, 1])), InputError, "found -1"),
    case("float-labels", lambda tmp: fit_probe(torch.randn(3, 2), torch.tensor([0.0, 1.0, 1.0])),
         InputError, "integer"),
    case("label-count", lambda tmp: fit_probe(torch.randn(3, 2), torch.tensor([0, 1])), InputError, "3 class ids"),
    case("nan-features", lambda tmp: fit_probe(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), torch.tensor([0, 1])),
         NonFiniteError, "nan"),
    case("3d-features", lambda tmp: fit_probe(torch.randn(2, 3, 4), torch.tensor([0, 1])), InputError, "[n, d]"),
    case("accuracy-labels-out-of-range",
         lambda tmp: accuracy(LinearProbe(2, 2), torch.randn(2, 2), torch.tensor([0, 5])), InputError, "0..1"),
    case("patch-shape", lambda tmp: fit_patch_probe(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)),
         InputError, "[n_img, T]"),
]
test_hostile = hostile_table(CASES)


# ----- sparse probing ---------------------------------------------------------------------------
@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_logistic_regression_matches_sklearn(C):
    rng = np.random.default_rng(int(C * 100))
    x = rng.normal(size=(150, 4)) * [1, 3, 0.5, 2] + [0, 1, -2, 0]
    y = x @ rng.normal(size=4) + rng.normal(size=150) * 2 > 0.5
    coef, intercept = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), C=C)
    ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(coef.numpy(), ref.coef_[0], rtol=1e-5, atol=1e-6)
    assert intercept == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-6)
    assert ((x @ coef.numpy() + intercept > 0) == ref.predict(x)).all()


def test_top_latents_by_mean_difference_brute_force():
    g = torch.Generator().manual_seed(7)
    codes = torch.relu(torch.randn(40, 12, generator=g))
    pos = torch.rand(40, generator=g) > 0.5
    codes[:, 3] = codes[:, 5] = 1.0 + pos.float()  # an exact tie: 3 must come before 5
    diffs = [abs(float(codes[pos, j].mean() - codes[~pos, j].mean())) for j in range(12)]
    expected = sorted(range(12), key=lambda j: (-diffs[j], j))[:4]
    assert top_latents_by_mean_difference(codes, pos, 4).tolist() == expected
    assert expected[:2] == [3, 5]


def test_sparse_probing_against_sklearn_on_the_chosen_columns():
    g = torch.Generator().manual_seed(8)
    n_tr, n_te, f = 160, 80, 30
    y_tr, y_te = torch.arange(n_tr) % 3, torch.arange(n_te) % 3
    codes_tr, codes_te = torch.relu(torch.randn(n_tr, f, generator=g)), torch.relu(torch.randn(n_te, f, generator=g))
    for c, j in ((0, 4), (1, 11), (2, 20)):  # latent j carries class c
        codes_tr[:, j] += 1.5 * (y_tr == c)
        codes_te[:, j] += 1.5 * (y_te == c)
    dense_tr, dense_te = torch.randn(n_tr, 6, generator=g), torch.randn(n_te, 6, generator=g)
    out = sparse_probing(codes_tr, y_tr, codes_te, y_te, ks=(1, 3), dense_train=dense_tr, dense_test=dense_te, C=0.5)
    assert [t["latents"]["1"] for t in out["tasks"]] == [[4], [11], [20]]
    for c, task in enumerate(out["tasks"]):
        for k in ("1", "3"):
            cols = task["latents"][k]
            tr, te = codes_tr[:, cols].double().numpy(), codes_te[:, cols].double().numpy()
            mu, sd = tr.mean(0), tr.std(0)
            ref = LogisticRegression(C=0.5, solver="lbfgs", tol=1e-12, max_iter=10_000)
            ref.fit((tr - mu) / sd, (y_tr == c).numpy())
            expected = float((ref.predict((te - mu) / sd) == (y_te == c).numpy()).mean())
            assert task["accuracy"][k] == pytest.approx(expected)
        mu, sd = dense_tr.double().numpy().mean(0), dense_tr.double().numpy().std(0)
        ref = LogisticRegression(C=0.5, solver="lbfgs", tol=1e-12, max_iter=10_000).fit(
            (dense_tr.double().numpy() - mu) / sd, (y_tr == c).numpy())
        assert task["dense_accuracy"] == pytest.approx(float(
            (ref.predict((dense_te.double().numpy() - mu) / sd) == (y_te == c).numpy()).mean()))
    assert out["mean_accuracy"]["1"] > out["mean_majority_accuracy"]  # the planted latents carry the classes
    json.dumps(out)


def test_sparse_probing_rejects_bad_input():
    codes = torch.rand(10, 4)
    with pytest.raises(InputError, match="ks must be integers in 1..4"):
        sparse_probing(codes, torch.arange(10) % 2, codes, torch.arange(10) % 2, ks=(5,))
    with pytest.raises(InputError, match="at least 2 classes"):
        sparse_probing(codes, torch.zeros(10, dtype=torch.long), codes, torch.zeros(10, dtype=torch.long), ks=(1,))
    with pytest.raises(InputError, match="both classes"):
        sparse_probing(codes, torch.zeros(10, dtype=torch.bool), codes, torch.zeros(10, dtype=torch.bool), ks=(1,))


# ----- segmentation metrics ---------------------------------------------------------------------
def test_confusion_and_iou_match_sklearn():
    g = torch.Generator().manual_seed(9)
    target = torch.randint(0, 5, (3, 7, 9), generator=g)
    pred = torch.where(torch.rand(3, 7, 9, generator=g) < 0.6, target, torch.randint(0, 5, (3, 7, 9), generator=g))
    target[0, 0, :4] = 255
    keep = target.reshape(-1) != 255
    t, p = target.reshape(-1)[keep].numpy(), pred.reshape(-1)[keep].numpy()
    cm = confusion_matrix(pred, target, 5, ignore_index=255)
    np.testing.assert_array_equal(cm.numpy(), sk_confusion_matrix(t, p, labels=range(5)))
    np.testing.assert_allclose(iou_per_class(cm).numpy(), jaccard_score(t, p, labels=range(5), average=None))
    ref = jaccard_score(t, p, labels=range(1, 5), average=None)  # class 0 out of the mean, its pixels kept
    assert mean_iou(pred, target, 5, ignore_class=0, ignore_index=255) == pytest.approx(ref.mean())


def test_mean_iou_leaves_out_absent_classes():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])  # class 3 occurs in neither: left out, not counted as 0
    iou = iou_per_class(confusion_matrix(pred, target, 4))
    assert torch.isnan(iou[3])
    assert mean_iou(pred, target, 4) == pytest.approx((2 / 3 + 1 / 2) / 2)  # brute force: classes 1 and 2
    assert mean_iou(pred, target, 4, ignore_class=None) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_segmentation_metrics_reject_bad_ids():
    with pytest.raises(InputError, match="outside 0..2"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(InputError, match="integer class ids"):
        confusion_matrix(torch.tensor([0.0]), torch.tensor([0]), 3)
    with pytest.raises(InputError, match="one shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)
