"""Backbones whose inputs are token sequences: the text encoders of diffusion pipelines,
and multimodal LLMs whose sequences mix image and text tokens.

Positions are labelled from the input ids:
- text encoders: bos, text, eos, pad;
- multimodal LLMs: image, text, pad.

The "image index" of a recorded token is the index of its prompt or example.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Backbone, find_block_list


def _pad_ids(sequences, pad_id: int) -> dict:
    """Lists of token ids -> input_ids and attention_mask [B, T_max] (right padding)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TextEncoderBackbone(Backbone):
    """A diffusion pipeline's text encoder (CLIPTextModel, or the second, projected encoder
    of SDXL-style pipelines), recorded per prompt token.

    Inputs: prompts (strings, with a tokenizer) or lists of token ids.
    """

    fixed_layout = False
    TOKEN_KINDS = ("bos", "text", "eos", "pad")

    def __init__(self, model, tokenizer=None, name: str = "text-encoder", max_length: int | None = None):
        config = model.config
        super().__init__(model, name, image_size=0, mean=(0, 0, 0), std=(1, 1, 1),
                         blocks=find_block_list(model)[1], forward=lambda inputs: model(**inputs))
        self.tokenizer = tokenizer
        self.max_length = max_length or getattr(config, "max_position_embeddings", 77)
        self.bos_id, self.eos_id = config.bos_token_id, config.eos_token_id
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else self.eos_id

    def load_inputs(self, items) -> list:
        return list(items)

    def preprocess(self, items) -> dict:
        if all(isinstance(item, str) for item in items):
            if self.tokenizer is None:
                raise ValueError(f"{self.name}: prompts need a tokenizer; pass tokenizer=, or lists of token ids")
            return dict(self.tokenizer(list(items), padding="max_length", max_length=self.max_length,
                                       truncation=True, return_tensors="pt"))
        return _pad_ids(items, self.pad_id)

    def sample_token_kinds(self, inputs, n_tokens: int) -> list[list[str]]:
        kinds = []
        for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
            row = []
            for i, (token, valid) in enumerate(zip(ids, mask)):
                if not valid:
                    row.append("pad")
                elif i == 0 and token == self.bos_id:
                    row.append("bos")
                elif token == self.eos_id:
                    row.append("eos")
                else:
                    row.append("text")
            kinds.append(row)
        return kinds


def text_encoder(source, tokenizer=None, *, subfolder: str = "text_encoder") -> TextEncoderBackbone:
    """A text encoder instance, or a local diffusers pipeline folder: ``subfolder`` is
    "text_encoder" or, for SDXL-style pipelines, "text_encoder_2" (with its tokenizer from
    "tokenizer" / "tokenizer_2")."""
    if isinstance(source, (str, Path)):
        import transformers

        folder = Path(source)
        if not (folder / subfolder).is_dir():
            raise FileNotFoundError(f"{folder / subfolder} does not exist: pass a local pipeline folder")
        model = transformers.AutoModel.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
        tok_folder = "tokenizer_2" if subfolder.endswith("_2") else "tokenizer"
        if tokenizer is None and (folder / tok_folder).is_dir():
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, subfolder=tok_folder, local_files_only=True)
        return TextEncoderBackbone(model, tokenizer, name=f"text-encoder:{subfolder}")
    return TextEncoderBackbone(source, tokenizer)


class MultimodalBackbone(Backbone):
    """A LLaVA-style model: the language model's residual stream, each position labelled
    "image" (an image-token id) or "text".

    Inputs are examples: dicts with input_ids (image tokens already expanded, as the
    model's processor makes them) and pixel_values [n_images, 3, H, W].
    """

    fixed_layout = False
    TOKEN_KINDS = ("image", "text", "pad")

    def __init__(self, model, name: str = "llava"):
        language_model = model.get_decoder() if hasattr(model, "get_decoder") else model.language_model
        config = model.config
        self.image_token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index")
        text_config = getattr(config, "text_config", config)
        self.pad_id = getattr(text_config, "pad_token_id", None)
        super().__init__(model, name, image_size=0, mean=(0, 0, 0), std=(1, 1, 1),
                         blocks=find_block_list(language_model)[1], forward=lambda inputs: model(**inputs))

    def load_inputs(self, items) -> list:
        return list(items)

    def preprocess(self, items) -> dict:
        batch = _pad_ids([item["input_ids"] for item in items], self.pad_id if self.pad_id is not None else 0)
        batch["pixel_values"] = torch.cat([torch.as_tensor(item["pixel_values"]) for item in items])
        if "image_sizes" in items[0]:  # LLaVA-NeXT-style models tile each image by its size
            batch["image_sizes"] = torch.cat([torch.as_tensor(item["image_sizes"]) for item in items])
        return batch

    def sample_token_kinds(self, inputs, n_tokens: int) -> list[list[str]]:
        return [["pad" if not valid else "image" if token == self.image_token_id else "text"
                 for token, valid in zip(ids, mask)]
                for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist())]


def llava(source) -> MultimodalBackbone:
    """A LLaVA-style transformers model instance, or a local folder."""
    if isinstance(source, (str, Path)):
        import transformers

        model = transformers.AutoModelForImageTextToText.from_pretrained(str(source), local_files_only=True)
        return MultimodalBackbone(model, name=f"llava:{Path(source).name}")
    return MultimodalBackbone(source)
