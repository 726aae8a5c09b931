"""The cross-style model-comparison experiment: its scoring logic on planted scores, the
small real run's fields and ranges, and the command that writes the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saeengine.errors import InputError
from saeengine.eval.experiments import model_comparison as mc

DIGITS = 10


def planted(labels: np.ndarray, d_sae: int, latent_of) -> torch.Tensor:
    """[n, d_sae] scores where latent_of(c) fires (1.0) exactly on the images of digit c."""
    scores = torch.zeros(len(labels), d_sae, dtype=torch.float64)
    for c in range(DIGITS):
        scores[torch.from_numpy(labels == c), latent_of(c)] = 1.0
    return scores


def test_cross_style_finds_a_shared_latent():
    settings = mc.SIZES["small"]
    labels_a, labels_b = np.arange(200) % DIGITS, np.arange(150) % DIGITS
    # latent 3c fires on digit c in both styles; latent 3c+1 fires on digit c in style A only
    scores_a = planted(labels_a, 40, lambda c: 3 * c) + planted(labels_a, 40, lambda c: 3 * c + 1)
    scores_b = planted(labels_b, 40, lambda c: 3 * c)
    out = mc.cross_style(scores_a, labels_a, scores_b, labels_b, settings)
    assert [d["latent"] for d in out["digits"]] == [3 * c for c in range(DIGITS)]  # F1 ties: the smaller id
    assert out["mean_f1_cross"] == 1.0 and out["mean_f1_select"] == 1.0
    # a random alive latent (1 of 20) reaches F1 1 on digit c's set only when it is 3c: p ~ 1/20 per digit;
    # ten such hits at once never happen in 200 draws, so the mean's p is the smallest reachable
    assert all(0.01 < d["p_value"] < 0.12 for d in out["digits"])
    assert out["p_value_mean"] == pytest.approx(1 / (1 + settings.n_random))
    assert out["alive_latents"] == 20
    assert all((d["n_select"], d["n_eval"]) == (20, 15) for d in out["digits"])


def test_cross_style_reports_a_style_specific_latent_as_failing():
    settings = mc.SIZES["small"]
    labels_a, labels_b = np.arange(200) % DIGITS, np.arange(150) % DIGITS
    scores_a = planted(labels_a, 30, lambda c: c)            # style A's latent for digit c ...
    scores_b = planted(labels_b, 30, lambda c: DIGITS + c)   # ... is another latent in style B
    out = mc.cross_style(scores_a, labels_a, scores_b, labels_b, settings)
    assert out["mean_f1_cross"] == 0.0 and out["mean_f1_oracle_b"] == 1.0
    assert all(d["p_value"] == 1.0 for d in out["digits"])


@pytest.fixture(scope="module")
def small_run():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, two threads run these small shapes ~5x slower
    try:
        return mc.run_model_comparison("small", seed=0)
    finally:
        torch.set_num_threads(before)


def test_small_real_run_fields_and_ranges(small_run):
    out = small_run
    json.dumps(out)
    s = mc.SIZES["small"]
    assert out["experiment"] == "model_comparison" and out["size"] == "small"
    assert (out["n_mnist"], out["n_sklearn"]) == (200, 200) and out["trivial_f1"] == pytest.approx(2 / 3)
    assert sorted(out["extractors"]) == sorted(mc.EXTRACTORS) and sorted(out["ranking"]) == sorted(mc.EXTRACTORS)
    for name, r in out["extractors"].items():
        assert r["tokens_per_image"] == (1 if name == "pixel-pca" else 16)
        assert r["d_in"] == (s.pca_components if name == "pixel-pca" else 112)
        assert 0 < r["sae"]["fvu"] < 1 and 0 < r["sae"]["l0"] <= s.k
        assert 0 < r["alive_latents"] <= s.d_sae
        assert len(r["digits"]) == DIGITS
        for d in r["digits"]:
            assert 0 <= d["latent"] < s.d_sae and (d["n_select"], d["n_eval"]) == (20, 20)
            for key in ("f1_select", "f1_cross", "random_f1_mean", "f1_oracle_b"):
                assert 0.0 <= d[key] <= 1.0, (name, key, d[key])
            assert d["f1_oracle_b"] >= d["f1_cross"]  # the oracle maximizes over the same evaluation set
            assert 1 / (1 + s.n_random) <= d["p_value"] <= 1.0
        assert r["mean_f1_cross"] == pytest.approx(np.mean([d["f1_cross"] for d in r["digits"]]))
        assert r["mean_f1_select"] > r["mean_random_f1"]  # chosen on A by F1: better than random there too
    ranked = [out["extractors"][n]["mean_f1_cross"] for n in out["ranking"]]
    assert ranked == sorted(ranked, reverse=True)
    # robust at this size (seeds 0-3: pixel PCA <= 0.10, the networks >= 0.27); real vs random weights is not
    # (it flips with the seed here), so it is not asserted: the full run's numbers are in the docs
    pca = out["extractors"]["pixel-pca"]["mean_f1_cross"]
    assert pca < min(out["extractors"][n]["mean_f1_cross"] for n in ("efficientnet-lite0", "efficientnet-lite0-random"))
    assert out["real_beats_random"] == (out["extractors"]["efficientnet-lite0"]["mean_f1_cross"]
                                        > out["extractors"]["efficientnet-lite0-random"]["mean_f1_cross"])


def test_main_writes_the_stamped_json(tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "run_model_comparison", lambda size, seed, progress: {"size": size, "seed": seed})
    out = tmp_path / "r" / "mc.json"
    assert mc.main(["--size", "small", "--seed", "4", "--out", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["size"] == "small" and data["seed"] == 4 and data["torch"] == torch.__version__
    assert data["date"][:4].isdigit() and data["commit"] and data["threads"] >= 1


def test_bad_arguments_are_named():
    with pytest.raises(InputError, match="size must be one of"):
        mc.run_model_comparison("medium")
    with pytest.raises(InputError, match="unknown extractors"):
        mc.run_model_comparison("small", extractors=("vgg",))
