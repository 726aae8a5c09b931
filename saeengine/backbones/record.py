"""Record a backbone's activations at several layers, in one forward pass per batch, into
activation stores (one per layer), with each token's image index and position."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..store import ActivationWriter
from .base import Backbone, load_images


def record_activations(backbone: Backbone, images, layers: Sequence[str], out_dir: str | Path, *,
                       keep: Sequence[str] = ("patch",), batch_size: int = 32, dtype: str = "float16",
                       shard_tokens: int = 1 << 18, progress: bool = True) -> dict[str, Path]:
    """Write the tokens of ``keep`` kinds (cls, register, patch) at every layer in ``layers``
    to out_dir/<layer>/, an activation store each. Returns {layer: store directory}.

    images: a folder, a list of files, or a list of PIL images / HxWxC uint8 arrays.
    Runs on the backbone's device, under torch.no_grad, with one forward hook per layer.
    """
    images = load_images(images)
    if not images:
        raise ValueError("no images to record")
    out_dir = Path(out_dir)
    modules = {layer: backbone.layer_module(layer) for layer in layers}
    caught: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda mod, inp, out, layer=layer: caught.__setitem__(layer, backbone.to_tokens(out)))
             for layer, module in modules.items()]
    writers: dict[str, ActivationWriter] = {}
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=f"record {backbone.name}", unit="batch",
                          disable=not progress):
            chunk = images[start:start + batch_size]
            caught.clear()
            with torch.no_grad():
                backbone.forward(backbone.preprocess(chunk).to(backbone.device))
            for layer in layers:
                tokens = caught[layer]  # [B, T, d]
                kinds = backbone.token_kinds(tokens.shape[1])
                positions = torch.tensor([i for i, kind in enumerate(kinds) if kind in keep], dtype=torch.long)
                if positions.numel() == 0:
                    raise ValueError(f"{backbone.name} {layer}: no token of kinds {list(keep)} (it has {sorted(set(kinds))})")
                if layer not in writers:
                    writers[layer] = ActivationWriter(
                        out_dir / layer, d_in=tokens.shape[2], dtype=dtype, backbone=backbone.name, layer=layer,
                        token_kind="+".join(keep), shard_tokens=shard_tokens,
                        extra={"tokens_per_image": int(positions.numel()), "sequence_length": int(tokens.shape[1]),
                               "token_kinds": kinds, "image_size": backbone.image_size})
                kept = tokens[:, positions.to(tokens.device)]
                b = kept.shape[0]
                image_index = (start + torch.arange(b)).repeat_interleave(positions.numel())
                writers[layer].add(kept.reshape(-1, kept.shape[2]), image_index, positions.repeat(b))
        for writer in writers.values():
            writer.close()
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: out_dir / layer for layer in layers}
