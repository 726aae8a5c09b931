"""ReLU SAE: every latent with a positive pre-activation fires; an L1 penalty (weighted by
the trainer, with its warm-up) keeps the code sparse. Dense code, dense decode."""

from __future__ import annotations

import torch

from .base import Architecture, Encoding, pre_activations, register
from .dense import DenseCode


@register
class ReLU(Architecture):
    name = "relu"

    def encode(self, sae, xn, *, k, auxk, kernels):
        act = torch.relu(pre_activations(sae, xn))
        # L1 of the activations: the decoder rows have unit norm
        return Encoding(DenseCode(act), penalty=act.float().sum(1).mean())
