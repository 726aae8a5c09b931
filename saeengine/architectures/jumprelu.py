"""JumpReLU SAE (Rajamanoharan et al. 2024): a latent fires where its pre-activation
exceeds its learned threshold theta = exp(log_threshold); an L0 penalty (weighted by the
trainer) trains the thresholds. Dense code, dense decode.

The step H(pre - theta) has no useful derivative in theta. The pseudo-derivative replaces
the Dirac delta with a rectangle kernel of width ``bandwidth``:
d/dtheta H(pre - theta) ~ -(1/bandwidth) * 1{|pre - theta| < bandwidth/2}.
:func:`jumprelu` gives the activation (its threshold gradient is -theta times that
pseudo-derivative), and :func:`step_l0` gives the L0 count whose threshold gradient
trains the sparsity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Architecture, Encoding, pre_activations, register
from .dense import DenseCode


def _window(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return torch.where(pre > threshold, pre, torch.zeros_like(pre))

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_pre = torch.where(pre > threshold, grad, torch.zeros_like(grad))
        grad_threshold = -(threshold * _window(pre, threshold, ctx.bandwidth) * grad).sum(0)
        return grad_pre, grad_threshold, None


class _StepL0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_threshold = -(_window(pre, threshold, ctx.bandwidth) * grad).sum(0)
        return None, grad_threshold, None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """pre [N, F], threshold [F] -> pre where pre > threshold, else 0."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step_l0(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """pre [N, F], threshold [F] -> [N, F] 0/1 indicators of pre > threshold."""
    return _StepL0.apply(pre, threshold, bandwidth)


@register
class JumpReLU(Architecture):
    name = "jumprelu"

    @classmethod
    def check_config(cls, cfg):
        for field in ("jumprelu_threshold", "jumprelu_bandwidth"):
            value = getattr(cfg, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SAEConfig.{field}={value!r} is invalid: it must be a positive number")

    def add_state(self, sae, device):
        init = math.log(self.cfg.jumprelu_threshold)
        sae.log_threshold = nn.Parameter(torch.full((self.cfg.d_sae,), init, device=device, dtype=torch.float32))

    def encode(self, sae, xn, *, k, auxk, kernels):
        pre = pre_activations(sae, xn)
        threshold = sae.log_threshold.exp().to(pre.dtype)
        bandwidth = self.cfg.jumprelu_bandwidth
        penalty = step_l0(pre, threshold, bandwidth).float().sum(1).mean()
        return Encoding(DenseCode(jumprelu(pre, threshold, bandwidth)), penalty=penalty)
