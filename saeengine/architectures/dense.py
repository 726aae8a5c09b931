"""Dense codes: the activations [N, F] of the architectures with no fixed number of active
latents per token ("relu", "jumprelu"), decoded by one matmul.

Their encoders build the [N, F] pre-activations anyway; keeping the activations dense
avoids what a padded sparse code costs (its width is the batch's largest L0, read by a
host sync, and a top-k select to gather it): encode, forward and decode never sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class DenseCode:
    """A batch of dense latent codes, with the duck interface of ``SparseCode``.

    values: [N, F] activations, 0 where a latent is off (differentiable).
    indices: [N, F] int64, the latent of each column (``arange(F)`` broadcast over the rows,
        no memory of its own), so that what reads (values, indices) pairs works unchanged
        (``ForwardOutput.l0``). The training bookkeeping reads :meth:`fired_pairs`
        instead: one pair per latent, not N*F.
    aux, latent_index: always None (no AuxK code; no by-latent index, decoding is a matmul).
    """

    values: torch.Tensor
    aux = None
    latent_index = None

    @cached_property
    def indices(self) -> torch.Tensor:
        n, f = self.values.shape
        return torch.arange(f, device=self.values.device).expand(n, f)

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def fired_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, F] latents, [1, F] each latent's largest activation of the batch): positive
        exactly for the latents that fired, so mark_fired_ and fired_rows sort F entries,
        not N*F."""
        f = self.values.shape[1]
        return (torch.arange(f, device=self.values.device)[None],
                self.values.detach().amax(0, keepdim=True))

    def to_dense(self, d_sae: int) -> torch.Tensor:
        """[N, d_sae] dense activations: ``values`` itself."""
        if d_sae != self.values.shape[1]:
            raise ValueError(f"this code has {self.values.shape[1]} latents, not d_sae={d_sae}")
        return self.values


def dense_decode(values: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """values [N, F] @ W_dec [F, d] + b_dec [d] -> [N, d] in values' dtype (the weights cast
    to it, or autocast's dtype)."""
    return torch.addmm(b_dec.to(values.dtype), values, W_dec.to(values.dtype))
