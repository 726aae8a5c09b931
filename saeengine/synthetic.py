"""Synthetic activations from a planted sparse dictionary (known atoms, known sparsity).

Used by the demo and the tests: an SAE trained on them should recover the atoms, which
:func:`dictionary_recovery` measures.

The data come from :func:`data_generator`, never from ``torch.Generator().manual_seed(seed)``
itself: that is the stream of ``SAE(cfg, seed=seed)``'s initial decoder, and with the same
seed its first rows would be the planted atoms (recovery 1.0 before any training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DATA_STREAM = 0x5EED_DA7A
"""Tag mixed into the seed of every synthetic data draw (:func:`data_generator`)."""


def data_generator(seed: int, stream: int = DATA_STREAM) -> torch.Generator:
    """A torch generator for synthetic data, independent of a model's initialization with
    any seed: seeded with 64 bits of ``SeedSequence([seed, stream])`` at or above 2^32,
    so it never equals ``manual_seed(s)`` for a seed s the trainer accepts ([0, 2^32)),
    which is what ``SAE(cfg, seed=s)`` draws its decoder from."""
    low, high = np.random.SeedSequence([int(seed), int(stream)]).generate_state(2, np.uint32).tolist()
    return torch.Generator().manual_seed((high | 1) << 32 | low)


@dataclass
class PlantedData:
    activations: torch.Tensor  # [n_tokens, d] float32
    atoms: torch.Tensor        # [n_atoms, d] unit-norm rows


def planted_dictionary(n_tokens: int, d: int, n_atoms: int, active_per_token: int, *,
                       noise: float = 0.01, seed: int = 0) -> PlantedData:
    """Each token is a positive combination of ``active_per_token`` random atoms plus noise.

    Coefficients are uniform in [0.5, 1.5]; atoms are random unit vectors in R^d. All of it
    is drawn from ``data_generator(seed)``: an SAE initialized with the same seed does not
    start at the atoms.
    """
    if not 1 <= active_per_token <= n_atoms:
        raise ValueError(f"active_per_token={active_per_token} must lie in [1, n_atoms={n_atoms}]")
    gen = data_generator(seed)
    atoms = torch.randn(n_atoms, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    # Random subsets per token: the first `active` of a random permutation (argsort of noise).
    chosen = torch.rand(n_tokens, n_atoms, generator=gen).argsort(dim=1)[:, :active_per_token]
    coef = torch.rand(n_tokens, active_per_token, generator=gen) + 0.5
    x = torch.einsum("nk,nkd->nd", coef, atoms[chosen])
    x += noise * torch.randn(n_tokens, d, generator=gen)
    return PlantedData(x, atoms)


@torch.no_grad()
def dictionary_recovery(atoms: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over planted atoms [A, d] of the max cosine similarity with any decoder row [F, d]."""
    a = atoms.float() / atoms.float().norm(dim=1, keepdim=True)
    w = W_dec.float().to(a.device)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((a @ w.T).max(dim=1).values.mean())
