"""Per-image aggregation of token codes: for every (image, latent) pair that fires, the
latent's sum and max over the image's tokens and the position of the max. Exemplars
(image-sum and patch-max rules), image-level probes and concept scores all start here."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageAggregates:
    """M firing (image, latent) pairs, sorted by (image, latent).

    images:   [M] int64 image index.
    latents:  [M] int64 latent id.
    sums:     [M] float64 sum of the latent over the image's tokens.
    maxima:   [M] float32 largest value of the latent on one token of the image.
    argmax:   [M] int64 position of that token (the smallest position on ties).
    """

    images: torch.Tensor
    latents: torch.Tensor
    sums: torch.Tensor
    maxima: torch.Tensor
    argmax: torch.Tensor

    def dense_sums(self, n_images: int, d_sae: int) -> torch.Tensor:
        """[n_images, d_sae] float64 summed codes (only for small sets: n_images x d_sae)."""
        out = torch.zeros(n_images, d_sae, dtype=torch.float64, device=self.sums.device)
        out[self.images, self.latents] = self.sums
        return out


def per_image(values: torch.Tensor, indices: torch.Tensor, image: torch.Tensor, position: torch.Tensor,
              tokens: torch.Tensor | None = None) -> ImageAggregates:
    """values, indices [N, w] (code pairs, 0 = off); image, position [N] int64; tokens: an
    optional [N] bool mask of the tokens to aggregate (e.g. patches only). Entries <= 0 are
    ignored (a latent that does not fire on an image has no pair)."""
    n, w = values.shape
    fire = values > 0
    if tokens is not None:
        fire &= tokens[:, None]
    rows = torch.arange(n, device=values.device)[:, None].expand(n, w)[fire]
    vals, lats = values[fire], indices[fire]
    imgs, poss = image[rows], position[rows]
    if vals.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=values.device)
        return ImageAggregates(empty, empty, empty.double(), empty.float(), empty)
    # One int64 key per (image, latent): a 1-D unique is far faster than unique(dim=0).
    span = int(lats.max()) + 1
    pairs, inverse = torch.unique(imgs * span + lats, sorted=True, return_inverse=True)
    m = pairs.shape[0]
    # index_put_ with accumulate is deterministic on CUDA (index_add_ uses atomics there)
    sums = torch.zeros(m, dtype=torch.float64, device=values.device).index_put_((inverse,), vals.double(),
                                                                                 accumulate=True)
    maxima = torch.full((m,), float("-inf"), device=values.device).scatter_reduce_(
        0, inverse, vals.float(), reduce="amax")
    at_max = vals.float() == maxima[inverse]
    big = torch.iinfo(torch.int64).max
    argmax = torch.full((m,), big, dtype=torch.int64, device=values.device).scatter_reduce_(
        0, inverse[at_max], poss[at_max], reduce="amin")
    return ImageAggregates(torch.div(pairs, span, rounding_mode="floor"), pairs % span, sums, maxima, argmax)
