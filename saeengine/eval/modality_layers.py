"""The per-layer table of the modality task: the tokens of one pass with their labels
(ModalityTokens, from modality_record or modality_synthetic), and per layer a small SAE
trained on them (or a given one), the tokens encoded in chunks, and the modality scores,
shared latents and pair grounding measured (saeengine.eval.modality; definitions in
docs/modality.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ._args import count
from .modality import MIN_RATE, SHARED_HIGH, SHARED_LOW, ModalityCounts, PairSets


@dataclasses.dataclass
class ModalityTokens:
    """The tokens of one pass, at one or more layers, with their labels.

    layers:  {layer name: tokens [N, d] float tensor or an ActivationStore of N rows}; every
             layer holds the same N tokens in the same order.
    image:   [N] bool, an image token (else a text token).
    pair:    [N] int64, the (image, caption) pair of the token.
    caption: [N] bool, a text token of the pair's caption (the text side of grounding).
    directions: synthetic data only: {layer: {"image": [C, d], "text": [C, d]}}, the planted
             concept directions as image tokens and as text tokens carry them.
    """

    layers: dict
    image: torch.Tensor
    pair: torch.Tensor
    caption: torch.Tensor
    directions: dict | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.image.shape[0])


def concepts_found(sae, directions: dict, shared: np.ndarray, threshold: float = 0.9) -> dict:
    """How many planted concepts a shared latent recovers: for each concept c, the best
    cosine between a shared latent's decoder row and the concept's image direction (and
    its text direction); found when both are >= threshold."""
    rows = torch.nn.functional.normalize(sae.W_dec.detach().float().cpu(), dim=1)[torch.from_numpy(shared)]
    out = {}
    for side in ("image", "text"):
        target = torch.nn.functional.normalize(directions[side].float(), dim=1)
        out[side] = (target @ rows.T).max(1).values if rows.shape[0] else torch.zeros(target.shape[0])
    both = torch.minimum(out["image"], out["text"])
    return {"n_concepts": int(both.shape[0]), "found": int((both >= threshold).sum()), "threshold": threshold,
            "best_cosine": both.tolist()}


# ----- the per-layer table -------------------------------------------------------------------
def _rows(tokens, start: int, stop: int) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens[start:stop].float()
    return tokens.get(np.arange(start, stop)).float()


def _all_rows(tokens) -> torch.Tensor:
    return tokens.float() if isinstance(tokens, torch.Tensor) else _rows(tokens, 0, tokens.n_tokens)


@torch.no_grad()
def measure_layer(sae, tokens, data: ModalityTokens, *, low: float = SHARED_LOW, high: float = SHARED_HIGH,
                  min_rate: float = MIN_RATE, min_share: float = 0.0, seed: int = 0, chunk: int = 4096,
                  progress: bool = False, desc: str = "encode") -> tuple[dict, dict, dict]:
    """Encode one layer's tokens in chunks -> (modality result, grounding result, the
    reconstruction metrics {"fvu", "l0"})."""
    from .batch import code_pairs
    from .metrics import ReconstructionMetrics

    chunk = count("chunk", chunk)
    n = data.n_tokens
    n_rows = tokens.shape[0] if isinstance(tokens, torch.Tensor) else tokens.n_tokens
    if n_rows != n:
        raise InputError(f"the layer holds {n_rows} tokens but the labels {n}; record all layers in one pass")
    counts, sets, metrics = ModalityCounts(sae.cfg.d_sae), PairSets(sae.cfg.d_sae), ReconstructionMetrics()
    device = next(sae.parameters()).device
    for start in tqdm(range(0, n, chunk), desc=desc, unit="chunk", disable=not progress):
        stop = min(start + chunk, n)
        x = _rows(tokens, start, stop).to(device)
        code = sae.encode(x)
        values, indices = code_pairs(code)
        metrics.add(x, sae.decode(code).float(), values)
        image = data.image[start:stop]
        counts.add(values, indices, kinds=image)
        grounded = image | data.caption[start:stop]  # the image side and the caption side
        sets.add(values[grounded.to(values.device)], indices[grounded.to(indices.device)],
                 pairs=data.pair[start:stop][grounded], kinds=image[grounded])
    scores = metrics.result()
    return (counts.result(low=low, high=high, min_rate=min_rate), sets.result(min_share=min_share, seed=seed),
            {"fvu": scores["fvu"], "l0": scores["l0"]})


def analyze(data: ModalityTokens, *, saes: dict | None = None, d_sae: int | None = None, k: int = 16,
            epochs: int = 20, seed: int = 0, sae_dir: str | Path | None = None, low: float = SHARED_LOW,
            high: float = SHARED_HIGH, min_rate: float = MIN_RATE, min_share: float = 0.0, chunk: int = 4096,
            progress: bool = True) -> dict:
    """The per-layer table of ``data``: for each layer, the given SAE (saes[layer]) or one
    trained here on all its tokens (TopK, d_sae latents, default 4 x d; k; saved under
    sae_dir/<layer>/sae when sae_dir is given).

    Returns {"layers": [row per layer], "latents": {layer: {"p_img", "p_txt", "score",
    "category"} [F] each}, "grounding": {layer: {"matched", "mismatched", "derangement"}}}.
    A row: layer, sae, d_sae, k, n_tokens, n_image_tokens, n_text_tokens, n_caption_tokens,
    n_pairs, fvu, l0, live, dead, image, text, shared, rare_mixed, shared_fraction,
    shared_fraction_of_all, auroc, matched_mean, mismatched_mean, image_set_size_mean,
    caption_set_size_mean (and concepts_found for the synthetic layers)."""
    from .experiments.common import train_small_sae

    saes = dict(saes or {})
    table, latents, grounding = [], {}, {}
    for layer, tokens in data.layers.items():
        sae, origin = saes.get(layer), "given"
        if sae is None:
            x = _all_rows(tokens)
            width = count("d_sae", d_sae) if d_sae is not None else 4 * x.shape[1]
            folder = Path(sae_dir) / layer if sae_dir is not None else None
            sae = train_small_sae(x, d_sae=width, k=min(count("k", k), width), epochs=epochs, seed=seed,
                                  out_dir=folder)
            origin = str(folder / "sae") if folder is not None else "trained (not saved)"
            del x
        modality, ground, recon = measure_layer(sae, tokens, data, low=low, high=high, min_rate=min_rate,
                                                min_share=min_share, seed=seed, chunk=chunk, progress=progress,
                                                desc=f"encode {layer}")
        row = {"layer": layer, "sae": origin, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "n_tokens": data.n_tokens,
               "n_image_tokens": modality["n_image_tokens"], "n_text_tokens": modality["n_text_tokens"],
               "n_caption_tokens": int(data.caption.sum()), "n_pairs": ground["n_pairs"], **recon}
        row.update({key: modality[key] for key in ("live", "dead", "image", "text", "shared", "rare_mixed",
                                                   "shared_fraction", "shared_fraction_of_all")})
        row.update({key: ground[key] for key in ("auroc", "matched_mean", "mismatched_mean", "image_set_size_mean",
                                                 "caption_set_size_mean")})
        if data.directions and layer in data.directions:
            row["concepts_found"] = concepts_found(sae, data.directions[layer], modality["is_shared"])
        table.append(row)
        latents[layer] = {key: modality[key] for key in ("p_img", "p_txt", "score", "category")}
        grounding[layer] = {key: ground[key] for key in ("matched", "mismatched", "derangement")}
    thresholds = {"low": low, "high": high, "min_rate": min_rate, "min_share": min_share, "seed": seed}
    return {"thresholds": thresholds, "layers": table, "latents": latents, "grounding": grounding}
