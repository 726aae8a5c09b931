"""Record a backbone's activations at several layers, in one forward pass per batch, into
activation stores (one per layer), with each token's image index and position."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..store import ActivationWriter
from .base import Backbone


class _StopForward(Exception):
    """Raised by the deepest layer's hook to end a forward pass early."""


def record_activations(backbone: Backbone, images, layers: Sequence[str], out_dir: str | Path, *,
                       keep: Sequence[str] = ("patch",), batch_size: int = 32, dtype: str = "float16",
                       shard_tokens: int = 1 << 18, progress: bool = True, stop_early: bool = True
                       ) -> dict[str, Path]:
    """Write the tokens of ``keep`` kinds at every layer in ``layers`` to out_dir/<layer>/,
    an activation store each. Returns {layer: store directory}.

    Kinds: cls, register, patch (vision models); bos, text, eos, pad (text encoders);
    image, text (multimodal LLMs). Each token's source is (image or prompt index, position).
    images: a folder, a list of files, or a list of PIL images / HxWxC uint8 arrays; for
    text and multimodal backbones, what their ``load_inputs`` takes (prompts, examples).
    Runs on the backbone's device, under torch.no_grad, with one forward hook per layer.
    ``stop_early`` ends each forward pass at the deepest recorded block (of models whose
    blocks run in sequence), skipping the blocks and heads nobody reads.
    """
    items = backbone.load_inputs(images)
    if not items:
        raise ValueError("nothing to record: no images (or prompts)")
    out_dir = Path(out_dir)
    modules = {layer: backbone.layer_module(layer) for layer in layers}
    caught: dict[str, torch.Tensor] = {}
    deepest = max(layers, key=lambda layer: int(layer.split(".")[1]) % len(backbone.blocks))

    def catch(module, inputs, output, layer):
        caught[layer] = backbone.to_tokens(output)
        if stop_early and layer == deepest:
            raise _StopForward

    hooks = [module.register_forward_hook(lambda mod, inp, out, layer=layer: catch(mod, inp, out, layer))
             for layer, module in modules.items()]
    writers: dict[str, ActivationWriter] = {}
    try:
        for start in tqdm(range(0, len(items), batch_size), desc=f"record {backbone.name}", unit="batch",
                          disable=not progress):
            inputs = backbone.preprocess(items[start:start + batch_size])
            caught.clear()
            with torch.no_grad():
                try:
                    backbone.forward(backbone.inputs_to(inputs, backbone.device))
                except _StopForward:
                    pass
            for layer in layers:
                tokens = caught[layer]  # [B, T, d]
                kinds = backbone.sample_token_kinds(inputs, tokens.shape[1])
                if layer not in writers:
                    writers[layer] = ActivationWriter(
                        out_dir / layer, d_in=tokens.shape[2], dtype=dtype, backbone=backbone.name, layer=layer,
                        token_kind="+".join(keep), shard_tokens=shard_tokens,
                        extra={"sequence_length": int(tokens.shape[1]), "token_kinds": kinds[0],
                               "tokens_per_image": sum(kind in keep for kind in kinds[0]),
                               "image_size": getattr(backbone, "image_size", None)})
                # Image models share one layout per batch: one gather for all samples.
                layouts = [kinds[0]] if all(k == kinds[0] for k in kinds) else kinds
                for b, sample_kinds in enumerate(layouts):
                    positions = torch.tensor([i for i, kind in enumerate(sample_kinds) if kind in keep], dtype=torch.long)
                    samples = torch.arange(tokens.shape[0]) if len(layouts) == 1 else torch.tensor([b])
                    if positions.numel():
                        kept = tokens[samples.to(tokens.device)][:, positions.to(tokens.device)]
                        writers[layer].add(kept.reshape(-1, kept.shape[2]),
                                           (start + samples).repeat_interleave(positions.numel()),
                                           positions.repeat(samples.numel()))
        for writer in writers.values():
            writer.close()
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: out_dir / layer for layer in layers}
