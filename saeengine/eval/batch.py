"""What an evaluation pass hands each accumulator: one batch of tokens with their codes,
reconstructions and sources, and the conversion of any code to (values, indices) pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """A batch of N tokens of one ordered pass over a store.

    x:        [N, d_in] float32 activations, in the SAE's input (raw) space.
    x_hat:    [N, d_in] float32 reconstructions, same space.
    values:   [N, w] float32 code values (0 = off, or a padding slot).
    indices:  [N, w] int64 latent ids in [0, d_sae) of ``values``.
    image:    [N] int64 image index of each token (the store's sources).
    position: [N] int64 position of each token inside its image.
    is_cls:   [N] bool, the token is a CLS token.
    first_row: global token id of row 0 in the store.

    The pass guarantees that a batch holds whole images: every token of an image that is
    in the batch is in this batch, in store order. All tensors are on one device.
    """

    x: torch.Tensor
    x_hat: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    image: torch.Tensor
    position: torch.Tensor
    is_cls: torch.Tensor
    first_row: int = 0

    @property
    def n(self) -> int:
        return int(self.values.shape[0])


def code_pairs(code) -> tuple[torch.Tensor, torch.Tensor]:
    """A SparseCode or DenseCode of N tokens -> (values float32 [N, w], indices int64
    [N, w]), zeros marking slots that do not fire. A DenseCode [N, F] is compacted to the
    widest row's number of firing latents (at least 1), sorted by decreasing value."""
    from ..architectures.dense import DenseCode

    if not isinstance(code, DenseCode):
        return code.values.float(), code.indices
    values = code.values
    width = max(int((values > 0).sum(1).max()), 1) if values.shape[0] else 1
    top, where = values.topk(min(width, values.shape[1]), dim=1)
    return torch.where(top > 0, top, torch.zeros_like(top)).float(), where
