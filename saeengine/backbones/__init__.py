"""Vision backbones: adapters behind one registry, activation recording, and splicing an
SAE back into a model."""

from .base import Backbone, find_block_list, load_images
from .families import REGISTRY, efficientnet_lite, load_backbone, open_clip_vision, timm_vit, transformers_vision
from .images import ImageSource, image_suffixes
from .record import record_activations
from .sequence import MultimodalBackbone, TextEncoderBackbone, llava, text_encoder
from .splice import set_latent, splice

__all__ = [
    "REGISTRY",
    "Backbone",
    "ImageSource",
    "MultimodalBackbone",
    "TextEncoderBackbone",
    "efficientnet_lite",
    "find_block_list",
    "image_suffixes",
    "load_backbone",
    "llava",
    "load_images",
    "open_clip_vision",
    "record_activations",
    "set_latent",
    "splice",
    "text_encoder",
    "timm_vit",
    "transformers_vision",
]
