"""The OOD-detection tool: run_ood on synthetic Gaussian data with known answers (checked
against scikit-learn and brute force), the report (HTML parsed: tables, highlighted
best cells, ROC images) and ood.json / ood_scores.npz, the ``saeengine ood`` command on
tiny activation stores and on ``--offline --size small``, and the bad inputs."""

from __future__ import annotations

import base64
import html.parser
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.neighbors import NearestCentroid

from saeengine import SAE, SAEConfig, cli
from saeengine.errors import DataMismatchError, InputError
from saeengine.eval.experiments.common import train_small_sae
from saeengine.eval.ood_report import markdown_table, render_ood_report, write_ood
from saeengine.eval.ood_run import FORMAT, OODSet, run_ood
from saeengine.store import ActivationWriter
from saeengine.synthetic import data_generator

D, C = 8, 3
SAE_SCORES = ["sae.reconstruction", "sae.max_latent", "sae.energy", "sae.knn", "sae.class_profile"]
DENSE_SCORES = ["dense.msp", "dense.energy", "dense.mahalanobis", "dense.knn"]


def _mixture(n: int, gen: torch.Generator, means: torch.Tensor, tokens: int | None = None):
    """n draws of a C-class Gaussian mixture (class means ``means``, noise 0.5): features
    [n, D] (or [n, tokens, D], each token its image's class mean + noise), labels [n]."""
    y = torch.arange(n) % C
    shape = (n, D) if tokens is None else (n, tokens, D)
    centre = means[y] if tokens is None else means[y][:, None, :]
    return centre + 0.5 * torch.randn(shape, generator=gen), y


@pytest.fixture(scope="module")
def synthetic():
    torch.manual_seed(0)
    gen = data_generator(0)  # not manual_seed(0), the SAE's: its first decoder row was the first class mean
    means = 3.0 * torch.randn(C, D, generator=gen)
    train, train_y = _mixture(600, gen, means)
    test, test_y = _mixture(300, gen, means)
    same, same_y = _mixture(300, gen, means)
    far = 10.0 * torch.ones(D) + 0.5 * torch.randn(300, D, generator=gen)  # a cluster far from every class
    shuffled = same_y[torch.randperm(300, generator=gen)]
    sae = train_small_sae(train, d_sae=32, k=4, epochs=20, batch_size=128, seed=0)
    sets = {"far": OODSet(far, None, "far"), "same": OODSet(same, same_y, "near"),
            "shuffled": OODSet(same, shuffled, "near")}
    result = run_ood(train, train_y, test, test_y, sets, sae, knn_k=10, probe_epochs=50)
    return {"train": train, "train_y": train_y, "test": test, "test_y": test_y, "same": same, "same_y": same_y,
            "shuffled": shuffled, "far": far, "sae": sae, "sets": sets, "result": result, "means": means}


def test_the_sae_does_not_start_at_a_class_mean(synthetic):
    """The data and the SAE (seed 0) come from independent streams: no initial decoder row
    lies along a class mean (with one stream, the first row was the first mean, cosine 1)."""
    w_dec = torch.nn.functional.normalize(SAE(SAEConfig(d_in=D, d_sae=32, k=4), seed=0).W_dec.detach(), dim=1)
    cos = w_dec @ torch.nn.functional.normalize(synthetic["means"], dim=1).T
    assert float(cos.max()) < 0.99, cos.max(0).values


def test_every_score_and_set_is_measured(synthetic):
    r = synthetic["result"]
    assert r["scores"] == SAE_SCORES + DENSE_SCORES
    assert set(r["metrics"]) == set(r["scores"]) and all(set(per) == {"far", "same", "shuffled"}
                                                          for per in r["metrics"].values())
    assert r["level"] == "image" and r["n_id_train"] == 600 and r["n_id_test"] == 300 and r["n_classes"] == C


def test_metrics_equal_sklearn_on_the_scores(synthetic):
    r = synthetic["result"]
    for score, per in r["arrays"].items():
        assert per["id"].shape == (300,)
        for name in ("far", "same"):
            labels = np.r_[np.zeros(300), np.ones(300)]
            s = np.r_[per["id"], per[name]]
            m = r["metrics"][score][name]
            assert m["auroc"] == pytest.approx(roc_auc_score(labels, s), abs=1e-12)
            assert m["aupr_out"] == pytest.approx(average_precision_score(labels, s), abs=1e-12)
            assert m["aupr_in"] == pytest.approx(average_precision_score(1 - labels, -s), abs=1e-12)
            # FPR95 by brute force: the smallest threshold keeping >= 95% of ID samples
            t = min(v for v in per["id"] if np.mean(per["id"] <= v) >= 0.95)
            assert m["fpr95"] == pytest.approx(np.mean(per[name] <= t))


def test_far_cluster_is_found_and_a_fresh_id_draw_is_not(synthetic):
    m = synthetic["result"]["metrics"]
    for score in ("sae.reconstruction", "sae.knn", "dense.mahalanobis", "dense.knn"):
        assert m[score]["far"]["auroc"] > 0.99, score
        assert m[score]["far"]["fpr95"] < 0.05, score
    for score, per in m.items():  # same distribution as the ID test set: chance, within ~4 sigma
        assert 0.4 < per["same"]["auroc"] < 0.6, score
    best = synthetic["result"]["best"]["far"]["auroc"]
    top = max(per["far"]["auroc"] for per in m.values())
    assert best == [s for s, per in m.items() if per["far"]["auroc"] == top]


def test_reconstruction_score_is_the_sae_error_per_row(synthetic):
    sae, far = synthetic["sae"], synthetic["far"]
    with torch.no_grad():
        recon = sae.decode(sae.encode(far)).double()
    expected = ((far.double() - recon) ** 2).sum(1) / (far.double() ** 2).sum(1)
    np.testing.assert_allclose(synthetic["result"]["arrays"]["sae.reconstruction"]["far"], expected.numpy(),
                               rtol=1e-5)


def test_generalization_probes_match_a_nearest_centroid_oracle(synthetic):
    g = synthetic["result"]["generalization"]
    assert g["sets"] == ["same", "shuffled"]  # the labelled sets only
    oracle = NearestCentroid().fit(synthetic["train"].numpy(), synthetic["train_y"].numpy())
    for name, labels in (("same", synthetic["same_y"]), ("shuffled", synthetic["shuffled"])):
        expected = float((oracle.predict(synthetic["same"].numpy()) == labels.numpy()).mean())
        for view in ("sae_codes", "dense"):
            got = g["probes"][view]["sets"][name]
            assert got["accuracy"] == pytest.approx(expected, abs=0.05), (view, name)
            assert got["ratio"] == pytest.approx(got["accuracy"] / g["probes"][view]["id_test"])
    assert g["probes"]["dense"]["id_test"] > 0.95 and g["probes"]["dense"]["sets"]["shuffled"]["accuracy"] < 0.6
    assert g["probes"]["sae_codes"]["d"] == 32 and g["probes"]["dense"]["d"] == D


def test_token_level_scores_are_the_mean_over_each_images_tokens():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    means = 3.0 * torch.randn(C, D, generator=gen)
    train, train_y = _mixture(90, gen, means, tokens=4)
    test, test_y = _mixture(30, gen, means, tokens=4)
    far = 8.0 + 0.5 * torch.randn(20, 6, D, generator=gen)  # another token count (6) is fine
    sae = train_small_sae(train.reshape(-1, D), d_sae=32, k=4, epochs=10, batch_size=64, seed=0)
    r = run_ood(train, train_y, test, test_y, {"far": far}, sae, knn_k=5, max_fit_rows=100, probe_epochs=20)
    assert r["level"] == "token" and r["tokens_per_image"] == {"id_train": 4, "id_test": 4, "far": 6}
    assert r["settings"]["fit_rows"] == 100  # 360 training tokens, a draw of 100 fits the scorer
    flat = far.reshape(-1, D)
    with torch.no_grad():
        recon = sae.decode(sae.encode(flat)).double()
    per_token = ((flat.double() - recon) ** 2).sum(1) / (flat.double() ** 2).sum(1)
    np.testing.assert_allclose(r["arrays"]["sae.reconstruction"]["far"], per_token.view(20, 6).mean(1).numpy(),
                               rtol=1e-5)
    # the dense Mahalanobis baseline sees each image's mean token: brute force with numpy
    x = train.mean(1).double().numpy()
    mu = np.stack([x[train_y.numpy() == c].mean(0) for c in range(C)])
    resid = x - mu[train_y.numpy()]
    prec = np.linalg.pinv(resid.T @ resid / len(x))
    q = far.mean(1).double().numpy()
    d2 = np.min([np.einsum("ij,jk,ik->i", q - m, prec, q - m) for m in mu], axis=0)
    np.testing.assert_allclose(r["arrays"]["dense.mahalanobis"]["far"], d2, rtol=1e-6)
    assert r["metrics"]["sae.reconstruction"]["far"]["auroc"] == 1.0


def test_bad_inputs_name_the_problem(synthetic):
    s = synthetic
    one_class = torch.zeros(600, dtype=torch.int64)
    with pytest.raises(InputError, match="class-profile.*>= 2 classes"):
        run_ood(s["train"], one_class, s["test"], s["test_y"], {"far": s["far"]}, s["sae"])
    with pytest.raises(InputError, match="OOD set 'narrow'.*width 5.*width 8"):
        run_ood(s["train"], s["train_y"], s["test"], s["test_y"], {"narrow": s["far"][:, :5]}, s["sae"])
    with pytest.raises(InputError, match="token-level.*image-level"):
        run_ood(s["train"], s["train_y"], s["test"], s["test_y"], {"t": s["far"][:, None, :]}, s["sae"])
    with pytest.raises(InputError, match="not an ID class"):
        run_ood(s["train"], s["train_y"], s["test"], s["test_y"], {"x": OODSet(s["far"], torch.full((300,), 7))},
                s["sae"])
    with pytest.raises(InputError, match="NaN or inf"):
        bad = s["far"].clone()
        bad[3, 1] = float("nan")
        run_ood(s["train"], s["train_y"], s["test"], s["test_y"], {"x": bad}, s["sae"])
    with pytest.raises(InputError, match="non-empty mapping"):
        run_ood(s["train"], s["train_y"], s["test"], s["test_y"], {}, s["sae"])
    with pytest.raises(DataMismatchError, match="width"):
        wide = torch.randn(600, 2 * D)
        run_ood(wide, s["train_y"], wide[:300], s["test_y"], {"x": wide[:10]}, s["sae"])


# ----- the report ----------------------------------------------------------------------------
class _Page(html.parser.HTMLParser):
    """Tables (rows of (tag, classes, text) cells) and image sources of a page."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[str] = []
        self._stack: list[dict] = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._stack.append({"class": attrs.get("class", ""), "rows": []})
        elif tag == "tr" and self._stack:
            self._stack[-1]["rows"].append([])
        elif tag in ("td", "th") and self._stack:
            self._cell = [tag, attrs.get("class", ""), ""]
            self._stack[-1]["rows"][-1].append(self._cell)
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self.tables.append(self._stack.pop())
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data


def test_report_has_the_table_with_best_cells_and_roc_plots(synthetic, tmp_path):
    doc = {"format": FORMAT, "version": 1, "mode": "test", "kinds": {"toy": synthetic["result"]}}
    paths = write_ood(tmp_path / "out", doc)
    page = _Page()
    page.feed(paths["report"].read_text())
    tables = [t for t in page.tables if t["class"] == "ood-metrics"]
    assert len(tables) == 1
    rows = tables[0]["rows"][2:]  # two header rows, then one row per score
    assert [r[0][2] for r in rows] == [s.replace(".", ": ") for s in SAE_SCORES + DENSE_SCORES]
    metrics = synthetic["result"]["metrics"]
    sets = ["far", "same", "shuffled"]
    for j, (name, key) in enumerate((n, k) for n in sets for k in ("auroc", "fpr95", "aupr_in", "aupr_out")):
        values = {s: metrics[s][name][key] for s in metrics}
        top = (min if key == "fpr95" else max)(values.values())
        marked = [SAE_SCORES[i] if i < 5 else DENSE_SCORES[i - 5] for i, r in enumerate(rows)
                  if "best" in r[1 + j][1]]
        assert marked == [s for s, v in values.items() if v == top], (name, key)
        assert all(float(r[1 + j][2]) == pytest.approx(values[s], rel=1e-3, abs=1e-4)
                   for r, s in zip(rows, SAE_SCORES + DENSE_SCORES))
    roc = [src for src in page.images]
    assert len(roc) == 1 and roc[0].startswith("data:image/png;base64,")
    assert base64.b64decode(roc[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    general = [t for t in page.tables if t["class"] == "generalization"]
    assert len(general) == 1 and len(general[0]["rows"]) == 3  # header + SAE codes + dense
    # ood.json: strict JSON without the arrays; ood_scores.npz: the arrays
    data = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert "arrays" not in data["kinds"]["toy"] and data["files"] == {"report": "report.html",
                                                                      "scores": "ood_scores.npz"}
    for score, per in metrics.items():
        for name in sets:
            assert data["kinds"]["toy"]["metrics"][score][name] == pytest.approx(per[name])
    with np.load(paths["scores"]) as npz:
        assert sorted(npz.files) == sorted(f"toy/{s}/{n}" for s in metrics for n in ["id"] + sets)
        np.testing.assert_array_equal(npz["toy/sae.knn/far"], synthetic["result"]["arrays"]["sae.knn"]["far"])


def test_markdown_table(synthetic):
    r = synthetic["result"]
    lines = markdown_table(r).splitlines()
    assert len(lines) == 2 + len(r["scores"]) and lines[0].count("AUROC / FPR95") == 3
    recon = next(line for line in lines if line.startswith("| sae.reconstruction |"))
    m = r["metrics"]["sae.reconstruction"]["same"]
    assert f"{m['auroc']:.3f} / {m['fpr95']:.3f}" in recon and "**1.000** / 0.000" in recon  # far: the best


def test_report_without_arrays_says_so(synthetic):
    result = {k: v for k, v in synthetic["result"].items() if k != "arrays"}
    page = render_ood_report({"format": FORMAT, "kinds": {"toy": result}})
    assert "ROC curves not drawn" in page and "<img" not in page


# ----- the command line on stores --------------------------------------------------------------
def _store(path: Path, features: np.ndarray, folders: list[str], layer: str = "blocks.3") -> Path:
    """A float32 store of features [n, T, d], image i recorded as "<folders[i]>/img-<i>.png"."""
    n, t, d = features.shape
    with ActivationWriter(path, d_in=d, dtype="float32", backbone="toy", layer=layer, token_kind="patch") as w:
        w.add_image_paths([f"{folder}/img-{i}.png" for i, folder in enumerate(folders)])
        w.add(features.reshape(-1, d), np.repeat(np.arange(n), t), np.tile(np.arange(t), n))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ood_stores")
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    means = 3.0 * torch.randn(C, D, generator=gen)
    names = ["cat", "dog", "eel"]

    def labelled(n):
        x, y = _mixture(n, gen, means, tokens=3)
        return x.numpy(), [names[i] for i in y.tolist()], y.numpy()

    train, train_f, train_y = labelled(60)
    test, test_f, _ = labelled(30)
    shift, shift_f, _ = labelled(30)
    far = (8.0 + 0.5 * torch.randn(30, 3, D, generator=gen)).numpy()
    sae = train_small_sae(torch.from_numpy(train).reshape(-1, D), d_sae=32, k=4, epochs=10, batch_size=64)
    sae.save(tmp / "sae")
    paths = {"train": _store(tmp / "train", train, train_f), "test": _store(tmp / "test", test, test_f),
             "shift": _store(tmp / "shift", shift, shift_f), "far": _store(tmp / "far", far, ["faces"] * 30),
             "wide": _store(tmp / "wide", np.zeros((4, 3, D + 1), np.float32) + 1, ["cat"] * 4),
             "one": _store(tmp / "one", train, ["cat"] * 60), "sae": tmp / "sae", "tmp": tmp}
    return {**paths, "train_x": train, "train_y": train_y, "names": names}


def _args(stores, out, *extra):
    return ["ood", "--sae", str(stores["sae"]), "--id-train", str(stores["train"]), "--id-test", str(stores["test"]),
            "--out", str(out), "--no-progress", "--knn-k", "5", "--probe-epochs", "20", *extra]


def test_store_features_and_folder_labels(stores):
    from saeengine.cli_ood import store_features

    x, folders, layer = store_features(stores["train"])
    assert layer == "blocks.3" and x.shape == (60, 3, D)
    np.testing.assert_array_equal(x.numpy(), stores["train_x"])
    assert [stores["names"].index(f) for f in folders] == stores["train_y"].tolist()


def test_a_label_is_the_folder_holding_the_image(tmp_path):
    """Paths recorded from a file list keep their leading folders ("../data/3/x.png"): the
    label is the image's own folder, and an image directly at the top has none."""
    from saeengine.cli_ood import store_features

    store = _store(tmp_path / "s", np.zeros((4, 1, D), np.float32),
                   ["../data/cat", "train/dog", "a/b/eel", "."])
    assert store_features(store)[1] == ["cat", "dog", "eel", None]


def test_cli_on_stores(stores, capsys):
    out = stores["tmp"] / "out"
    code = cli.main(_args(stores, out, "--far-ood", f"faces={stores['far']}", "--ood", f"shifted={stores['shift']}"))
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "blocks.3: AUROC / FPR95" in printed and "report.html" in printed
    data = json.loads((out / "ood.json").read_text())
    assert data["mode"] == "stores" and data["classes"] == ["cat", "dog", "eel"]
    kind = data["kinds"]["blocks.3"]
    assert kind["level"] == "token" and kind["n_id_train"] == 60
    assert kind["sets"] == {"faces": {"n": 30, "group": "far", "labelled": False},
                            "shifted": {"n": 30, "group": "", "labelled": True}}
    assert kind["generalization"]["sets"] == ["shifted"]
    assert kind["metrics"]["sae.reconstruction"]["faces"]["auroc"] > 0.95
    assert 0.3 < kind["metrics"]["sae.reconstruction"]["shifted"]["auroc"] < 0.7
    assert (out / "report.html").is_file() and (out / "ood_scores.npz").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--ood", "no-equals-sign"], "expected NAME=STORE"),
    (["--ood", "id=somewhere"], "'id' names the ID test set"),
    (["--offline"], "--offline runs the built-in experiment and takes no --sae"),
    (["--ood", "a=b", "--threads", "0"], "--threads must be >= 1"),
])
def test_cli_usage_errors(stores, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(_args(stores, tmp_path, *argv))
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_help_lists_the_output_fields(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["ood", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--offline" in out and "NAME=STORE" in out and "fpr95" in out


def test_cli_needs_offline_or_stores(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["ood", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "give --offline, or every one of --sae" in capsys.readouterr().err


@pytest.mark.parametrize("which, message", [
    ("wide", "width 9"),  # an OOD store of another layer width
    ("one", "has 1 class"),  # a one-class ID training set: no class-profile score
])
def test_cli_bad_stores(stores, tmp_path, capsys, which, message):
    if which == "one":
        argv = _args(stores, tmp_path, "--ood", f"far={stores['far']}")
        argv[argv.index("--id-train") + 1] = str(stores["one"])
        argv[argv.index("--id-test") + 1] = str(stores["one"])
    else:
        argv = _args(stores, tmp_path, "--ood", f"wide={stores[which]}")
    assert cli.main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ood.json").exists()


def test_cli_duplicate_set_name(stores, tmp_path, capsys):
    argv = _args(stores, tmp_path, "--ood", f"a={stores['far']}", "--far-ood", f"a={stores['shift']}")
    assert cli.main(argv) == 1 and "given twice" in capsys.readouterr().err


# ----- the offline experiment ------------------------------------------------------------------
def test_cli_offline_small(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = cli.main(["ood", "--offline", "--size", "small", "--threads", "1", "--out", str(tmp_path),
                         "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "ood.json").read_text())
    assert data["mode"] == "offline" and data["size"] == "small" and data["threads"] == 1
    assert set(data["kinds"]) == {"pooled", "spatial"}
    assert data["kinds"]["pooled"]["level"] == "image" and data["kinds"]["pooled"]["d_in"] == 1280
    spatial = data["kinds"]["spatial"]
    assert spatial["level"] == "token" and spatial["tokens_per_image"]["id_test"] == 36
    groups = {n: d["group"] for n, d in data["datasets"].items()}
    assert groups == {"id_train": "id", "id_test": "id", "sklearn_digits": "near", "rotated_mnist": "near",
                      "lfw_faces": "far", "photos": "far", "noise": "far"}
    for kind in data["kinds"].values():
        assert kind["scores"] == SAE_SCORES + DENSE_SCORES
        assert set(kind["sets"]) == set(groups) - {"id_train", "id_test"}
        assert kind["generalization"]["sets"] == ["sklearn_digits", "rotated_mnist"]
        assert kind["generalization"]["probes"]["dense"]["id_test"] > 0.6  # a real embedding separates digits
        # far-OOD (faces, photos, noise) vs MNIST digits: the reconstruction error tells them apart
        assert min(kind["metrics"]["sae.reconstruction"][n]["auroc"] for n in ("lfw_faces", "photos", "noise")) > 0.9
    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    assert len([t for t in page.tables if t["class"] == "ood-metrics"]) == 2 and len(page.images) == 2


def test_offline_image_sets_are_what_the_docs_say():
    from saeengine.eval.experiments.ood import SIZES, image_sets

    sets = image_sets(SIZES["small"], seed=0)
    assert sets["id_train"]["images"].shape == (200, 28, 28) and sets["id_test"]["images"].shape == (100, 28, 28)
    assert sets["photos"]["images"].shape == (60, 96, 96, 3) and sets["lfw_faces"]["images"].shape == (60, 25, 25)
    from saeengine.eval.datasets import mnist_digits

    digits, labels = mnist_digits(360, seed=0)  # the same draw: train, test, then the rotated ones
    np.testing.assert_array_equal(sets["rotated_mnist"]["images"], np.rot90(digits[300:], 1, axes=(1, 2)))
    np.testing.assert_array_equal(sets["rotated_mnist"]["labels"], labels[300:])
    assert all(s["images"].dtype == np.uint8 for s in sets.values())
