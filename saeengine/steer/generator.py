"""What a steerable image generator is, and the direction an SAE latent steers along.

A :class:`SteerableGenerator` turns prompts and seeds into images, optionally with a
direction added to one layer of its text encoder: h' = h + alpha * direction. The
diffusers implementation is :class:`saeengine.steer.pipeline.PipelineGenerator`; the
attribute-discovery tests implement the protocol directly with a toy generator.

The steering rule [P] (our spec, after the survey [S] and Concept Steerers [V]; see
docs/steer.md): h' = h + alpha * m_j * d_j, with d_j latent j's unit decoder row mapped
into raw activation space and m_j its largest activation on a prompt corpus.
:func:`latent_direction` builds m_j * d_j.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import InputError
from ..eval._args import is_int


@runtime_checkable
class SteerableGenerator(Protocol):
    """A generator whose text-encoder layer of width ``width`` can be steered."""

    width: int  # d: the steered layer's width (raw activation space)

    def generate(self, prompts: list[str], seeds: list[int], direction: torch.Tensor | None = None,
                 alpha: float = 0.0) -> np.ndarray:
        """uint8 [len(prompts), H, W, 3] images; prompt i is generated with seed seeds[i].

        direction: [width] float32 in raw activation space, added as h' = h + alpha * direction
        at the steered layer (None or alpha=0: the unsteered image, bit for bit).
        """
        ...


def check_latent(sae, latent) -> int:
    """``latent`` as an int in [0, d_sae); InputError naming the valid range otherwise."""
    d_sae = int(sae.cfg.d_sae)
    if not is_int(latent) or not 0 <= int(latent) < d_sae:
        raise InputError(f"latent {latent!r} is out of range: this SAE has latents 0 .. {d_sae - 1}; "
                         "pick one of those (e.g. from its summary's top latents)")
    return int(latent)


def check_alpha(alpha) -> float:
    """``alpha`` as a finite float; InputError otherwise (a NaN or inf alpha would turn the
    whole prompt embedding, and so the image, into NaN)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha={alpha!r} is not a number; pass a finite float such as 4 or -2") from None
    if not math.isfinite(value):
        raise InputError(f"alpha={alpha!r} is not finite; pass a finite float such as 4 or -2")
    return value


@torch.no_grad()
def latent_direction(sae, latent: int, max_activation: float) -> torch.Tensor:
    """[d] float32 = m_j * d_j in raw activation space.

    d_j: latent j's decoder row mapped through the SAE's normalization scale, i.e. the raw-
    space change that decoding one unit of z_j makes: ``norm_scale * W_dec[j]`` (W_dec rows
    are unit vectors in normalized space, so ||d_j|| = norm_scale). m_j: the latent's largest
    activation on a corpus (``saeengine.eval.experiments.common.sae_summary``'s maxima), so
    that alpha = 1 adds what the latent's strongest firing decodes to.

    InputError: latent out of range, m_j not finite.
    """
    latent = check_latent(sae, latent)
    m = float(max_activation)
    if not math.isfinite(m):
        raise InputError(f"max_activation={max_activation!r} of latent {latent} is not finite; "
                         "compute it with saeengine.eval.experiments.common.sae_summary on finite activations")
    scale = float(sae.norm_scale) if sae.cfg.normalization != "none" else 1.0
    return (m * scale) * sae.W_dec[latent].detach().float().cpu()
