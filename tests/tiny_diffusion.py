"""Tiny random-initialized diffusion pipelines (and a tiny CLIP) built from configs, as
diffusers' own tests build them: no download, a few denoising steps at 32x32 in well
under a second on one CPU thread.

- :func:`tiny_tokenizer`: a CLIPTokenizer over a byte-level vocabulary written here (every
  byte, every byte at a word's end, a few merges, the two CLIP specials at the end as in
  CLIP's own vocabulary), so no tokenizer files are needed;
- :func:`tiny_sd`: a StableDiffusionPipeline (UNet2DConditionModel, AutoencoderKL,
  CLIPTextModel, DDIMScheduler);
- :func:`tiny_sdxl`: a StableDiffusionXLPipeline whose two encoders have different widths
  (CLIPTextModel d=32, CLIPTextModelWithProjection d=48, projection 16), so a direction
  for one cannot be confused with one for the other;
- :func:`tiny_clip`: a CLIPModel + CLIPProcessor saved to a folder (the sweep's --clip).
"""

from __future__ import annotations

from pathlib import Path

import torch

MAX_LENGTH = 16  # the tokenizers' model_max_length (CLIP's is 77; shorter is faster here)
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("r", "e"), ("o", "n</w>"), ("c", "a"), ("ca", "t</w>"),
           ("d", "o"), ("do", "g</w>"), ("r", "ed</w>"), ("e", "d</w>")]


def tiny_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer with a ~530-token byte-level vocabulary; ``pad_token`` "<|endoftext|>"
    (Stable Diffusion's first tokenizer) or "!" (SDXL's second)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = alphabet + [c + "</w>" for c in alphabet]
    for a, b in _MERGES:
        if a + b not in pieces:
            pieces.append(a + b)
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES), pad_token=pad_token,
                         model_max_length=MAX_LENGTH)


def _text_config(tokenizer, hidden: int, layers: int = 3, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, hidden_size=hidden, intermediate_size=2 * hidden,
                          layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=layers,
                          vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH,
                          projection_dim=projection or hidden)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=2)


def tiny_sd(seed: int = 0):
    """A random StableDiffusionPipeline: text encoder width 32, 3 blocks; 32x32 images."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=2)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(seed: int = 0):
    """A random StableDiffusionXLPipeline: encoder 1 width 32, encoder 2 width 48 with a 16-d
    projection (the pooled embedding); cross-attention width 32 + 48 = 80."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer(pad_token="!")
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, 48, projection=16))
    time_dim = 8  # 6 time ids x 8 + the 16-d pooled embedding = the added embedding's input
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=80,
                                attention_head_dim=2, use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=6 * time_dim + 16,
                                norm_num_groups=2)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(),
                                     image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str | Path) -> Path:
    """save_pretrained to ``folder`` (a diffusers pipeline folder: model_index.json, one
    subfolder per component)."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A random CLIPModel (text and vision width 32, 32x32 images) and its CLIPProcessor,
    saved to ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text = _text_config(tokenizer, 32, layers=2).to_dict()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8, projection_dim=32).to_dict()
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
