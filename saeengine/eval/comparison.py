"""Comparing SAEs through concepts (the saev paper's CLIP vs DINOv2 task, and its semprobe).

- :func:`image_scores`: per-image summed codes [n_images, d_sae] from token code pairs.
- :func:`nearest_latent`: the other SAE's latent for a concept = its latent with the
  largest activation summed over the concept's images (paper 2, Fig. 4).
- :func:`concept_f1`: per-latent F1 of "the latent fires on the image" (summed score > 0)
  against "the image shows the concept": F1 = 2 TP / (2 TP + FP + FN), and 0 where the
  denominator is 0 (the latent never fires and there is no positive), as
  sklearn.metrics.f1_score(zero_division=0).
- :func:`f1_significance`: a one-sided Monte-Carlo p-value of a latent's F1 against the
  F1s of n randomly drawn latents, p = (1 + #{random F1 >= F1}) / (1 + n) (Phipson and
  Smyth 2010: never 0, valid for a finite number of draws). The null hypothesis is "the
  chosen latent is no better than a random latent from the same pool"; the smallest
  reachable p is 1 / (1 + n).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .aggregate import per_image
from .probes import as_features


def _scores(scores, what: str = "scores") -> torch.Tensor:
    return as_features(scores, what, dtype=torch.float64)


def _mask(mask, n: int, what: str) -> torch.Tensor:
    m = torch.as_tensor(mask)
    if m.dtype != torch.bool or m.shape != (n,):
        raise InputError(f"{what} must be a bool mask [n_images={n}], got {m.dtype} {list(m.shape)}")
    return m


def image_scores(values: torch.Tensor, indices: torch.Tensor, image: torch.Tensor, position: torch.Tensor,
                 n_images: int, d_sae: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Code pairs of N tokens (values, indices [N, w]; image, position [N]; tokens: an
    optional [N] bool mask, e.g. patches only) -> [n_images, d_sae] float64, each image's
    codes summed over its (masked) tokens."""
    values, indices, image = torch.as_tensor(values), torch.as_tensor(indices), torch.as_tensor(image)
    if values.ndim != 2 or indices.shape != values.shape or image.shape != (values.shape[0],):
        raise InputError(f"image_scores takes values, indices [N, w] and image, position [N]; got "
                         f"{list(values.shape)}, {list(indices.shape)}, {list(image.shape)}")
    fire = values > 0
    if bool(fire.any()):
        top = int(indices[fire].max())
        if int(indices[fire].min()) < 0 or top >= d_sae:
            raise InputError(f"a latent id {top} is outside 0..{d_sae - 1}; pass the SAE's d_sae")
    if image.numel() and (int(image.min()) < 0 or int(image.max()) >= n_images):
        raise InputError(f"image ids must lie in 0..{n_images - 1} (n_images={n_images}); found "
                         f"{int(image.min())}..{int(image.max())}")
    return per_image(values, indices, image, torch.as_tensor(position), tokens).dense_sums(n_images, d_sae)


def nearest_latent(scores_other, concept) -> tuple[int, float]:
    """scores_other [n_img, F] (another SAE's per-image summed codes), concept [n_img]
    bool -> (latent, its activation summed over the concept's images); ties: smallest id."""
    s = _scores(scores_other, "scores_other")
    c = _mask(concept, s.shape[0], "concept")
    if not bool(c.any()):
        raise InputError("nearest_latent: the concept has no images; mark at least one image in concept")
    summed = s[c].double().sum(0)
    latent = int(torch.sort(summed, descending=True, stable=True).indices[0])
    return latent, float(summed[latent])


def concept_f1(scores, positives) -> torch.Tensor:
    """scores [n_img, F] per-image latent scores, positives [n_img] bool -> [F] float64
    F1 of (score > 0) vs positives per latent (0 where undefined, see the module)."""
    s = _scores(scores)
    pos = _mask(positives, s.shape[0], "positives").to(s.device)
    fires = s > 0
    tp = (fires & pos[:, None]).sum(0).double()
    fp = (fires & ~pos[:, None]).sum(0).double()
    fn = pos.sum().double() - tp
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))


def best_latent(scores, positives, candidates: torch.Tensor | None = None) -> tuple[int, float]:
    """The latent (among ``candidates`` [M] int64 ids, default all) with the largest
    concept F1, and that F1; ties: the smallest id."""
    f1 = concept_f1(scores, positives)
    ids = torch.arange(f1.numel(), device=f1.device) if candidates is None else torch.as_tensor(candidates).long()
    if ids.numel() == 0:
        raise InputError("best_latent: no candidate latents")
    sub = f1[ids]
    order = torch.sort(ids).indices  # stable on the ids so ties resolve to the smallest id
    j = order[torch.sort(sub[order], descending=True, stable=True).indices[0]]
    return int(ids[j]), float(sub[j])


def random_latents(pool, n: int, seed: int = 0) -> torch.Tensor:
    """[n] int64 latent ids drawn uniformly with replacement from ``pool`` ([M] ids)."""
    pool = torch.as_tensor(pool).long().cpu()
    if pool.ndim != 1 or pool.numel() == 0:
        raise InputError("random_latents: the pool of latents to draw from is empty")
    gen = torch.Generator().manual_seed(int(seed))
    return pool[torch.randint(pool.numel(), (int(n),), generator=gen)]


def f1_significance(best_f1: float, random_f1s) -> float:
    """One-sided empirical p-value of ``best_f1`` against random_f1s [n] (F1s of random
    latents): (1 + #{random >= best}) / (1 + n)."""
    r = torch.as_tensor(random_f1s, dtype=torch.float64).reshape(-1)
    if r.numel() == 0:
        raise InputError("f1_significance needs at least one random F1")
    return float((1 + int((r >= float(best_f1)).sum())) / (1 + r.numel()))
