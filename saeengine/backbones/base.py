"""The Backbone interface: a vision model whose residual stream can be read, and replaced,
after any block.

An adapter names the model's blocks "blocks.0", "blocks.1", .... It turns a block's output
into tokens [B, T, d] and back, labels every token position (cls, register, patch, ...),
and preprocesses images the way the model expects.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .images import ImageSource

BLOCK_LIST_NAMES = ("layers", "layer", "blocks", "resblocks", "_blocks")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def find_block_list(model: nn.Module) -> tuple[str, nn.Module]:
    """The longest ModuleList/Sequential named like a list of blocks (layers, blocks, ...)."""
    best: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and name.split(".")[-1] in BLOCK_LIST_NAMES:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of blocks named one of {BLOCK_LIST_NAMES}")
    return best


def load_images(images) -> list:
    """A folder, a text file listing image paths, a list of files, or a list of PIL images /
    arrays -> list of 8-bit RGB PIL images, all decoded now (record_activations streams
    them instead; see images.py for what is read and how)."""
    return list(ImageSource(images))


class Backbone:
    """A vision model with readable and replaceable blocks.

    Args:
        model: the torch module (eval mode is set).
        name: what the stores record as the backbone.
        image_size: square input side; mean, std: per-channel normalization.
        prefix_kinds: kinds of the tokens before the patches, e.g. ["cls"] or
            ["cls", "register", "register"].
        spatial: block outputs are feature maps [B, C, H, W] (a token per position)
            rather than sequences [B, T, d].
        blocks: the block list (default: found by name).
        forward: how to run the model on pixels (default: ``model(pixels)``).
    """

    #: Every sample of a batch has the same token kinds at the same positions (image models);
    #: sequence models label positions per sample from their input ids.
    fixed_layout = True
    #: The token kinds this class of backbone labels (plus its ``prefix_kinds``).
    TOKEN_KINDS: tuple[str, ...] = ("cls", "register", "patch")

    def __init__(self, model: nn.Module, name: str, *, image_size: int, mean: Sequence[float],
                 std: Sequence[float], prefix_kinds: Sequence[str] = (), spatial: bool = False,
                 blocks: nn.Module | None = None, forward: Callable[[torch.Tensor], object] | None = None):
        self.model = model.eval()
        self.name = name
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.prefix_kinds = list(prefix_kinds)
        self.spatial = spatial
        self.blocks = blocks if blocks is not None else find_block_list(model)[1]
        self._forward = forward or model

    # ----- layers ------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def layer_index(self, layer: str) -> int:
        """"blocks.i" (i may count from the end: "blocks.-1") -> the block's index in 0..n-1."""
        prefix, _, index = layer.partition(".") if isinstance(layer, str) else ("", "", "")
        if prefix != "blocks" or not index.lstrip("-").isdigit() or not -len(self.blocks) <= int(index) < len(self.blocks):
            raise ConfigError(f"{self.name} has layers blocks.0 .. blocks.{len(self.blocks) - 1}; got {layer!r}")
        return int(index) % len(self.blocks)

    def layer_module(self, layer: str) -> nn.Module:
        return self.blocks[self.layer_index(layer)]

    def token_kind_names(self) -> list[str]:
        """The token kinds ``keep=`` may name for this backbone."""
        return list(dict.fromkeys([*self.TOKEN_KINDS, *self.prefix_kinds]))

    # ----- tokens ------------------------------------------------------------------------
    def to_tokens(self, output) -> torch.Tensor:
        """A block's output -> tokens [B, T, d]."""
        hidden = output[0] if isinstance(output, tuple) else output
        if self.spatial:
            return hidden.flatten(2).transpose(1, 2)
        return hidden

    def from_tokens(self, output, tokens: torch.Tensor):
        """Put tokens [B, T, d] back into the structure of a block's output."""
        hidden = output[0] if isinstance(output, tuple) else output
        if self.spatial:
            tokens = tokens.transpose(1, 2).reshape(hidden.shape)
        tokens = tokens.to(hidden.dtype)
        if tokens.stride() != hidden.stride():
            # Hand the next layers the block's own memory layout: rebuilt from tokens
            # [B, T, d], a feature map is channels-last, and convolutions then pick other
            # kernels, whose sums round differently (1e-5 on EfficientNet-Lite0).
            tokens = torch.empty_like(hidden).copy_(tokens)
        return (tokens, *output[1:]) if isinstance(output, tuple) else tokens

    def token_kinds(self, n_tokens: int) -> list[str]:
        """The kind of every token position: the prefix kinds, then "patch"."""
        return self.prefix_kinds + ["patch"] * (n_tokens - len(self.prefix_kinds))

    def sample_token_kinds(self, inputs, n_tokens: int) -> list[list[str]]:
        """Token kinds per sample of a preprocessed batch (text and multimodal models
        label positions from their input ids)."""
        batch = inputs.shape[0] if isinstance(inputs, torch.Tensor) else len(next(iter(inputs.values())))
        return [self.token_kinds(n_tokens)] * batch

    def load_inputs(self, items) -> ImageSource:
        """What record_activations iterates over: images, decoded one at a time when indexed."""
        return ImageSource(items)

    def inputs_to(self, inputs, device: torch.device):
        if isinstance(inputs, torch.Tensor):
            return inputs.to(device)
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}

    # ----- images ------------------------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        """Images (anything ``load_images`` takes) -> [B, 3, image_size, image_size] normalized
        float32. Each image is decoded, resized and dropped before the next is read."""
        from PIL import Image

        batch = []
        for image in ImageSource(images):
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
            batch.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
        pixels = torch.stack(batch)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def forward(self, pixels: torch.Tensor):
        """Run the model on preprocessed pixels."""
        return self._forward(pixels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
