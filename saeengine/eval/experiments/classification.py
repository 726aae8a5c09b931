"""Classification intervention on real offline data (paper 2's task 3, on EfficientNet-Lite0
and MNIST): suppressing the SAE latents that carry a digit's evidence lowers the frozen
probe's probability of the true digit more than suppressing random latents or adding
random vectors of equal norm.

1. Model and head: EfficientNet-Lite0 with its ImageNet weights, digits resized to 96 px;
   a linear probe (saeengine.eval.probes.fit_probe, full-batch L-BFGS) on the pooled
   1280-d embedding (common.efficientnet_pooled), trained on ``n_probe_train`` digits;
   its accuracy on the ``n_test`` test digits (disjoint) is reported.
2. SAE: a TopK SAE (``d_sae``, ``k``) on the tokens of ``blocks.4`` (the last block at
   stride 8: a 12 x 12 map of 40 channels at 96 px, so a token sees a stroke-sized part
   of the digit) of ``n_sae_images`` training digits. maxima m_j and frequencies come
   from the codes of those tokens.
3. Discovery, per test digit (the paper's Fig. 3 procedure with the patches chosen
   automatically): the ``n_patches`` positions whose tokens most support the true class,
   by gradient x activation of log p(true) at blocks.4 (sum over channels of
   x_p * d log p / d x_p); then the ``n_latents`` latents with the largest sum of codes
   over those positions.
4. Edit: those latents set to ``s * m_j`` at those positions (error term kept), for each
   s in ``scales``; the main setting is s = 0 (the features removed). Baselines with the
   same positions and scale rule: as many random latents (not chosen, ever fired), and a
   random unit vector times the chosen edit's own change norm at each token
   (interventions.random_vector_edit). Note: at s = 0 a random latent is usually not
   active at the chosen positions, so its edit is mostly empty ("random_latent_active"
   reports how often at least one was active).
5. Reported per condition (intervention_effects.classification_effect): Δp(true) mean/std, flip
   rate (true top-1 lost, among digits classified correctly before), top-1 change rate;
   a one-sided paired Wilcoxon p-value of chosen Δp < baseline Δp; and the stated margin:
   the chosen latents beat a baseline when their mean Δp(true) is at least
   ``MARGIN`` lower AND their flip rate at least ``MARGIN`` higher.

Run: ``python -m saeengine.eval.experiments.classification --size full --out
benchmarks/results/2026-12-01-classification-intervention.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from ..batch import code_pairs
from ..datasets import N_CLASSES, mnist_digits
from ..intervention_effects import classification_effect
from ..interventions import intervene, random_latent_edit, random_vector_edit
from ..probes import accuracy, fit_probe
from .common import (block_tokens, efficientnet_pooled, experiment_main, experiment_setup, pixels_of, sae_summary,
                     train_small_sae)

LAYER = "blocks.4"
IMAGE_SIZE = 96
BATCH = 25  # test digits per forward (each with its own patches and latents)
MARGIN = 0.05  # chosen latents: Δp(true) >= 0.05 lower and flip rate >= 0.05 higher than each baseline


@dataclasses.dataclass(frozen=True)
class Settings:
    """n_probe_train: digits the probe trains on (the SAE's digits are the first
    n_sae_images of them); n_test: test digits (disjoint); d_sae, k, sae_epochs: the
    SAE; n_patches, n_latents: discovery; scales: the s of each edit (the first is the
    main setting); probe_epochs, probe_weight_decay: the L-BFGS probe."""
    n_probe_train: int
    n_sae_images: int
    n_test: int
    d_sae: int
    k: int
    sae_epochs: int
    n_patches: int = 16
    n_latents: int = 5
    scales: tuple[float, ...] = (0.0,)
    probe_epochs: int = 100
    probe_weight_decay: float = 1e-3


SIZES = {
    "small": Settings(n_probe_train=250, n_sae_images=120, n_test=40, d_sae=256, k=8, sae_epochs=10),
    "full": Settings(n_probe_train=2000, n_sae_images=1000, n_test=250, d_sae=512, k=8, sae_epochs=5,
                     scales=(0.0, -1.0)),
}


def paired_p_value(chosen: np.ndarray, baseline: np.ndarray) -> float:
    """One-sided paired Wilcoxon signed-rank p-value of chosen < baseline (NaN when every
    pair is equal)."""
    from scipy.stats import wilcoxon

    if np.all(chosen == baseline):
        return float("nan")
    return float(wilcoxon(chosen, baseline, alternative="less").pvalue)


# ----- discovery ------------------------------------------------------------------------------
def discover(backbone, sae, head, pixels: torch.Tensor, true: torch.Tensor, n_patches: int,
             n_latents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] with true classes [B] -> (positions [B, T] bool: each image's
    n_patches tokens of LAYER with the largest gradient x activation of log p(true),
    latents [B, n_latents]: the largest summed codes over those tokens, codes [B,
    n_patches, d_sae] there). The images of a batch do not interact (eval mode), so the
    gradient of the summed log-probabilities is each image's own."""
    seen = {}

    def catch(module, inputs, output):  # returns None: the output is only read
        seen["out"] = output

    handle = backbone.layer_module(LAYER).register_forward_hook(catch)
    try:
        with torch.enable_grad():
            log_p = head(pixels).log_softmax(1)
            (grad,) = torch.autograd.grad(log_p[torch.arange(len(true)), true].sum(), seen["out"])
    finally:
        handle.remove()
    tokens = backbone.to_tokens(seen["out"].detach())
    b, t, d = tokens.shape
    support = (backbone.to_tokens(grad) * tokens).sum(2)
    top = support.topk(min(n_patches, t), dim=1).indices  # [B, n_patches]
    positions = torch.zeros(b, t, dtype=torch.bool, device=tokens.device).scatter_(1, top, True)
    chosen = tokens.gather(1, top[..., None].expand(-1, -1, d)).reshape(-1, d)
    with torch.no_grad():
        values, indices = code_pairs(sae.encode(chosen))
    codes = torch.zeros(chosen.shape[0], sae.cfg.d_sae, device=values.device).scatter_add_(1, indices, values)
    codes = codes.view(b, top.shape[1], -1)
    return positions.cpu(), codes.sum(1).topk(n_latents, dim=1).indices.cpu(), codes.cpu()


# ----- the experiment -------------------------------------------------------------------------
def run_classification_experiment(size: str = "small", seed: int = 0, progress: bool = False) -> dict:
    """Run the experiment (module docstring) at ``size`` "small" (the tests' size) or
    "full" -> a JSON-able dict: {"experiment", "size", "seed", "settings", "layer",
    "image_size", "tokens_per_image", "margin", "probe": {"train_accuracy",
    "test_accuracy", "n_train", "n_test"}, "sae": {"d_sae", "k", "epochs", "fvu", "l0",
    "alive"}, "scales": {str(s): {"chosen", "random_latent", "random_vector" (each
    classification_effect's dict), "random_latent_active", "p_value_vs_random_latent",
    "p_value_vs_random_vector", "beats_random_latent", "beats_random_vector",
    "flips_to" ({"true->new": count} of the chosen edit)}}, "main_scale",
    "beats_baselines" (both, at the main scale), "seconds"}."""
    settings, backbone, start = experiment_setup(size, SIZES, seed)
    images, labels = mnist_digits(seed=seed)
    train = slice(0, settings.n_probe_train)
    test = slice(len(labels) - settings.n_test, len(labels))
    pixels_train = pixels_of(images[train], backbone, IMAGE_SIZE)
    pixels_test = pixels_of(images[test], backbone, IMAGE_SIZE)
    y_train, y_test = labels[train], labels[test]

    pooled = efficientnet_pooled(backbone)
    with torch.no_grad():
        feats_train = torch.cat([pooled(pixels_train[i:i + 128]) for i in range(0, len(y_train), 128)])
        feats_test = pooled(pixels_test)
    probe = fit_probe(feats_train, y_train, n_classes=N_CLASSES, epochs=settings.probe_epochs,
                      weight_decay=settings.probe_weight_decay, device=backbone.device, seed=seed)

    def head(pixels: torch.Tensor) -> torch.Tensor:
        return probe(pooled(pixels))

    tokens = block_tokens(backbone, LAYER, pixels_train[:settings.n_sae_images])
    flat = tokens.reshape(-1, tokens.shape[2])
    sae = train_small_sae(flat, d_sae=settings.d_sae, k=settings.k, epochs=settings.sae_epochs, batch_size=1024,
                          seed=seed)
    maxima, _, sae_info = sae_summary(sae, flat)

    records = {s: {"chosen": [], "random_latent": [], "random_vector": [], "active": []} for s in settings.scales}
    y_test_t = torch.from_numpy(y_test)
    for chunk, first in enumerate(tqdm(range(0, len(y_test), BATCH), disable=not progress, desc="test digits")):
        px, true = pixels_test[first:first + BATCH], y_test_t[first:first + BATCH]
        positions, latents, codes = discover(backbone, sae, head, px, true, settings.n_patches, settings.n_latents)
        for s in settings.scales:
            kw = dict(latents=latents, scales=[s] * latents.shape[1], maxima=maxima, positions=positions, head=head)
            rec = records[s]
            rec["chosen"].append(intervene(backbone, LAYER, sae, px, **kw))
            rnd = random_latent_edit(backbone, LAYER, sae, px, seed=seed * 1_000_003 + chunk, **kw)
            rec["random_latent"].append(rnd)
            rec["active"] += [bool((codes[b][:, rnd.latents[b]] > 0).any()) for b in range(len(true))]
            rec["random_vector"].append(random_vector_edit(backbone, LAYER, sae, px, seed=seed * 1_000_003 + chunk,
                                                           **kw))

    by_scale = {}
    for s, rec in records.items():
        out, deltas = {}, {}
        for name in ("chosen", "random_latent", "random_vector"):
            before = torch.cat([r.before for r in rec[name]])
            after = torch.cat([r.after for r in rec[name]])
            out[name] = classification_effect(before, after, y_test)
            rows, true = torch.arange(len(y_test)), torch.from_numpy(y_test)
            deltas[name] = (after[rows, true] - before[rows, true]).double().numpy()
        chosen = out["chosen"]
        for name in ("random_latent", "random_vector"):
            out[f"p_value_vs_{name}"] = paired_p_value(deltas["chosen"], deltas[name])
            out[f"beats_{name}"] = bool(chosen["delta_p_true_mean"] <= out[name]["delta_p_true_mean"] - MARGIN
                                        and chosen["flip_rate"] >= out[name]["flip_rate"] + MARGIN)
        out["random_latent_active"] = float(np.mean(rec["active"]))
        after_top = torch.cat([r.after for r in rec["chosen"]]).argmax(1).numpy()
        before_top = torch.cat([r.before for r in rec["chosen"]]).argmax(1).numpy()
        flips = Counter(f"{t}->{a}" for t, b, a in zip(y_test, before_top, after_top) if b == t and a != t)
        out["flips_to"] = dict(sorted(flips.items(), key=lambda kv: -kv[1]))
        by_scale[str(s)] = out
    main = str(settings.scales[0])
    return {"experiment": "classification_intervention", "size": size, "seed": seed,
            "settings": dataclasses.asdict(settings), "layer": LAYER, "image_size": IMAGE_SIZE,
            "tokens_per_image": int(tokens.shape[1]), "margin": MARGIN,
            "probe": {"train_accuracy": accuracy(probe, feats_train, y_train),
                      "test_accuracy": accuracy(probe, feats_test, y_test),
                      "n_train": int(len(y_train)), "n_test": int(len(y_test))},
            "sae": {"d_sae": settings.d_sae, "k": settings.k, "epochs": settings.sae_epochs, **sae_info},
            "scales": by_scale, "main_scale": float(settings.scales[0]),
            "beats_baselines": by_scale[main]["beats_random_latent"] and by_scale[main]["beats_random_vector"],
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    return experiment_main("classification", "Suppress the SAE latents of a digit's most supportive patches in "
                           "EfficientNet-Lite0 and measure the MNIST probe's Δp(true) and flip rate against random "
                           "latents and random vectors of equal norm.", run_classification_experiment, argv)


if __name__ == "__main__":
    raise SystemExit(main())
