"""Synthetic activations from a planted sparse dictionary (known atoms, known sparsity).

Used by the demo and the tests: an SAE trained on them should recover the atoms, which
:func:`dictionary_recovery` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PlantedData:
    activations: torch.Tensor  # [n_tokens, d] float32
    atoms: torch.Tensor        # [n_atoms, d] unit-norm rows


def planted_dictionary(n_tokens: int, d: int, n_atoms: int, active_per_token: int, *,
                       noise: float = 0.01, seed: int = 0) -> PlantedData:
    """Each token is a positive combination of ``active_per_token`` random atoms plus noise.

    Coefficients are uniform in [0.5, 1.5]; atoms are random unit vectors in R^d.
    """
    if not 1 <= active_per_token <= n_atoms:
        raise ValueError(f"active_per_token={active_per_token} must lie in [1, n_atoms={n_atoms}]")
    gen = torch.Generator().manual_seed(seed)
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
