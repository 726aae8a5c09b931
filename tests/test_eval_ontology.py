"""Ontology recovery on a synthetic tree with a known answer: 4 superclasses -> 16 classes,
features built from planted class and superclass directions, an SAE whose latents are
exactly those directions. Superclass latents must have LCH height 1, class latents 0,
coverage exactly 1 (a forest whose internal nodes are the 4 superclasses) and 0 with
shuffled labels. Also: the top-image search, purity and attainable nodes against brute
force, the PCA null against numpy's SVD, the frequency filter, the bad inputs, the CLI on
tiny files, the report, and the small EfficientNet-Lite0 smoke run."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from saeengine import SAE
from saeengine.config import SAEConfig
from saeengine.errors import ConfigError, InputError
from saeengine.eval.hierarchy import Hierarchy
from saeengine.eval.ontology import (OntologySettings, attainable_nodes, describe_latent, latent_measures,
                                     layer_ontology, modal, null_scores, ontology, top_images)

S, C, PER, D = 4, 4, 30, 32  # superclasses, classes per superclass, images per class, feature width


def planted(rooted: bool = False, seed: int = 0, extra_latents: int = 0):
    """(hierarchy, sae, features [S*C*PER, D], labels): image of class c in superclass s
    is 3 d_c + 2 e_s + noise; the SAE's latents 0..15 are the d_c, 16..19 the e_s (ReLU,
    threshold 1), plus ``extra_latents`` latents that never fire (dead)."""
    rng = np.random.default_rng(seed)
    edges = [(f"class {s}{c}", f"super {s}") for s in range(S) for c in range(C)]
    if rooted:
        edges += [(f"super {s}", "root") for s in range(S)]
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    dirs = q[:, :S * C + S].T  # 20 orthonormal directions
    xs, labels = [], []
    for s in range(S):
        for c in range(C):
            for _ in range(PER):
                xs.append(3 * dirs[s * C + c] + 2 * dirs[S * C + s] + 0.1 * rng.normal(size=D))
                labels.append(f"class {s}{c}")
    f = S * C + S + extra_latents
    sae = SAE(SAEConfig(d_in=D, d_sae=f, architecture="relu", normalization="none"))
    with torch.no_grad():
        w = torch.zeros(f, D)
        w[:S * C + S] = torch.tensor(dirs, dtype=torch.float32)
        if extra_latents:
            w[S * C + S:] = torch.tensor(dirs[:extra_latents], dtype=torch.float32)
        sae.W_enc.copy_(w)
        sae.W_dec.copy_(torch.nn.functional.normalize(w + 1e-6, dim=1))
        b = torch.full((f,), -1.0)
        b[S * C + S:] = -100.0  # never fires
        sae.b_enc.copy_(b)
        sae.b_dec.zero_()
    return Hierarchy.from_edges(edges), sae, torch.tensor(np.array(xs), dtype=torch.float32), labels


# superclass latents fire on 1/4 of the images: widen the band to keep them
BAND = dict(max_frequency=0.5)


def test_planted_tree_gives_known_heights_and_full_coverage():
    h, sae, x, labels = planted()
    out = layer_ontology(sae, x, labels, h, OntologySettings(**BAND, per_latent=True))
    rows = {r["latent"]: r for r in out["per_latent"]}
    assert out["latents"] == {"live": 20, "in_band": 20, "kept": 20, "too_few_images": 0}
    for c in range(S * C):
        assert rows[c]["height"] == 0 and rows[c]["lch"] == f"class {c // C}{c % C}" and rows[c]["purity"] == 1.0
    for s in range(S):
        r = rows[S * C + s]
        assert r["height"] == 1 and r["lch"] == f"super {s}" and r["node"] == f"super {s}"
        assert r["subtree_purity"] == 1.0 and r["purity"] < 1.0  # several classes of one superclass
        assert len(r["top_labels"]) == 16 and all(t.startswith(f"class {s}") for t in r["top_labels"])
    sae_summary = out["sae"]
    assert sae_summary["height_histogram"] == [16, 4] and sae_summary["mean_height"] == pytest.approx(4 / 20)
    assert sae_summary["internal"] == 4 and sae_summary["covered"] == 4 and sae_summary["coverage"] == 1.0
    assert sae_summary["coverage_by_band"] == [{"depths": "0-0", "internal": 4, "covered": 4, "coverage": 1.0,
                                                "attainable": 4, "coverage_attainable": 1.0}]
    shuffled = out["nulls"]["shuffled_labels"]
    assert shuffled["count"] == 20 and shuffled["coverage"] == 0.0  # ~0: 15 of 16 random labels in one superclass
    assert shuffled["no_common_hypernym"] == 20  # the forest: random labels span superclasses
    assert set(out["nulls"]) == {"shuffled_labels", "random_directions", "pca", "neurons"}
    assert out["nulls"]["random_directions"]["count"] == 20 and out["nulls"]["neurons"]["count"] == 20
    assert out["nulls"]["random_directions"]["mean_subtree_purity"] < sae_summary["mean_subtree_purity"]


def test_rooted_tree_counts_the_root_as_an_internal_node():
    h, sae, x, labels = planted(rooted=True)
    out = layer_ontology(sae, x, labels, h, OntologySettings(**BAND, bands=2))
    s = out["sae"]
    assert s["internal"] == 5 and s["covered"] == 4 and s["coverage"] == pytest.approx(4 / 5)  # no latent maps to root
    assert [(b["depths"], b["coverage"]) for b in s["coverage_by_band"]] == [("0-0", 0.0), ("1-1", 1.0)]
    assert s["height_histogram"] == [16, 4, 0]
    shuffled = out["nulls"]["shuffled_labels"]
    # random labels: every latent's LCH and tau-node is the root, the one node they cover
    assert shuffled["covered_nodes"] == ["root"] and shuffled["mean_height"] == 2.0


def test_tau_node_ignores_a_stray_image_the_strict_lch_does_not():
    h = Hierarchy.from_edges([(f"c{s}{c}", f"s{s}") for s in range(2) for c in range(3)] +
                             [("s0", "root"), ("s1", "root")])
    rows = [["c00"] * 8 + ["c01"] * 7 + ["c10"],  # one stray image from the other superclass
            ["c00"] * 16,
            ["c00"] * 8 + ["c10"] * 8]
    m = latent_measures(np.array([h.ids(r) for r in rows]), h, need=15)  # tau 0.9 of 16
    assert [h.name(int(v)) for v in m["lch"]] == ["root", "c00", "root"]
    assert [h.name(int(v)) for v in m["node"]] == ["s0", "c00", "root"]
    assert list(m["height"]) == [2, 0, 2] and list(m["node_height"]) == [1, 0, 2]
    assert m["subtree_purity"].tolist() == [15 / 16, 1.0, 1.0]
    assert m["purity"].tolist() == [0.5, 1.0, 0.5] and list(m["n_distinct"]) == [3, 1, 2]


# ----- pieces against brute force ------------------------------------------------------------
def test_top_images_match_a_full_sort():
    rng = np.random.default_rng(1)
    scores = torch.tensor(rng.integers(-3, 6, (103, 7)).astype(np.float32))  # many ties
    top = top_images(lambda x: x, scores, top_n=9, chunk=10)
    for j in range(7):
        expect = sorted(range(103), key=lambda i: (-float(scores[i, j]), i))[:9]
        assert top.index[j].tolist() == expect
        assert top.value[j].tolist() == [float(scores[i, j]) for i in expect]
        assert top.positive[j] == int((scores[:, j] > 0).sum())


def test_modal_label_and_purity_match_counter():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, (200, 12))
    mode, counts = modal(labels)
    for row, m, c in zip(labels, mode, counts):
        counted = Counter(row.tolist())
        best = max(counted.values())
        assert c == best and m == min(k for k, v in counted.items() if v == best)


def test_attainable_nodes_match_pairwise_lcas():
    rng = np.random.default_rng(3)
    names = [f"n{i}" for i in range(40)]
    edges = [(names[i], names[int(rng.integers(0, i))]) for i in range(1, 40)]
    h = Hierarchy.from_edges(edges)
    seen = h.ids(list(rng.choice([h.names[i] for i in h.leaves], 6, replace=False)) + [h.names[int(h.internal[3])]])
    got = set(np.flatnonzero(attainable_nodes(h, seen)).tolist())
    expect = {int(h.lca_ids(a, b)) for a in seen for b in seen} | set(seen.tolist())
    assert got == {v for v in expect if not h.is_leaf[v]}


def test_pca_null_uses_the_principal_directions():
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(size=(300, 6)) * np.array([5, 4, 3, 2, 1, 0.5]) @ np.linalg.qr(
        rng.normal(size=(6, 6)))[0], dtype=torch.float32)
    score, n = null_scores("pca", x, 5, seed=0, chunk=64)
    assert n == 5  # +w1, -w1, +w2, -w2, +w3
    _, _, vt = np.linalg.svd((x - x.mean(0)).numpy(), full_matrices=False)
    proj = score(x).numpy()
    centered = (x - x.mean(0)).numpy()
    for j, (comp, sign) in enumerate([(0, 1), (0, -1), (1, 1), (1, -1), (2, 1)]):
        direct = centered @ vt[comp]
        ok = [np.allclose(proj[:, j], np.maximum(s * sign * direct, 0), atol=1e-3) for s in (1, -1)]
        assert any(ok)
    first = centered @ vt[0]
    assert any(np.allclose(proj[:, 0] - proj[:, 1], s * first, atol=1e-3) for s in (1, -1))  # +w1 and -w1
    assert (np.minimum(proj[:, 0], proj[:, 1]) == 0).all()
    score, n = null_scores("neurons", x, 10, seed=0, chunk=64)
    assert n == 6 and torch.equal(score(x).sort(1).values, x.sort(1).values)  # all 6 dimensions


def test_frequency_band_and_too_few_images():
    h, sae, x, labels = planted(extra_latents=3)
    out = layer_ontology(sae, x, labels, h, OntologySettings())  # default band: max 0.1
    assert out["latents"]["live"] == 20 and out["latents"]["in_band"] == 16  # superclass latents fire on 1/4
    assert out["sae"]["n_latents"] == 16 and out["sae"]["coverage"] == 0.0
    out = layer_ontology(sae, x, labels, h, OntologySettings(**BAND, top_n=31))  # a class has 30 images
    assert out["latents"]["kept"] == 4 and out["latents"]["too_few_images"] == 16


def _brute_top(column: np.ndarray, n: int) -> list[int]:
    return sorted(range(column.size), key=lambda i: (-float(column[i]), i))[:n]


def sparse_neurons(top_n: int = 16):
    """(hierarchy, sae, features [480, 8], labels) with class-sorted images: neurons 0..3
    are positive on 3 scattered images each (neuron 0 with a spike of 50, the top
    principal direction), 4..7 are N(0, 1); the SAE's 8 latents are ReLU(+-x_j) of the
    dense neurons 4..7 (all kept with max_frequency 1), so the nulls get 8 columns."""
    h, _, _, labels = planted()
    rng = np.random.default_rng(5)
    x = np.zeros((len(labels), 8), dtype=np.float32)
    for j in range(4):  # hits in three different superclasses, never in the first rows
        x[[130 + j, 250 + j, 400 + j], j] = 50.0 if j == 0 else 1.0 + j
    x[:, 4:] = rng.normal(size=(len(labels), 4))
    sae = SAE(SAEConfig(d_in=8, d_sae=8, architecture="relu", normalization="none"))
    with torch.no_grad():
        w = torch.zeros(8, 8)
        for j in range(4):
            w[2 * j, 4 + j], w[2 * j + 1, 4 + j] = 1.0, -1.0
        sae.W_enc.copy_(w)  # [F, d]
        sae.W_dec.copy_(torch.nn.functional.normalize(w, dim=1))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return h, sae, x, labels


def test_null_columns_with_too_few_positives_are_not_measured_on_padding():
    """The sparse neurons' top 16 would be their 3 hits + the 13 first images (zero score,
    all class 00): 13/16-pure class-00 columns. They must not be counted; the dense ones
    are measured exactly as a brute-force sort says."""
    top_n = 16
    h, sae, x, labels = sparse_neurons()
    settings = OntologySettings(top_n=top_n, max_frequency=1.0, nulls=("neurons",))
    out = layer_ontology(sae, torch.tensor(x), labels, h, settings)
    assert out["latents"]["kept"] == 8
    null = out["nulls"]["neurons"]
    support = (x > 0).sum(0)
    ok = [j for j in range(8) if support[j] >= top_n]  # the oracle: numpy's count
    assert ok == [4, 5, 6, 7]
    assert null["count"] == 8 and null["kept"] == len(ok) == null["n_latents"] and null["too_few_images"] == 4
    ids = h.ids(labels)
    tops = [_brute_top(x[:, j], top_n) for j in ok]
    assert all((x[t, j] > 0).all() for t, j in zip(tops, ok))  # no zero-score padding
    purity = [max(Counter(ids[t].tolist()).values()) / top_n for t in tops]
    assert null["mean_purity"] == pytest.approx(np.mean(purity))
    # what a padded sparse column would have been: mostly class 00 from the first rows
    padded = _brute_top(x[:, 1], top_n)
    assert Counter(ids[padded].tolist()).most_common(1)[0][1] == 13 and np.mean(purity) < 13 / 16


def test_projection_nulls_keep_only_supported_columns():
    """random_directions and pca: kept = the columns whose scores are > 0 on >= top_n
    images, counted by numpy on the score matrix (a null's seed: seed * 1000 + its index
    in settings.nulls). The spike neuron is the top principal direction: one of its two
    signs fires on 3 images only."""
    top_n = 16
    h, sae, x, labels = sparse_neurons()
    x = torch.tensor(x)
    out = layer_ontology(sae, x, labels, h, OntologySettings(top_n=top_n, max_frequency=1.0))
    k = out["latents"]["kept"]
    kept = {}
    for i, name in enumerate(OntologySettings().nulls):
        if name == "shuffled_labels":
            continue
        score, count_ = null_scores(name, x, k, seed=i, chunk=4096)
        expect = int(((score(x).numpy() > 0).sum(0) >= top_n).sum())
        null = out["nulls"][name]
        assert null["count"] == count_ and null["kept"] == expect == null["n_latents"]
        assert null["too_few_images"] == count_ - expect
        kept[name] = expect
    assert kept["pca"] == 7 and kept["neurons"] == 4
    assert out["nulls"]["shuffled_labels"]["kept"] == out["nulls"]["shuffled_labels"]["count"] == 8


# ----- bad inputs ----------------------------------------------------------------------------
def test_bad_inputs_name_the_problem():
    h, sae, x, labels = planted()
    with pytest.raises(InputError, match=r"top_n=481 is more than the 480 images"):
        layer_ontology(sae, x, labels, h, OntologySettings(top_n=481))
    with pytest.raises(ConfigError, match="top_n=0 must be an int >= 1"):
        layer_ontology(sae, x, labels, h, OntologySettings(top_n=0))
    with pytest.raises(InputError, match=r"tau=0.5 must be a number in \(0.5, 1\]"):
        layer_ontology(sae, x, labels, h, OntologySettings(tau=0.5))
    with pytest.raises(InputError, match="479 labels for 480 images"):
        layer_ontology(sae, x, labels[:-1], h)
    with pytest.raises(InputError, match=r"not in the hierarchy .*'dog'"):
        layer_ontology(sae, x, labels[:-1] + ["dog"], h)
    with pytest.raises(InputError, match="the features have 31 dimensions but the SAE reads d_in=32"):
        layer_ontology(sae, x[:, :31], labels, h)
    bad = x.clone()
    bad[7, 3] = float("nan")
    with pytest.raises(InputError, match="NaN or inf .*row 7"):
        layer_ontology(sae, bad, labels, h)
    with pytest.raises(InputError, match="unknown null"):
        layer_ontology(sae, x, labels, h, OntologySettings(nulls=("pcaa",)))
    with pytest.raises(InputError, match="min_frequency <= max_frequency"):
        layer_ontology(sae, x, labels, h, OntologySettings(min_frequency=0.5, max_frequency=0.1))
    for latent in (20, -1):
        with pytest.raises(InputError, match=r"latent .* is out of range: this SAE has latents 0..19"):
            describe_latent(sae, x, labels, h, latent)
    with pytest.raises(InputError, match="every layer must hold the features of the same images"):
        ontology({"a": (sae, x), "b": (sae, x[:-1])}, labels, h)
    with pytest.raises(InputError, match="no layers"):
        ontology({}, labels, h)


def test_describe_latent_and_several_layers():
    h, sae, x, labels = planted()
    one = describe_latent(sae, x, labels, h, S * C + 2, top_n=16)
    assert one["lch"] == "super 2" and one["height"] == 1 and len(one["top_images"]) == 16
    assert all(labels[i].startswith("class 2") for i in one["top_images"]) and one["fires_on"] == C * PER
    out = ontology({"first": (sae, x), "second": (sae, x.numpy())}, labels, h,
                   OntologySettings(**BAND, nulls=("shuffled_labels",)))
    assert list(out["layers"]) == ["first", "second"] and out["n_images"] == len(labels)
    assert out["layers"]["first"]["sae"] == out["layers"]["second"]["sae"]
    assert out["hierarchy"]["internal"] == 4 and out["settings"]["top_n"] == 16
    json.dumps(out, allow_nan=False)  # plain JSON types already


# ----- CLI and report ------------------------------------------------------------------------
def _write_inputs(tmp_path, rooted=False):
    h, sae, x, labels = planted(rooted=rooted)
    sae.save(tmp_path / "sae")
    np.save(tmp_path / "feats.npy", x.numpy())
    from safetensors.numpy import save_file

    save_file({"features": x.numpy(), "other": x.numpy()[:2]}, str(tmp_path / "feats.safetensors"))
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    edges = [(f"class {s}{c}", f"super {s}") for s in range(S) for c in range(C)]
    (tmp_path / "isa.tsv").write_text("# synthetic\n" + "".join(f"{a}\t{b}\n" for a, b in edges), encoding="utf-8")
    return labels


def test_cli_on_tiny_files(tmp_path, capsys):
    from saeengine.cli import main

    _write_inputs(tmp_path)
    out = tmp_path / "out"
    args = ["ontology", "--sae", str(tmp_path / "sae"), "--sae", str(tmp_path / "sae"), "--features",
            str(tmp_path / "feats.npy"), "--features", str(tmp_path / "feats.safetensors"), "--labels",
            str(tmp_path / "labels.txt"), "--hierarchy", str(tmp_path / "isa.tsv"), "--max-frequency", "0.5",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "layer sae: 20 kept of 20 live latents; mean LCH height 0.2; coverage 1" in printed
    assert "layer sae#2:" in printed and "shuffled_labels 0" in printed
    result = json.loads((out / "ontology.json").read_text())
    assert list(result["layers"]) == ["sae", "sae#2"]
    layer = result["layers"]["sae"]
    assert layer["sae"]["coverage"] == 1.0 and len(layer["per_latent"]) == 20
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # a height histogram per layer
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained
    assert 'id="layer-sae"' in page and "coverage" in page and "super 1" in page

    from saeengine.eval.ontology_report import main as render_main

    assert render_main([str(out / "ontology.json"), "--out", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text() == page  # the report is a function of the JSON


def test_cli_bad_inputs(tmp_path, capsys):
    from saeengine.cli import main

    _write_inputs(tmp_path)
    base = ["ontology", "--sae", str(tmp_path / "sae"), "--labels", str(tmp_path / "labels.txt"), "--no-progress",
            "--out", str(tmp_path / "o")]
    feats = ["--features", str(tmp_path / "feats.npy")]
    assert main(base + feats) == 1  # labels are not wnids and no --hierarchy
    assert "is not a WordNet wnid" in capsys.readouterr().err
    assert main(base + feats + ["--hierarchy", str(tmp_path / "isa.tsv"), "--top-n", "999"]) == 1
    assert "top_n=999 is more than the 480 images" in capsys.readouterr().err
    (tmp_path / "cycle.tsv").write_text("a\tb\nb\ta\n")
    assert main(base + feats + ["--hierarchy", str(tmp_path / "cycle.tsv")]) == 1
    assert re.search(r"a cycle: (a -> b -> a|b -> a -> b)", capsys.readouterr().err)
    (tmp_path / "bad.txt").write_text("1 2 3")
    assert main(base + ["--features", str(tmp_path / "bad.txt"), "--hierarchy", str(tmp_path / "isa.tsv")]) == 1
    assert "unknown format .txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(base + feats + feats + feats + ["--sae", str(tmp_path / "sae")])
    assert err.value.code == 2 and "once per --sae" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ontology", "--no-progress"])
    assert "pass --offline, or --sae" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ontology", "--offline", "--sae", "x"])
    assert "takes no --sae" in capsys.readouterr().err


def test_cli_defaults_to_wordnet_for_wnid_labels(tmp_path):
    from saeengine.cli import main
    from saeengine.eval.wordnet import imagenet_hierarchy

    labels = _write_inputs(tmp_path)
    wnids = imagenet_hierarchy().class_ids[:16]  # the 16 classes become 16 ImageNet classes
    names = sorted(set(labels))
    (tmp_path / "wnids.txt").write_text("\n".join(wnids[names.index(label)] for label in labels) + "\n")
    out = tmp_path / "out"
    assert main(["ontology", "--sae", str(tmp_path / "sae"), "--features", str(tmp_path / "feats.npy"), "--labels",
                 str(tmp_path / "wnids.txt"), "--nulls", "none", "--max-frequency", "0.5", "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "ontology.json").read_text())
    assert result["hierarchy"]["leaves"] == 1000 and result["layers"]["sae"]["nulls"] == {}
    rows = result["layers"]["sae"]["per_latent"]
    assert [r["height"] for r in rows[:16]] == [0] * 16 and rows[0]["lch"] == wnids[0]


def test_cli_offline_runs_the_smoke_experiment(tmp_path, monkeypatch, capsys):
    """The --offline wiring, with the experiment replaced by the synthetic tree's result."""
    from saeengine.cli import main
    from saeengine.eval.experiments import ontology as smoke

    h, sae, x, labels = planted()
    fake = {"experiment": "ontology_smoke", "smoke_test": True, "note": "a stand-in",
            "ontology": ontology({"pooled": (sae, x)}, labels, h, OntologySettings(**BAND))}
    seen = {}
    monkeypatch.setattr(smoke, "run_ontology_smoke",
                        lambda size, seed=0, progress=False: seen.update(size=size, seed=seed) or fake)
    assert main(["ontology", "--offline", "--size", "small", "--seed", "3", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    assert seen == {"size": "small", "seed": 3}
    assert "layer pooled: 20 kept" in capsys.readouterr().out
    page = (tmp_path / "report.html").read_text()
    assert "(smoke test)" in page and "a stand-in" in page


# ----- the smoke run -------------------------------------------------------------------------
def test_small_smoke_run(one_torch_thread):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the smoke run needs EfficientNet-Lite0")
    from saeengine.eval.experiments.ontology import run_ontology_smoke

    out = run_ontology_smoke("small", seed=0)
    assert out["smoke_test"] is True and out["n_images"] == sum(out["images"].values())
    assert out["images"]["mnist"] == 60 and out["images"]["lfw"] == 200
    onto = out["ontology"]
    assert list(onto["layers"]) == ["blocks.10", "pooled"] and onto["hierarchy"]["leaves"] == 1000
    assert out["n_labels_seen"] == onto["layers"]["pooled"]["n_labels_seen"] > 20
    for name, layer in onto["layers"].items():
        s = layer["sae"]
        assert layer["latents"]["kept"] > 10 and s["n_latents"] == layer["latents"]["kept"]
        assert 0 <= s["coverage"] <= s["coverage_attainable"] <= 1
        assert sum(s["height_histogram"]) + s["no_common_hypernym"] == s["n_latents"]
        assert set(layer["nulls"]) == {"shuffled_labels", "random_directions", "pca", "neurons"}
        # the network's own labels are far from random for its own features
        assert s["mean_purity"] > layer["nulls"]["shuffled_labels"]["mean_purity"] + 0.1
    json.dumps(out, allow_nan=False)
