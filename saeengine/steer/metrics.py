"""What the alpha sweep measures on a steered image against the unsteered one (alpha = 0,
same prompt and seed):

- image distance: ``pixel_mae`` = mean |x - x0| / 255 over pixels and channels, and
  ``pixel_rmse`` = sqrt(mean (x - x0)^2) / 255 (both in [0, 1]; 0 = the same image);
- EfficientNet-Lite0's ImageNet class shift: ``top1_change`` = 1 when the top-1 class
  differs from the alpha = 0 image's, and ``kl`` = KL(p0 || p) in nats, p0 and p the
  1000-class softmax of the two images;
- CLIP score (with a local CLIP model): 100 * max(cos(image, text), 0), the convention of
  torchmetrics' CLIPScore (Hessel et al.'s CLIP-S uses 2.5 instead of 100), to the prompt
  and to an attribute text.
Each is per image; the sweep averages over prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError


def pixel_distances(images: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 images, reference [n, H, W, 3] -> {"pixel_mae": [n], "pixel_rmse": [n]} float64."""
    if images.shape != reference.shape:
        raise ValueError(f"images {images.shape} and reference {reference.shape} differ in shape")
    diff = images.astype(np.float64) - reference.astype(np.float64)
    axes = tuple(range(1, diff.ndim))
    return {"pixel_mae": np.abs(diff).mean(axes) / 255.0, "pixel_rmse": np.sqrt((diff ** 2).mean(axes)) / 255.0}


class ImagenetClassifier:
    """EfficientNet-Lite0's ImageNet head (saeengine.backbones.load_backbone, offline
    weights): uint8 images [n, H, W, 3] -> log-probabilities [n, 1000]."""

    def __init__(self, backbone=None, batch_size: int = 32):
        if backbone is None:
            from ..backbones import load_backbone

            backbone = load_backbone("efficientnet-lite0")
        self.backbone, self.batch_size = backbone, batch_size

    @torch.no_grad()
    def log_probs(self, images: np.ndarray) -> np.ndarray:
        from ..eval.experiments.common import pixels_of

        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = pixels_of(images[start:start + self.batch_size], self.backbone, self.backbone.image_size)
            logits = self.backbone.forward(pixels.to(self.backbone.device)).double()
            out.append(torch.log_softmax(logits, dim=1).cpu().numpy())
        return np.concatenate(out)


def class_shift(log_p: np.ndarray, log_p0: np.ndarray) -> dict[str, np.ndarray]:
    """Log-probabilities [n, C] of the steered and the alpha = 0 images -> {"top1" [n] int,
    "top1_change" [n] float (0/1), "kl" [n] = KL(p0 || p) = sum p0 (log p0 - log p)}."""
    top1, top1_0 = log_p.argmax(1), log_p0.argmax(1)
    kl = (np.exp(log_p0) * (log_p0 - log_p)).sum(1)
    return {"top1": top1, "top1_change": (top1 != top1_0).astype(np.float64), "kl": np.maximum(kl, 0.0)}


class ClipScorer:
    """CLIP score 100 * max(cos(image, text), 0) with a local transformers CLIPModel folder
    (its CLIPProcessor beside it); nothing is downloaded."""

    def __init__(self, folder, device=None):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"--clip {folder} is not a folder: pass a local CLIPModel folder (save_pretrained)")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise InputError(f"{folder} does not load as a CLIPModel with its CLIPProcessor ({type(exc).__name__}: "
                             f"{exc}); pass a local folder holding both") from None
        if device is not None:
            self.model.to(device)
        self.folder = str(folder)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [n, H, W, 3] -> [n, p] unit rows."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        feats = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        feats = getattr(feats, "pooler_output", feats)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """texts -> [n, p] unit rows."""
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        feats = self.model.get_text_features(**{k: v.to(self.device) for k, v in inputs.items()})
        feats = getattr(feats, "pooler_output", feats)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def scores(self, images: np.ndarray, texts: list[str]) -> np.ndarray:
        """[n] float64: image i against text i."""
        cos = (self.image_embeds(images) * self.text_embeds(texts)).sum(1)
        return (100.0 * cos.clamp_min(0)).double().numpy()
