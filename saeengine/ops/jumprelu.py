"""JumpReLU with straight-through gradients for its thresholds (Rajamanoharan et al. 2024).

The step H(pre - theta) has no useful derivative in theta. The pseudo-derivative replaces
the Dirac delta with a rectangle kernel of width ``bandwidth``:
d/dtheta H(pre - theta) ~ -(1/bandwidth) * 1{|pre - theta| < bandwidth/2}.
:func:`jumprelu` gives the activation (its threshold gradient is -theta times that
pseudo-derivative), and :func:`step_l0` gives the L0 count whose threshold gradient
trains the sparsity.
"""

from __future__ import annotations

import torch


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
