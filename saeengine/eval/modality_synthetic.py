"""The modality task's planted-direction check: synthetic (image, caption) pairs whose
concepts share one direction across modalities, or use disjoint directions (the control),
and the demo that analyses both (docs/modality.md, "The synthetic check")."""

from __future__ import annotations

import torch

from ..errors import InputError
from ._args import count
from .modality import MIN_RATE, SHARED_HIGH, SHARED_LOW
from .modality_layers import ModalityTokens, analyze


def synthetic_pairs(*, n_pairs: int = 240, d: int = 48, n_concepts: int = 12, n_styles: int = 8,
                    image_tokens: int = 6, caption_tokens: int = 4, shared: bool = True, noise: float = 0.05,
                    seed: int = 0) -> ModalityTokens:
    """Pairs whose image and caption tokens carry the pair's concept, beside features of
    their own modality ("styles").

    Every pair i has a concept c_i (uniform over n_concepts). Every token is the sum of two
    features with amplitudes ~ U(1, 2), plus N(0, noise^2) noise per dimension: slot 1 is
    the pair's concept (probability 0.8 on image tokens, 0.7 on caption tokens), else a
    style; slot 2 is a style, another than slot 1's. Image tokens draw their styles from
    n_styles image-only directions v, caption tokens from n_styles text-only directions w.
    The concept is u_img[c_i] on image tokens and u_txt[c_i] on caption tokens. All
    directions are orthonormal. shared=True: u_img = u_txt (one direction per concept in
    both modalities: its latents should be shared); shared=False, the control: u_img and
    u_txt are disjoint (no latent should be shared, the grounding is at chance). Two
    features per token: a TopK SAE with k = 2 has no slot left to fire on noise. The
    layer is named "planted-shared" or "disjoint-control"; each pair is image_tokens image
    tokens then caption_tokens caption tokens.
    """
    n_pairs, d, n_concepts = count("n_pairs", n_pairs, 2), count("d", d), count("n_concepts", n_concepts)
    n_styles = count("n_styles", n_styles, 2)
    image_tokens, caption_tokens = count("image_tokens", image_tokens), count("caption_tokens", caption_tokens)
    needed = n_concepts * (1 if shared else 2) + 2 * n_styles
    if d < needed:
        raise InputError(f"d={d} cannot hold {needed} orthonormal directions; use d >= {needed}")
    gen = torch.Generator().manual_seed(int(seed))
    basis = torch.linalg.qr(torch.randn(d, needed, generator=gen, dtype=torch.float64))[0].T.float()  # [needed, d]
    u_img = basis[:n_concepts]
    u_txt = u_img if shared else basis[n_concepts:2 * n_concepts]
    v, w = basis[needed - 2 * n_styles:needed - n_styles], basis[needed - n_styles:]
    concept = torch.randint(n_concepts, (n_pairs,), generator=gen)
    per_pair = image_tokens + caption_tokens
    image = torch.tensor(([True] * image_tokens + [False] * caption_tokens) * n_pairs)
    pair = torch.arange(n_pairs).repeat_interleave(per_pair)
    n = n_pairs * per_pair
    c = concept[pair]
    style = torch.randint(n_styles, (n,), generator=gen)
    other = (style + 1 + torch.randint(n_styles - 1, (n,), generator=gen)) % n_styles
    picks = torch.stack([style, other], 1)  # [n, 2]
    styles = torch.where(image[:, None, None], v[picks], w[picks])  # [n, 2, d]
    has_concept = torch.rand(n, generator=gen) < torch.where(image, 0.8, 0.7)
    first = torch.where(has_concept[:, None], torch.where(image[:, None], u_img[c], u_txt[c]), styles[:, 1])
    amp = 1 + torch.rand(n, 2, generator=gen)
    tokens = amp[:, :1] * first + amp[:, 1:] * styles[:, 0] + noise * torch.randn(n, d, generator=gen)
    name = "planted-shared" if shared else "disjoint-control"
    return ModalityTokens(layers={name: tokens}, image=image, pair=pair, caption=~image,
                          directions={name: {"image": u_img, "text": u_txt}})


def synthetic_demo(*, seed: int = 0, d_sae: int = 64, k: int = 2, epochs: int = 20, low: float = SHARED_LOW,
                   high: float = SHARED_HIGH, min_rate: float = MIN_RATE, min_share: float = 0.0,
                   progress: bool = True, **pairs) -> dict:
    """The planted-direction demo: synthetic_pairs (``pairs``: its options) with shared
    concept directions and the disjoint control, drawn with the same seed (so the same
    pairs, concepts and layout), each analysed as one "layer" by analyze()."""
    shared, control = (synthetic_pairs(shared=flag, seed=seed, **pairs) for flag in (True, False))
    data = ModalityTokens(layers={**shared.layers, **control.layers}, image=shared.image, pair=shared.pair,
                          caption=shared.caption, directions={**shared.directions, **control.directions})
    return analyze(data, d_sae=d_sae, k=k, epochs=epochs, seed=seed, low=low, high=high, min_rate=min_rate,
                   min_share=min_share, progress=progress)
