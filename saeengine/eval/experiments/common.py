"""What the offline experiments share: digits to pixels, a block's tokens of a batch of
images (no store needed at this scale), EfficientNet-Lite0's pooled embedding, and a small
TopK SAE trained on a token tensor."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...backbones.base import Backbone


def pixels_of(images: np.ndarray, backbone: Backbone, size: int) -> torch.Tensor:
    """uint8 images [n, h, w] (grey) or [n, h, w, 3] -> [n, 3, size, size] float32, resized
    bilinearly and normalized with the backbone's mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@torch.no_grad()
def block_tokens(backbone: Backbone, layer: str, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[n, T, d] float32 tokens of ``layer`` for pixels [n, 3, H, W] (the whole model runs;
    the tokens are the block output's positions, row-major)."""
    out: list[torch.Tensor] = []
    handle = backbone.layer_module(layer).register_forward_hook(
        lambda module, inputs, output: out.append(backbone.to_tokens(output).float().cpu()))
    try:
        for start in range(0, pixels.shape[0], batch_size):
            backbone.forward(pixels[start:start + batch_size].to(backbone.device))
    finally:
        handle.remove()
    return torch.cat(out)


def efficientnet_pooled(backbone: Backbone):
    """pixels [n, 3, H, W] -> [n, 1280] EfficientNet-Lite0's pooled final embedding (the
    input of its ImageNet classifier). Block hooks (splice) apply inside it."""
    model = backbone.model

    def pooled(pixels: torch.Tensor) -> torch.Tensor:
        return model._avg_pooling(model.extract_features(pixels)).flatten(1)
    return pooled


def train_small_sae(tokens: torch.Tensor, *, d_sae: int, k: int, epochs: int = 20, batch_size: int = 256,
                    seed: int = 0, out_dir: str | Path | None = None):
    """A TopK SAE trained on tokens [N, d] (mean-norm normalized, AuxK on) for ``epochs``
    passes over the tokens; saved under out_dir (a temporary folder by default)."""
    from ... import TrainConfig, train

    n = tokens.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(d_sae=d_sae, k=k, total_tokens=epochs * n, batch_size=min(batch_size, n),
                          warmup_steps=10, seed=seed, device="cpu", out_dir=str(out_dir or tmp), name="sae",
                          progress=False, log_every=10**9, dead_after_tokens=max(n, 1))
        return train(tokens.float(), cfg)
