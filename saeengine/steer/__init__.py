"""Steering a diffusion pipeline through its text encoder with SAE latents.

- :mod:`.generator`: the :class:`SteerableGenerator` protocol and :func:`latent_direction`
  (m_j * d_j), no diffusers needed;
- :mod:`.hooks`: the context manager that adds alpha * direction to one encoder block's
  output (all tokens, or only where the latent fires);
- :mod:`.pipeline`: :class:`PipelineGenerator` over a diffusers Stable Diffusion / SDXL
  pipeline, and :func:`load_generator` for a local pipeline folder;
- :mod:`.train`: an SAE trained on a prompt corpus at the steered layer, with m_j;
- :mod:`.sweep`: the alpha sweep (image grids, image-space and classifier metrics, CLIP
  scores), its JSON and HTML report.

The modules that need diffusers (pipeline, sweep) load when first named here.
"""

from __future__ import annotations

import importlib

from .generator import SteerableGenerator, check_alpha, check_latent, latent_direction

_LAZY = {"PipelineGenerator": "pipeline", "load_generator": "pipeline", "steer_layer": "hooks",
         "SteeringEdit": "hooks", "train_prompt_sae": "train", "alpha_sweep": "sweep", "write_sweep": "sweep"}

__all__ = ["SteerableGenerator", "check_alpha", "check_latent", "latent_direction", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
