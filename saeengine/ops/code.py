"""The sparse code that the encoders return and the decoders take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .latent_index import LatentIndex


@dataclass
class SparseCode:
    """A batch of sparse latent codes.

    values:  [N, k] activations, each row sorted by decreasing value (padding slots are 0).
    indices: [N, k] int64 latent ids in [0, d_sae).
    aux:     the AuxK code over dead latents ([N, k_aux]) when it was asked for.
    latent_index: by-latent index of ``indices`` built by the fast encoder when gradients
             are needed; the decoder's backward reuses it (one sort per step).
    """

    values: torch.Tensor
    indices: torch.Tensor
    aux: Optional["SparseCode"] = None
    latent_index: Optional[LatentIndex] = None

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def fired_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) whose positive values mark the latents that fired: the code itself."""
        return self.indices, self.values

    def to_dense(self, d_sae: int) -> torch.Tensor:
        """[N, d_sae] dense activations (for inspection; the engine never needs this)."""
        dense = torch.zeros(self.values.shape[0], d_sae, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_add_(1, self.indices, self.values)
