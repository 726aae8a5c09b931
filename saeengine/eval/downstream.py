"""Downstream metrics: how much of a model's behaviour survives when an SAE's reconstruction
replaces one layer (SAEBench's kl_div_score, with the frozen head's class distribution in
place of next-token logits).

For every image i with clean class probabilities p_i = softmax(head(pixels_i)) and the
probabilities q_i of a modified run:

    KL(p || q) = mean_i sum_c p_ic (log p_ic - log q_ic)        (from log_softmax, float64)

Modified runs: "sae" (the layer's output becomes decode(encode(x)), no error term),
"zero" (the layer's output becomes 0) and "mean" (every token becomes the per-channel mean
of the layer's tokens over the given images, or ``mean_activation``). Then

    kl_recovered_zero = (KL_zero - KL_sae) / KL_zero,   kl_recovered_mean likewise

(1 = the SAE keeps the head's distribution, 0 = no better than ablating; NaN when the
ablation leaves the distribution unchanged) and top1_agreement_* = the share of images
whose top-1 class is the clean one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from ..backbones.splice import splice
from ..errors import InputError
from ._args import is_int
from .interventions import _check_head_output


@contextmanager
def _replaced(backbone: Backbone, layer: str, value: torch.Tensor | None):
    """Inside: the layer's every token becomes ``value`` [d] (None: zeros)."""
    def hook(module, inputs, output):
        tokens = backbone.to_tokens(output)
        fill = torch.zeros_like(tokens) if value is None else value.to(tokens).expand_as(tokens)
        return backbone.from_tokens(output, fill.contiguous())

    handle = backbone.layer_module(layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _layer_mean(backbone: Backbone, layer: str, head, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[d] float32 mean over every token of every image at ``layer`` (float64 sums)."""
    acc: dict[str, torch.Tensor] = {}

    def catch(module, inputs, output):  # returns None: nothing is replaced
        tokens = backbone.to_tokens(output).double()
        acc["sum"] = acc.get("sum", 0) + tokens.sum((0, 1))
        acc["n"] = acc.get("n", 0) + tokens.shape[0] * tokens.shape[1]

    handle = backbone.layer_module(layer).register_forward_hook(catch)
    try:
        for start in range(0, pixels.shape[0], batch_size):
            head(pixels[start:start + batch_size].to(backbone.device))
    finally:
        handle.remove()
    if "sum" not in acc:
        raise InputError(f"the head never ran {layer}; pass a head that runs the backbone on the pixels")
    return (acc["sum"] / acc["n"]).float()


def _kl_and_agreement(clean: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    logp, logq = clean.double().log_softmax(1), other.double().log_softmax(1)
    kl = (logp.exp() * (logp - logq)).sum(1)
    return float(kl.mean()), float((clean.argmax(1) == other.argmax(1)).double().mean())


def downstream_metrics(backbone: Backbone, layer: str, sae, pixels: torch.Tensor, *,
                       head: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 32,
                       mean_activation: torch.Tensor | None = None, progress: bool = False) -> dict:
    """KL and top-1 agreement of the head's class distribution, clean vs SAE-spliced
    (reconstruction only) and vs zero- and mean-ablation of ``layer``, and KL recovered.

    Args:
        pixels: [n, 3, H, W] preprocessed images, run ``batch_size`` at a time.
        head: pixels -> logits [B, C] (default ``backbone.forward``); it must run the layer.
        mean_activation: [d] the mean-ablation value (default: the mean of the layer's
            tokens over these images, one extra pass).
        progress: a progress bar over the batches (4 forward passes each).
    Returns a dict of floats: kl_sae, kl_zero, kl_mean, kl_recovered_zero,
    kl_recovered_mean, top1_agreement_sae, top1_agreement_zero, top1_agreement_mean, and
    n_images.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[0] == 0:
        raise InputError("pixels must be a non-empty tensor [n, 3, H, W] of preprocessed images")
    if not is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    head = head or backbone.forward
    if mean_activation is None:
        mean_activation = _layer_mean(backbone, layer, head, pixels, batch_size)
    mean_activation = torch.as_tensor(mean_activation).float().reshape(-1)
    if mean_activation.numel() != sae.cfg.d_in:
        raise InputError(f"mean_activation has {mean_activation.numel()} values; {layer} has d={sae.cfg.d_in} "
                         "channels (the SAE's d_in)")
    runs = {"clean": [], "sae": [], "zero": [], "mean": []}
    with torch.no_grad():
        starts = range(0, pixels.shape[0], batch_size)
        for start in tqdm(starts, desc="downstream", unit="batch", disable=not progress, dynamic_ncols=True):
            chunk = pixels[start:start + batch_size].to(backbone.device)
            seen = []
            handle = backbone.layer_module(layer).register_forward_hook(lambda *args: seen.append(True))
            try:
                runs["clean"].append(_check_head_output(head(chunk)).cpu())
            finally:
                handle.remove()
            if not seen:  # splicing and ablating would change nothing: every KL would read 0
                raise InputError(f"the head never ran {layer}; pass a head that runs the backbone on the pixels")
            with splice(backbone, layer, sae, error_term=False):
                runs["sae"].append(_check_head_output(head(chunk)).cpu())
            with _replaced(backbone, layer, None):
                runs["zero"].append(_check_head_output(head(chunk)).cpu())
            with _replaced(backbone, layer, mean_activation):
                runs["mean"].append(_check_head_output(head(chunk)).cpu())
    clean = torch.cat(runs["clean"])
    out: dict = {"n_images": int(clean.shape[0])}
    for name in ("sae", "zero", "mean"):
        out[f"kl_{name}"], out[f"top1_agreement_{name}"] = _kl_and_agreement(clean, torch.cat(runs[name]))
    for name in ("zero", "mean"):
        ablated = out[f"kl_{name}"]
        out[f"kl_recovered_{name}"] = (ablated - out["kl_sae"]) / ablated if ablated > 0 else float("nan")
    return out
