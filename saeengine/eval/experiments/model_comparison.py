"""Model comparison across styles (paper 2's CLIP vs DINOv2 task, offline): does a
feature extractor + SAE have a latent for a digit that survives a change of style?

MNIST (style A) and scikit-learn's 8x8 digits upsampled to 28x28 (style B) show the same
10 concepts. For each feature extractor:
1. tokens of both styles: EfficientNet-Lite0 ("efficientnet-lite0", ImageNet weights)
   and the same network with random weights ("efficientnet-lite0-random", torch seed =
   ``seed``): the positions of block ``layer``'s feature map on the digits resized to
   ``image_size``. "pixel-pca": the flattened 28x28 pixels projected on the top
   ``pca_components`` principal components (fit on both styles pooled), one token per
   image. Every extractor then goes through the same SAE recipe, so the dictionary
   learning is held fixed and only the features differ; pixel PCA is a linear, context-
   free view of the whole image (the strongest simple pixel baseline we know: a per-patch
   pixel view sees too little of a digit to name it).
2. one TopK SAE (``d_sae``, ``k``) per extractor trained on the tokens of BOTH styles
   pooled (no labels are used; an SAE trained on MNIST alone would meet style B out of
   its distribution, which tests the SAE rather than the features), for ``sae_tokens``
   token draws whatever the token count (so pixel PCA's one token per image gets as
   many steps).
3. per-image summed codes (comparison.image_scores), binarized at > 0 as in saev's
   semprobe.
4. per digit c: on style A, a selection set of ``n_select`` images of c and ``n_select``
   of other digits; the latent with the best F1 there (comparison.best_latent, among the
   SAE's latents). On style B, an evaluation set of all images of c and as many other
   digits: that latent's F1 ("f1_cross"), against ``n_random`` latents drawn uniformly
   from the latents that fire on at least one image ("alive"), with the empirical
   p-value (comparison.f1_significance); the best latent chosen on B itself
   ("f1_oracle_b", an upper bound).
The mean over digits of f1_cross is tested the same way against the means of random
latents (one random latent per digit per draw): "p_value_mean".

A latent that fires on every image has F1 = 2/3 on these balanced sets ("trivial_f1"):
F1 near 2/3 means "no concept", not "two thirds of one".

Run: ``python -m saeengine.eval.experiments.model_comparison --size full --threads 1 --out
benchmarks/results/2026-12-01-model-comparison.json`` (about 13 minutes on one CPU thread;
the numbers depend on the thread count in the last bits, hence ``--threads``).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ...errors import InputError
from ..batch import code_pairs
from ..comparison import best_latent, concept_f1, f1_significance, image_scores, random_latents
from ..datasets import N_CLASSES, mnist_digits, sklearn_digits
from ..metrics import reconstruction_metrics
from .common import block_tokens, experiment_main, pixels_of, train_small_sae

EXTRACTORS = ("efficientnet-lite0", "efficientnet-lite0-random", "pixel-pca")


@dataclasses.dataclass(frozen=True)
class Settings:
    """n_mnist, n_sklearn: images per style (None = all: 5000 and 1797); image_size: the
    networks' input side; layer: their block; pca_components: pixel PCA's width; d_sae,
    k: every SAE's width and TopK k; sae_tokens, batch_size: token draws per SAE and
    its batch; n_select: positives
    (and negatives) per digit on style A; n_random: random latents per digit."""
    n_mnist: int | None
    n_sklearn: int | None
    image_size: int
    layer: str
    pca_components: int
    d_sae: int
    k: int
    sae_tokens: int
    batch_size: int
    n_select: int
    n_random: int


SIZES = {
    "small": Settings(n_mnist=200, n_sklearn=200, image_size=64, layer="blocks.10", pca_components=32, d_sae=256,
                      k=8, sae_tokens=50_000, batch_size=512, n_select=20, n_random=200),
    "full": Settings(n_mnist=None, n_sklearn=None, image_size=112, layer="blocks.10", pca_components=64, d_sae=1024,
                     k=8, sae_tokens=3_000_000, batch_size=1024, n_select=100, n_random=2000),
}


# ----- features -------------------------------------------------------------------------------
def _network(name: str, seed: int):
    from ...backbones import efficientnet_lite, load_backbone

    if name == "efficientnet-lite0":
        return load_backbone("efficientnet-lite0")
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(seed)  # the random weights come from torch's global generator
    return efficientnet_lite(EfficientNet.from_name("efficientnet-lite0"))


def extractor_tokens(name: str, images_a: np.ndarray, images_b: np.ndarray, settings: Settings,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 digits [n_a, 28, 28] and [n_b, 28, 28] -> tokens [n_a, T, d], [n_b, T, d]
    float32 of extractor ``name`` (one of EXTRACTORS)."""
    if name == "pixel-pca":
        from sklearn.decomposition import PCA

        flat = np.concatenate([images_a, images_b]).reshape(len(images_a) + len(images_b), -1) / 255.0
        pca = PCA(n_components=settings.pca_components, random_state=seed).fit(flat)
        z = torch.from_numpy(pca.transform(flat)).float()[:, None, :]
        return z[:len(images_a)], z[len(images_a):]
    if name not in EXTRACTORS:
        raise InputError(f"unknown extractor {name!r}; choose one of {list(EXTRACTORS)}")
    backbone = _network(name, seed)
    return tuple(block_tokens(backbone, settings.layer, pixels_of(imgs, backbone, settings.image_size))
                 for imgs in (images_a, images_b))


def sae_image_scores(tokens_a: torch.Tensor, tokens_b: torch.Tensor, settings: Settings,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train the SAE on both styles' tokens pooled -> per-image summed codes [n_a, d_sae],
    [n_b, d_sae] float64 and {"fvu", "l0", "epochs"} of the SAE on the pooled tokens."""
    n_a, t, d = tokens_a.shape
    flat = torch.cat([tokens_a, tokens_b]).reshape(-1, d)
    epochs = max(1, round(settings.sae_tokens / flat.shape[0]))
    sae = train_small_sae(flat, d_sae=settings.d_sae, k=settings.k, epochs=epochs, batch_size=settings.batch_size,
                          seed=seed)
    with torch.no_grad():
        code = sae.encode(flat)
        x_hat = sae.decode(code)
    values, indices = code_pairs(code)
    n = flat.shape[0] // t
    image = torch.arange(n).repeat_interleave(t)
    position = torch.arange(t).repeat(n)
    scores = image_scores(values, indices, image, position, n, settings.d_sae)
    scored = reconstruction_metrics(flat, x_hat, values)
    info = {"fvu": scored["fvu"], "l0": scored["l0"], "epochs": epochs}
    return scores[:n_a], scores[n_a:], info


# ----- concept sets and scores ----------------------------------------------------------------
def balanced_set(labels: np.ndarray, digit: int, n_pos: int | None, rng: np.random.Generator):
    """Rows of ``n_pos`` images of ``digit`` (all of them when None or more than there
    are) and as many of other digits -> (rows [m] int64, positives [m] bool)."""
    pos = np.flatnonzero(labels == digit)
    neg = np.flatnonzero(labels != digit)
    m = min(pos.size if n_pos is None else n_pos, pos.size, neg.size)
    rows = np.concatenate([rng.choice(pos, m, replace=False), rng.choice(neg, m, replace=False)])
    return torch.from_numpy(rows), torch.from_numpy(np.arange(2 * m) < m)


def cross_style(scores_a: torch.Tensor, labels_a: np.ndarray, scores_b: torch.Tensor, labels_b: np.ndarray,
                settings: Settings, seed: int = 0) -> dict:
    """Per digit: best-F1 latent on style A's selection set, its F1 on style B's evaluation
    set vs random alive latents (see the module docstring) -> a JSON-able dict."""
    rng = np.random.default_rng(seed)
    alive = torch.nonzero((scores_a > 0).any(0) | (scores_b > 0).any(0)).flatten()
    if alive.numel() == 0:
        raise InputError("no latent of the SAE fires on any image; the SAE is dead (train it longer)")
    digits, random_table = [], []
    for c in range(N_CLASSES):
        rows_a, pos_a = balanced_set(labels_a, c, settings.n_select, rng)
        rows_b, pos_b = balanced_set(labels_b, c, None, rng)
        latent, f1_select = best_latent(scores_a[rows_a], pos_a)
        f1_b = concept_f1(scores_b[rows_b], pos_b)
        oracle, f1_oracle = best_latent(scores_b[rows_b], pos_b)
        draws = random_latents(alive, settings.n_random, seed=seed * 1000 + c)
        random_f1 = f1_b[draws]
        random_table.append(random_f1)
        digits.append({"digit": c, "latent": latent, "f1_select": f1_select, "f1_cross": float(f1_b[latent]),
                       "random_f1_mean": float(random_f1.mean()), "random_f1_std": float(random_f1.std()),
                       "p_value": f1_significance(float(f1_b[latent]), random_f1),
                       "oracle_latent_b": oracle, "f1_oracle_b": f1_oracle,
                       "n_select": int(pos_a.sum()), "n_eval": int(pos_b.sum())})
    mean = lambda key: float(np.mean([d[key] for d in digits]))  # noqa: E731
    random_means = torch.stack(random_table).mean(0)  # [n_random]: one random latent per digit per draw
    mean_cross = mean("f1_cross")
    return {"alive_latents": int(alive.numel()), "digits": digits, "mean_f1_select": mean("f1_select"),
            "mean_f1_cross": mean_cross, "mean_random_f1": float(random_means.mean()),
            "p_value_mean": f1_significance(mean_cross, random_means), "mean_f1_oracle_b": mean("f1_oracle_b"),
            "n_significant_05": sum(d["p_value"] < 0.05 for d in digits)}


# ----- the experiment ------------------------------------------------------------------------
def run_model_comparison(size: str = "small", seed: int = 0, progress: bool = False,
                         extractors: tuple[str, ...] = EXTRACTORS) -> dict:
    """Run the experiment (module docstring) at ``size`` "small" (the tests' size, ~7 s on one idle
    CPU thread) or "full" -> a JSON-able dict: {"experiment", "size", "seed", "settings",
    "n_mnist", "n_sklearn", "trivial_f1", "extractors": {name: {"tokens_per_image",
    "d_in", "sae": {"fvu", "l0", "epochs"}, "seconds", **cross_style's fields}},
    "ranking" (extractors by mean_f1_cross, best first), "real_beats_random",
    "real_beats_pca" (mean_f1_cross strictly higher), "seconds"}."""
    if size not in SIZES:
        raise InputError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    unknown = [e for e in extractors if e not in EXTRACTORS]
    if unknown:
        raise InputError(f"unknown extractors {unknown}; choose from {list(EXTRACTORS)}")
    settings = SIZES[size]
    start = time.perf_counter()
    images_a, labels_a = mnist_digits(settings.n_mnist, seed=seed)
    images_b, labels_b = sklearn_digits(settings.n_sklearn, size=28, seed=seed)
    from tqdm.auto import tqdm

    results = {}
    for name in tqdm(extractors, disable=not progress, desc="extractors"):
        t0 = time.perf_counter()
        tokens_a, tokens_b = extractor_tokens(name, images_a, images_b, settings, seed)
        scores_a, scores_b, sae_info = sae_image_scores(tokens_a, tokens_b, settings, seed)
        results[name] = {"tokens_per_image": int(tokens_a.shape[1]), "d_in": int(tokens_a.shape[2]), "sae": sae_info,
                         **cross_style(scores_a, labels_a, scores_b, labels_b, settings, seed),
                         "seconds": time.perf_counter() - t0}
    ranking = sorted(results, key=lambda n: -results[n]["mean_f1_cross"])
    real = results.get("efficientnet-lite0", {}).get("mean_f1_cross")

    def beats(other):
        return None if real is None or other not in results else bool(real > results[other]["mean_f1_cross"])
    return {"experiment": "model_comparison", "size": size, "seed": seed, "settings": dataclasses.asdict(settings),
            "n_mnist": int(len(labels_a)), "n_sklearn": int(len(labels_b)), "trivial_f1": 2 / 3,
            "extractors": results, "ranking": ranking, "real_beats_random": beats("efficientnet-lite0-random"),
            "real_beats_pca": beats("pixel-pca"), "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    return experiment_main("model_comparison", "Cross-style concept F1 (MNIST -> sklearn digits) of the best SAE "
                           "latent for EfficientNet-Lite0, its random-weight twin and pixel PCA.",
                           run_model_comparison, argv)


if __name__ == "__main__":
    raise SystemExit(main())
