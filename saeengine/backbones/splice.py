"""Run a backbone with an SAE spliced in at one layer: the block's output is replaced by
the SAE's reconstruction, or by an edited one.

With ``error_term=True`` the replacement is x - (decode(code) - decode(edited code)).
Mathematically it equals the edited reconstruction plus the SAE's error,
x - decode(code). Unedited, the subtracted term is exactly +0.0 and x - 0.0 is x for
every float (signed zeros included), and the block's output goes back in the memory
layout the block produced (a channels-last map would make later convolutions round
differently). So the model's output is bit for bit unchanged until a latent is edited,
for every family (tests/test_backbones.py), provided the SAE's reconstruction is finite
(inf - inf is NaN). With ``error_term=False`` the block's output becomes the (edited)
reconstruction itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from ..ops.code import SparseCode
from .base import Backbone

Edit = Callable[[SparseCode, int, int], SparseCode]  # (code of B*T tokens, B, T) -> edited code


@contextmanager
def splice(backbone: Backbone, layer: str, sae, *, error_term: bool = True, edit: Edit | None = None,
           backend: str = "auto"):
    """Context manager: inside it, every forward of ``backbone`` passes ``layer`` through ``sae``."""
    def hook(module, inputs, output):
        tokens = backbone.to_tokens(output)
        b, t, d = tokens.shape
        flat = tokens.reshape(b * t, d)
        code = sae.encode(flat, backend=backend, check=False)
        recon = sae.decode(code, backend=backend)
        edited = sae.decode(edit(code, b, t), backend=backend) if edit is not None else recon
        # x - (+0.0) is x exactly, where x + 0.0 would turn -0.0 into +0.0.
        new = flat - (recon - edited).to(flat.dtype) if error_term else edited.to(flat.dtype)
        return backbone.from_tokens(output, new.reshape(b, t, d))

    handle = backbone.layer_module(layer).register_forward_hook(hook)
    try:
        yield backbone
    finally:
        handle.remove()


def set_latent(latent: int, value: float, tokens: torch.Tensor | None = None, *, scale: bool = False) -> Edit:
    """An edit that sets latent ``latent`` to ``value`` (or multiplies it by ``value`` when
    ``scale``; 0 zeroes it) at the token positions ``tokens`` [T] bool (default: all)."""
    def edit(code: SparseCode, b: int, t: int) -> SparseCode:
        where = torch.ones(b * t, dtype=torch.bool, device=code.values.device)
        if tokens is not None:
            where = tokens.to(code.values.device).repeat(b)
        hits = (code.indices == latent) & where[:, None]
        if scale:
            return SparseCode(torch.where(hits, code.values * value, code.values), code.indices)
        values = torch.where(hits, torch.zeros_like(code.values), code.values)  # one slot will hold it
        extra_v = torch.where(where, torch.full_like(values[:, 0], value), torch.zeros_like(values[:, 0]))
        extra_i = torch.full_like(code.indices[:, 0], latent)
        return SparseCode(torch.cat([values, extra_v[:, None]], 1), torch.cat([code.indices, extra_i[:, None]], 1))
    return edit
