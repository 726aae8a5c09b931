"""BatchTopK (Bussmann et al. 2024): the N*k largest relu pre-activations of the whole
batch, so the count per token varies; inference thresholds at an EMA of the smallest kept
activation. The code is padded to the batch's largest count (one host sync reads it) and
decoded like TopK's, with AuxK over the dead latents."""

from __future__ import annotations

import torch

from .. import ops
from ..ops.code import SparseCode
from .base import Encoding, pre_activations, register
from .topk import TopK

THRESHOLD_MOMENTUM = 0.99


def padded_code(act: torch.Tensor, backend: str = "auto") -> SparseCode:
    """Dense non-negative activations [N, F] -> SparseCode [N, w], w the largest count of
    positive entries in a row (one host sync; padding slots are 0). The columns come from
    ops.topk_select; the values are gathered from ``act``, so gradients flow to it."""
    width = max(int((act > 0).sum(1).max()), 1)
    select_backend = backend if backend in ("torch", "cuda") else "auto"
    _, indices = ops.topk_select(act.detach(), width, backend=select_backend)
    return SparseCode(act.gather(1, indices), indices)


@register
class BatchTopK(TopK):
    name = "batchtopk"

    def add_state(self, sae, device):
        # NaN until training has seen a batch; inference then uses batch top-k.
        sae.register_buffer("threshold", torch.full((), float("nan"), device=device, dtype=torch.float32))

    def encode(self, sae, xn, *, k, auxk, kernels):
        act = torch.relu(pre_activations(sae, xn))
        code = self._select(sae, act, k)
        if auxk is not None:
            values, positions = act[:, auxk.latents].topk(auxk.width, dim=1)
            code.aux = SparseCode(values, auxk.latents[positions])
        return Encoding(code)

    def _select(self, sae, act: torch.Tensor, k: int) -> SparseCode:
        if not sae.training and not bool(torch.isnan(sae.threshold)):
            return padded_code(torch.where(act > sae.threshold.to(act.dtype), act, torch.zeros_like(act)))
        flat = act.reshape(-1)
        values, positions = flat.topk(min(act.shape[0] * k, flat.numel()))
        kept = torch.zeros_like(flat).scatter(0, positions, values).reshape(act.shape)
        if sae.training:
            with torch.no_grad():  # EMA of the smallest kept activation, with no host sync
                positive = torch.where(values > 0, values, torch.full_like(values, float("inf")))
                low, old = positive.min().float(), sae.threshold
                m = THRESHOLD_MOMENTUM
                updated = torch.where(torch.isnan(old), low, m * old + (1 - m) * low)
                sae.threshold.copy_(torch.where(torch.isfinite(low), updated, old))
        return padded_code(kept)
