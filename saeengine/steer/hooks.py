"""Steering one block of a text encoder: h' = h + alpha * direction at the block's output,
the rest of the encoder (its later blocks, its final LayerNorm, or the pipeline's reading
of that hidden state) continuing from the edited value.

    edit = SteeringEdit(direction, alpha=4.0, where="active", sae=sae, latent=7)
    with steer_layer(text_encoder, layer=-2, edit=edit, token_mask=attention_mask):
        embeds = text_encoder(input_ids)[0]

Which token positions are edited (``where``):
- "all": every position of the padded sequence (the spec's "all 77 tokens": the UNet
  cross-attends to the padding positions too);
- "valid": the prompt's own tokens (start, text, end), not the padding;
- "active": the positions where the latent fires, z_j(h) > 0, z_j computed by the SAE from
  the block's unedited output h at that position.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.base import find_block_list
from ..errors import InputError
from .generator import check_alpha, check_latent

WHERE = ("all", "valid", "active")


@dataclass(frozen=True)
class SteeringEdit:
    """What to add at the steered block: alpha * direction on the positions ``where`` picks.

    direction: [d] float in raw activation space (e.g. ``latent_direction(sae, j, m_j)``);
    alpha: a finite float; where: "all" | "valid" | "active" (this module's docstring);
    sae, latent: the SAE and latent whose firing selects the positions for "active".
    """

    direction: torch.Tensor
    alpha: float
    where: str = "all"
    sae: object = None
    latent: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        if self.where not in WHERE:
            raise InputError(f"where={self.where!r}: choose one of {', '.join(WHERE)}")
        direction = torch.as_tensor(self.direction)
        if direction.ndim != 1 or not direction.is_floating_point():
            raise InputError(f"direction must be a 1-D float tensor [d], got {tuple(direction.shape)} "
                             f"{direction.dtype}; build it with saeengine.steer.latent_direction")
        if not bool(torch.isfinite(direction).all()):
            raise InputError("direction holds NaN or inf; build it from a finite SAE and max activation")
        object.__setattr__(self, "direction", direction.detach())
        if self.where == "active":
            if self.sae is None or self.latent is None:
                raise InputError('where="active" steers where the latent fires: pass sae= and latent=')
            object.__setattr__(self, "latent", check_latent(self.sae, self.latent))
            if int(self.sae.cfg.d_in) != direction.shape[0]:
                raise InputError(f"the SAE reads width {self.sae.cfg.d_in} but the direction has width "
                                 f"{direction.shape[0]}; use the SAE trained on this layer")

    @property
    def width(self) -> int:
        return int(self.direction.shape[0])

    def negated(self) -> "SteeringEdit":
        """The same edit with -alpha (the unconditional branch of cfg="opposite")."""
        return SteeringEdit(self.direction, -self.alpha, self.where, self.sae, self.latent)


def encoder_blocks(encoder: nn.Module) -> nn.Module:
    """The encoder's list of transformer blocks (CLIPTextModel: encoder.layers)."""
    return find_block_list(encoder)[1]


def resolve_layer(encoder: nn.Module, layer) -> int:
    """``layer`` (an int, negative from the end: -2 = the penultimate block) -> 0..n-1;
    InputError naming the valid range otherwise."""
    n = len(encoder_blocks(encoder))
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise InputError(f"layer={layer!r}: this text encoder has blocks 0 .. {n - 1} (or -{n} .. -1 from the "
                         "end; -2 is the penultimate block, the usual choice)")
    return layer % n


@torch.no_grad()
def latent_activation(sae, latent: int, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, d] raw -> z_j [B, T] float32, the latent's activation at every position."""
    from ..eval.batch import code_pairs

    device = sae.W_enc.device
    flat = hidden.reshape(-1, hidden.shape[-1]).to(device=device, dtype=torch.float32)
    values, indices = code_pairs(sae.encode(flat))
    z = (values * (indices == latent)).sum(1)
    return z.reshape(hidden.shape[:-1]).to(hidden.device)


def edit_mask(edit: SteeringEdit, hidden: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T] float32: 1 on the positions ``edit.where`` picks in hidden [B, T, d], else 0."""
    if edit.where == "all":
        return torch.ones(hidden.shape[:-1], dtype=torch.float32, device=hidden.device)
    if edit.where == "valid":
        if token_mask is None:
            raise ValueError('where="valid" needs token_mask= (the tokenizer\'s attention mask [B, T])')
        return token_mask.to(device=hidden.device, dtype=torch.float32)
    return (latent_activation(edit.sae, edit.latent, hidden) > 0).float()


def apply_edit(edit: SteeringEdit, hidden: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [B, T, d] -> h + alpha * mask * direction, computed in float32 and cast back to
    hidden's dtype (a half-precision encoder keeps its dtype; the sum is not rounded twice)."""
    if hidden.shape[-1] != edit.width:
        raise InputError(f"the steered block has width {hidden.shape[-1]} but the direction has width "
                         f"{edit.width}; use a direction (an SAE) for this encoder and layer")
    mask = edit_mask(edit, hidden, token_mask)
    step = edit.alpha * edit.direction.to(device=hidden.device, dtype=torch.float32)
    return (hidden.float() + mask[..., None] * step).to(hidden.dtype)


@contextmanager
def steer_layer(encoder: nn.Module, layer: int, edit: SteeringEdit | None = None, *,
                token_mask: torch.Tensor | None = None, capture: list | None = None):
    """Within the block, the output of block ``layer`` of ``encoder`` is edited by ``edit``
    (None or alpha = 0: left as it is, bit for bit) and, when ``capture`` is a list, the
    (edited) output [B, T, d] is appended to it on every forward.

    The hook is prepended to the block's forward hooks: transformers records
    ``output_hidden_states`` with hooks of its own, which then see the edited value (SDXL
    reads its prompt embedding from hidden_states[-2]).
    token_mask: [B, T] the tokenizer's attention mask, for where="valid".
    """
    index = resolve_layer(encoder, layer)
    active = edit is not None and edit.alpha != 0.0

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if active:
            hidden = apply_edit(edit, hidden, token_mask)
        if capture is not None:
            capture.append(hidden.detach())
        if not active:
            return None  # the block's own output object, untouched
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = encoder_blocks(encoder)[index].register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()

