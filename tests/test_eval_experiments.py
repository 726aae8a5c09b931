"""The texture-digit segmentation set and its patch labels (against loops), the small
classification and segmentation intervention experiments on the real EfficientNet-Lite0
(fields, the classification margin that the small size shows robustly, the probe's mIoU
against sklearn's jaccard_score), and the experiments' JSON front end."""

import json

import numpy as np
import pytest
import torch

from saeengine.errors import InputError
from saeengine.eval.segmentation_data import PALETTE, patch_labels, texture_digit_segmentation

pytest.importorskip("efficientnet_lite_pytorch", reason="the experiments need EfficientNet-Lite0")


def test_texture_digits_have_the_documented_layout():
    images, labels = texture_digit_segmentation(12, size=64, seed=3)
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (12, 64, 64) and labels.dtype == np.uint8
    assert labels.max() <= 10 and (labels > 0).any(1).any(1).all()  # every image holds a digit
    assert 0.01 < (labels > 0).mean() < 0.5
    again, again_labels = texture_digit_segmentation(12, size=64, seed=3)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)  # seeded
    other, _ = texture_digit_segmentation(12, size=64, seed=4)
    assert not np.array_equal(images, other)
    palette = {tuple(int(v) for v in c) for c in PALETTE}
    for i in range(12):  # a labelled pixel is fully inked (alpha 1): exactly its digit's palette colour
        ink = {tuple(int(v) for v in px) for px in images[i][labels[i] > 0]}
        assert ink <= palette and 1 <= len(ink) <= 2
        assert len({tuple(px) for px in images[i][labels[i] == 0][:500]}) > 20  # the background is a texture
    with pytest.raises(InputError, match="size must be an integer >= 28"):
        texture_digit_segmentation(2, size=10)


def test_patch_labels_against_a_loop():
    rng = np.random.default_rng(0)
    pixel = rng.integers(0, 4, (3, 10, 10)).astype(np.uint8)
    pixel[0, :5, :5] = 2  # a pure patch at grid 2
    for grid in (2, 3):
        labels, purity = patch_labels(pixel, grid)
        for n in range(3):
            for r in range(grid):
                for c in range(grid):
                    block = pixel[n, r * 10 // grid:(r + 1) * 10 // grid, c * 10 // grid:(c + 1) * 10 // grid]
                    counts = np.bincount(block.ravel(), minlength=4)
                    assert labels[n, r * grid + c] == int(np.argmax(counts))  # first max: smallest label
                    assert purity[n, r * grid + c] == pytest.approx(counts.max() / block.size)
    labels, purity = patch_labels(pixel, 2)
    assert labels[0, 0] == 2 and purity[0, 0] == 1.0
    with pytest.raises(InputError, match="grid must be an integer in 1..10"):
        patch_labels(pixel, 11)


def test_small_classification_experiment(one_torch_thread):  # 2 threads on 2 busy cores run 5x slower
    from saeengine.eval.experiments.classification import MARGIN, run_classification_experiment

    out = run_classification_experiment("small", seed=0)
    assert out["layer"] == "blocks.4" and out["tokens_per_image"] == 144
    assert out["probe"]["test_accuracy"] > 0.5  # 10 classes: far above chance
    res = out["scales"]["0.0"]
    for name in ("chosen", "random_latent", "random_vector"):
        assert res[name]["n"] == out["settings"]["n_test"]
        assert {"delta_p_true_mean", "delta_p_true_std", "flip_rate", "top1_changed"} <= set(res[name])
    chosen = res["chosen"]
    for name in ("random_latent", "random_vector"):  # the robust part of the stated margin at this size
        assert chosen["delta_p_true_mean"] <= res[name]["delta_p_true_mean"] - MARGIN
        assert chosen["flip_rate"] > res[name]["flip_rate"]
        assert res[f"p_value_vs_{name}"] < 0.05
    assert chosen["delta_p_true_mean"] < 0
    json.dumps(out)  # JSON-able


def test_small_segmentation_experiment_and_miou_against_sklearn(one_torch_thread):
    from sklearn.metrics import jaccard_score

    from saeengine.eval.experiments.segmentation import run_segmentation_experiment
    from saeengine.eval.segmentation_metrics import mean_iou

    out = run_segmentation_experiment("small", seed=0, keep_arrays=True)
    arrays = out.pop("arrays")
    pred, target = arrays["pred"], arrays["target"]
    present = sorted(set(pred.tolist()) | set(target.tolist()) - {0})
    present = [c for c in present if c != 0]
    reference = jaccard_score(target, pred, labels=present, average="macro", zero_division=0)
    assert out["probe"]["miou_patches"] == pytest.approx(reference, abs=1e-12)
    assert mean_iou(pred, target, 11, ignore_class=0) == pytest.approx(reference, abs=1e-12)
    assert 0 < out["probe"]["miou_patches"] < 1 and out["probe"]["patch_accuracy"] > 0.8
    assert out["grid"] == 10 and out["layers"] == {"sae": "blocks.7", "probe": "blocks.10"}
    assert {c["class"] for c in out["classes"]} <= set(range(1, 11)) and len(out["classes"]) >= 8
    for entry in out["classes"]:
        assert 0 <= entry["latent"] < out["settings"]["d_sae"] and 0 <= entry["f1"] <= 1
        if entry["n_test_images"]:
            assert entry["random_latent_id"] != entry["latent"]
            assert 0 <= entry["random_latent_id"] < out["settings"]["d_sae"]
    for name in ("auto", "random_latent", "random_vector"):
        pooled = out["pooled"][name]
        assert {"target_rate", "target_std", "other_rate", "other_std", "other_digit_rate"} <= set(pooled)
        assert 0 <= pooled["other_rate"] < 0.1 <= pooled["target_rate"] <= 1  # digit patches move, background not
    json.dumps(out)


def test_experiment_main_writes_the_stamped_json(tmp_path):
    from saeengine.eval.experiments.common import experiment_main

    calls = []

    def fake(size, seed, progress):
        calls.append((size, seed, progress))
        return {"experiment": "fake", "value": 1.5, "missing": float("nan")}

    out = tmp_path / "sub" / "result.json"
    assert experiment_main("fake", "a fake", fake, ["--size", "small", "--seed", "3", "--out", str(out),
                                                     "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert calls == [("small", 3, False)]
    assert data["value"] == 1.5 and data["experiment"] == "fake" and data["missing"] is None  # strict JSON
    assert {"date", "commit", "torch"} <= set(data) and data["torch"] == torch.__version__
