"""Segmentation intervention on real offline data (paper 2's task 4, saev's quantitative
protocol, on EfficientNet-Lite0 and MNIST digits pasted onto scikit-image textures).

1. Data: segmentation_data.texture_digit_segmentation at 160 px (labels 0 = background,
   1..10 = digit 0..9); ``n_train`` images train the probe and the SAE, ``n_test`` others
   are evaluated. Patch labels = the mode of each patch's pixels on a 10 x 10 grid
   (16 px patches), purity = that mode's share.
2. Probe: a linear patch probe (probes.fit_patch_probe, 11 classes, full-batch L-BFGS)
   on the tokens of ``blocks.10`` (10 x 10 map, 112 channels at 160 px). Reported: patch
   accuracy and mIoU over the digit classes (background ignored as a class, its patches
   still count; segmentation_metrics.mean_iou), on patches and on pixels (the probe's
   logits upsampled bilinearly to 160 x 160, as saev validates).
3. SAE: TopK (``d_sae``, ``k``) on the tokens of ``blocks.7``, an earlier block with the
   same 10 x 10 grid (so a patch's label is the same at both blocks), trained on the
   training images; maxima m_j from those tokens.
4. Auto-selection per digit class (intervention_effects.auto_select_latents): on the training
   patches with purity >= 0.9, the latent with the best F1 of "z_j > t" vs "patch is c"
   over t in {0, 0.1, 0.3, 1.0}, latents firing on >= ``max_freq`` of the patches masked.
5. Intervention per class c, on the test images holding a c-patch: the latent set to
   -2 m_j at every patch of blocks.7 (error term kept); the probe's patch predictions
   before and after. Baselines: one random latent per class (not the chosen one, ever
   fired) at -2 x its own max, and a random unit vector times the chosen edit's change norm at
   each patch (interventions.random_latent_edit / random_vector_edit).
6. Change rates (intervention_effects.change_counts / pooled_change_rates): target = changed
   c-patches / c-patches, other = changed non-c patches / non-c patches; pooled means
   over classes and the std of the per-class rates. Also "other_digit_rate": the same
   over the patches of the other digit classes only (the other rate is mostly
   background, which a digit feature should not touch anyway).

Run: ``python -m saeengine.eval.experiments.segmentation --size full --out
benchmarks/results/2026-12-01-segmentation-intervention.json``.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from tqdm.auto import tqdm
import torch.nn.functional as F

from ...errors import InputError
from ..batch import code_pairs
from ..intervention_effects import ChangeCounts, auto_select_latents, change_counts, pooled_change_rates
from ..interventions import intervene, random_latent_edit, random_vector_edit
from ..probes import fit_patch_probe
from ..segmentation_data import N_LABELS, patch_labels, texture_digit_segmentation
from ..segmentation_metrics import mean_iou
from .common import block_tokens, experiment_main, experiment_setup, pixels_of, sae_summary, train_small_sae

IMAGE_SIZE = 160
SAE_LAYER, PROBE_LAYER, GRID = "blocks.7", "blocks.10", 10
SCALE = -2.0
THRESHOLDS = (0.0, 0.1, 0.3, 1.0)
MIN_PURITY = 0.9
CONDITIONS = ("auto", "random_latent", "random_vector")


@dataclasses.dataclass(frozen=True)
class Settings:
    """n_train, n_test: images; d_sae, k, sae_epochs: the SAE; max_freq: auto-selection's
    frequency mask; probe_epochs, probe_weight_decay: the L-BFGS patch probe."""
    n_train: int
    n_test: int
    d_sae: int
    k: int
    sae_epochs: int
    max_freq: float = 0.1
    probe_epochs: int = 100
    probe_weight_decay: float = 1e-3


SIZES = {
    "small": Settings(n_train=60, n_test=24, d_sae=256, k=8, sae_epochs=10, probe_epochs=50),
    "full": Settings(n_train=800, n_test=200, d_sae=1024, k=16, sae_epochs=10),
}


def _rates(counts: list[ChangeCounts], other_digit: list[tuple[int, int]]) -> dict:
    out = pooled_change_rates(counts)
    changed, total = sum(a for a, _ in other_digit), sum(b for _, b in other_digit)
    out["other_digit_rate"] = changed / total if total else float("nan")
    return out


@torch.no_grad()
def _pixel_predictions(probe, tokens: torch.Tensor, size: int, chunk: int = 50) -> np.ndarray:
    """tokens [n, GRID*GRID, d] -> uint8 [n, size, size]: the probe's logits upsampled
    bilinearly to pixels, then argmax."""
    out = []
    for start in range(0, tokens.shape[0], chunk):
        t = tokens[start:start + chunk]
        logits = probe(t.reshape(-1, t.shape[2])).reshape(t.shape[0], GRID, GRID, -1).permute(0, 3, 1, 2)
        up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        out.append(up.argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def run_segmentation_experiment(size: str = "small", seed: int = 0, progress: bool = False,
                                keep_arrays: bool = False) -> dict:
    """Run the experiment (module docstring) at ``size`` "small" (the tests' size) or
    "full" -> a JSON-able dict: {"experiment", "size", "seed", "settings", "layers"
    ({"sae", "probe"}), "image_size", "grid", "scale", "probe": {"patch_accuracy",
    "digit_patch_accuracy", "miou_patches", "miou_pixels", "n_test_patches"}, "sae": {"d_sae",
    "k", "epochs", "fvu", "l0", "alive"}, "classes": [{"class", "digit", "latent", "f1",
    "threshold", "n_pure_train_patches", "n_test_images", "random_latent_id", and per
    condition {"target_rate", "other_rate", "other_digit_rate"}}], "pooled": {condition:
    {"target_rate", "target_std", "other_rate", "other_std", "other_digit_rate",
    "n_classes"}}, "auto_beats_baselines" (pooled target rate above both baselines'),
    "seconds"}. ``keep_arrays`` adds "arrays": numpy patch predictions and labels of the
    test set ({"pred", "target"}, [n_test * 100]) for an independent mIoU check."""
    settings, backbone, start = experiment_setup(size, SIZES, seed)
    images, pixel_labels = texture_digit_segmentation(settings.n_train + settings.n_test, size=IMAGE_SIZE, seed=seed)
    labels, purity = patch_labels(pixel_labels, GRID)
    n_train = settings.n_train
    pixels = pixels_of(images, backbone, IMAGE_SIZE)
    probe_tokens = block_tokens(backbone, PROBE_LAYER, pixels)
    sae_tokens = block_tokens(backbone, SAE_LAYER, pixels[:n_train])
    if probe_tokens.shape[1] != GRID * GRID or sae_tokens.shape[1] != GRID * GRID:
        raise InputError(f"{PROBE_LAYER} and {SAE_LAYER} must have {GRID}x{GRID} tokens at {IMAGE_SIZE} px")

    probe = fit_patch_probe(probe_tokens[:n_train], torch.from_numpy(labels[:n_train]), n_classes=N_LABELS,
                            epochs=settings.probe_epochs, weight_decay=settings.probe_weight_decay,
                            device=backbone.device, seed=seed)
    test_tokens = probe_tokens[n_train:]
    pred = probe.predict(test_tokens.reshape(-1, test_tokens.shape[2])).cpu().numpy()
    target = labels[n_train:].reshape(-1)
    pixel_pred = _pixel_predictions(probe, test_tokens, IMAGE_SIZE)
    probe_info = {"patch_accuracy": float((pred == target).mean()),
                  "digit_patch_accuracy": float((pred == target)[target > 0].mean()),
                  "miou_patches": mean_iou(pred, target, N_LABELS, ignore_class=0),
                  "miou_pixels": mean_iou(pixel_pred, pixel_labels[n_train:], N_LABELS, ignore_class=0),
                  "n_test_patches": int(target.size)}

    flat = sae_tokens.reshape(-1, sae_tokens.shape[2])
    sae = train_small_sae(flat, d_sae=settings.d_sae, k=settings.k, epochs=settings.sae_epochs,
                          batch_size=1024, seed=seed)
    maxima, _, sae_info = sae_summary(sae, flat)
    with torch.no_grad():
        code = sae.encode(flat)
    selected = auto_select_latents(code_pairs(code), labels[:n_train].reshape(-1), purity[:n_train].reshape(-1),
                                   d_sae=settings.d_sae, thresholds=THRESHOLDS, max_freq=settings.max_freq,
                                   min_purity=MIN_PURITY, classes=range(1, N_LABELS))

    def head(px: torch.Tensor) -> torch.Tensor:
        """pixels -> the probe's patch logits [B, GRID*GRID*11] at PROBE_LAYER."""
        seen = {}
        handle = backbone.layer_module(PROBE_LAYER).register_forward_hook(
            lambda module, inputs, output: seen.__setitem__("t", backbone.to_tokens(output)))
        try:
            backbone.forward(px)
        finally:
            handle.remove()
        t = seen["t"]
        return probe(t.reshape(-1, t.shape[2])).reshape(t.shape[0], -1)

    test_labels = labels[n_train:]
    counts = {c: [] for c in CONDITIONS}
    other_digit = {c: [] for c in CONDITIONS}
    classes = []
    for c, sel in tqdm(selected.items(), disable=not progress, desc="classes"):
        rows = np.flatnonzero((test_labels == c).any(1))
        entry = {"class": c, "digit": c - 1, "latent": sel["latent"], "f1": sel["f1"], "threshold": sel["threshold"],
                 "n_pure_train_patches": sel["n_patches"], "n_test_images": int(rows.size)}
        if rows.size == 0:
            classes.append(entry)
            continue
        px = pixels[n_train + rows]
        y = test_labels[rows].reshape(-1)
        kw = dict(latents=[sel["latent"]], scales=[SCALE], maxima=maxima, positions=None, head=head, softmax=False)
        runs = {"auto": intervene(backbone, SAE_LAYER, sae, px, **kw),
                "random_latent": random_latent_edit(backbone, SAE_LAYER, sae, px, seed=seed * 1009 + c,
                                                    per_image=False, **kw),
                "random_vector": random_vector_edit(backbone, SAE_LAYER, sae, px, seed=seed * 1009 + c, **kw)}
        entry["random_latent_id"] = int(runs["random_latent"].latents[0, 0])
        for name, res in runs.items():
            before = res.before.view(rows.size, GRID * GRID, N_LABELS).argmax(2).numpy().reshape(-1)
            after = res.after.view(rows.size, GRID * GRID, N_LABELS).argmax(2).numpy().reshape(-1)
            k = change_counts(before, after, y, c)
            others = (y != c) & (y > 0)
            od = (int(((before != after) & others).sum()), int(others.sum()))
            counts[name].append(k)
            other_digit[name].append(od)
            entry[name] = {"target_rate": k.target_changed / k.target_total if k.target_total else float("nan"),
                           "other_rate": k.other_changed / k.other_total if k.other_total else float("nan"),
                           "other_digit_rate": od[0] / od[1] if od[1] else float("nan")}
        classes.append(entry)
    pooled = {name: _rates(counts[name], other_digit[name]) for name in CONDITIONS}
    result = {"experiment": "segmentation_intervention", "size": size, "seed": seed,
              "settings": dataclasses.asdict(settings), "layers": {"sae": SAE_LAYER, "probe": PROBE_LAYER},
              "image_size": IMAGE_SIZE, "grid": GRID, "scale": SCALE, "thresholds": list(THRESHOLDS),
              "min_purity": MIN_PURITY, "probe": probe_info,
              "sae": {"d_sae": settings.d_sae, "k": settings.k, "epochs": settings.sae_epochs, **sae_info},
              "classes": classes, "pooled": pooled,
              "auto_beats_baselines": bool(pooled["auto"]["target_rate"] > pooled["random_latent"]["target_rate"]
                                           and pooled["auto"]["target_rate"] > pooled["random_vector"]["target_rate"]),
              "seconds": time.perf_counter() - start}
    if keep_arrays:
        result["arrays"] = {"pred": pred, "target": target}
    return result


def main(argv: list[str] | None = None) -> int:
    return experiment_main("segmentation", "Auto-select an SAE latent per digit class on the texture-digit "
                           "segmentation set, set it to -2 x max in every patch of EfficientNet-Lite0's blocks.7, "
                           "and measure the patch probe's target and other change rates against a random latent and "
                           "a random vector of equal norm.", run_segmentation_experiment, argv)


if __name__ == "__main__":
    raise SystemExit(main())
