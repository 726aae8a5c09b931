"""Feature discovery (the saev paper's Fig. 3): encode the patches a user highlights in one
image, sum their codes, take the top latents, and show each latent's exemplar images.

Example::

    latents, summed = top_latents_for_patches(sae, tokens, [17, 18, 30], n=5)
    for hit in discover(sae, tokens, [17, 18, 30], EncodedDataset(out_dir), n=5):
        print(hit["latent"], hit["summed"], hit["images"])
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, DataMismatchError, InputError
from ._args import count
from .batch import code_pairs


def patch_mask(patches, n_tokens: int) -> torch.Tensor:
    """patches: a [T] bool mask, or token positions (ints in [0, T)) -> [T] bool mask (CPU).
    Raises InputError for a wrong-length mask, a position out of range or an empty selection."""
    if isinstance(patches, torch.Tensor):
        patches = patches.detach().cpu().numpy()
    arr = np.asarray(patches)
    if arr.dtype == bool:
        if arr.shape != (n_tokens,):
            raise InputError(f"patch mask has shape {arr.shape}, but the image has T={n_tokens} tokens; "
                             f"pass a [{n_tokens}] bool mask or a list of token positions")
        mask = arr.copy()
    else:
        arr = arr.reshape(-1)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"patches hold {arr.dtype} values; pass a [T] bool mask or integer token positions")
        bad = arr[(arr < 0) | (arr >= n_tokens)]
        if bad.size:
            raise InputError(f"patch position {int(bad[0])} is outside [0, T={n_tokens}) of this image's tokens; "
                             f"choose positions from 0 to {n_tokens - 1}")
        mask = np.zeros(n_tokens, dtype=bool)
        mask[arr.astype(np.int64)] = True
    if not mask.any():
        raise InputError("no patch selected: give at least one token position (or a mask with a True entry)")
    return torch.from_numpy(mask)


@torch.no_grad()
def top_latents_for_patches(sae, tokens: torch.Tensor, patches, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The top latents of one image's selected patches.

    Args:
        sae: a saeengine SAE.
        tokens: [T, d_in] the image's tokens at the SAE's layer (raw space; moved to the
            SAE's device).
        patches: a [T] bool mask, or a list of token positions in [0, T) (repeats count once).
        n: how many latents, >= 1.

    Returns (latents int64 [n'], summed float32 [n']) on the CPU: the latents whose code,
    summed (in float64) over the selected tokens, is largest, by decreasing sum (ties by
    increasing id); n' = min(n, number of latents that fire on the selection).
    """
    n = count("n", n)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise InputError(f"tokens has shape {tuple(tokens.shape)}; pass one image's tokens as [T, d_in]")
    mask = patch_mask(patches, tokens.shape[0])
    device = sae.W_enc.device
    values, indices = code_pairs(sae.encode(tokens.to(device)[mask.to(device)]))
    fire = values > 0
    summed = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
    summed.index_put_((indices[fire],), values[fire].double(), accumulate=True)  # deterministic on CUDA
    summed = summed.cpu()
    order = torch.sort(summed, descending=True, stable=True).indices  # stable: ties by latent id
    top = order[:min(n, int((summed > 0).sum()))]
    return top, summed[top].float()


def _exemplar_table(exemplars, rule: str) -> dict:
    if hasattr(exemplars, "exemplars"):
        return exemplars.exemplars(rule)
    if isinstance(exemplars, dict):
        if rule not in exemplars:
            raise ConfigError(f"rule={rule!r} is not in the exemplars (they hold {sorted(exemplars)})")
        return exemplars[rule]
    raise InputError(f"exemplars is a {type(exemplars).__name__}; pass an Exemplars result dict, an Exemplars, "
                     "or an EncodedDataset (anything with .exemplars(rule))")


def discover(sae, tokens: torch.Tensor, patches, exemplars, n: int = 10, rule: str = "patch",
             per_latent: int = 8) -> list[dict]:
    """Fig. 3: the top ``n`` latents of the selected patches with their exemplars.

    Args:
        sae, tokens, patches, n: as :func:`top_latents_for_patches`.
        exemplars: an Exemplars result dict ``{rule: {"scores", "images", "positions":
            [F, K]}}``, or any object with ``.exemplars(rule)`` returning one rule's dict
            (an Exemplars accumulator, the encoded-dataset reader).
        rule: "patch", "image" or "cls".
        per_latent: exemplars kept per latent, >= 1 (fewer where the table has fewer).

    Returns one dict per latent, by decreasing summed value: {"latent": int, "summed":
    float, "images": [int], "scores": [float], "positions": [int]} (pads dropped).
    """
    per_latent = count("per_latent", per_latent)
    latents, summed = top_latents_for_patches(sae, tokens, patches, n)
    table = {f: torch.as_tensor(t).cpu() for f, t in _exemplar_table(exemplars, rule).items()}
    rows = table["scores"].shape[0]
    if rows != sae.cfg.d_sae:
        raise DataMismatchError(f"the exemplar table has {rows} latents but the SAE has d_sae={sae.cfg.d_sae}; "
                                "use the exemplars encoded with this SAE")
    out = []
    for latent, value in zip(latents.tolist(), summed.tolist()):
        images = table["images"][latent, :per_latent]
        real = images >= 0
        out.append({"latent": latent, "summed": value, "images": images[real].tolist(),
                    "scores": table["scores"][latent, :per_latent][real].tolist(),
                    "positions": table["positions"][latent, :per_latent][real].tolist()})
    return out
