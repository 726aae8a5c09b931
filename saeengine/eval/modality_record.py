"""Recording for the modality task: a LLaVA-style model's residual stream over (image,
caption) pairs, as ModalityTokens for the per-layer table (modality_layers).

Recording goes through MultimodalBackbone and record_activations: one activation store per
layer under out_dir (streamed, nothing held but a batch). Each example's sequence is
labelled from its input ids: image tokens (the model's image token id), text tokens (the
rest, pad excluded); the caption tokens, the text side of the pair grounding, are the text
tokens after the example's last image token (the prompt template puts the caption there;
text before the image, such as <s>, counts as text for the rates but not for grounding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from .modality_layers import ModalityTokens

DEFAULT_TEMPLATE = "<image>\n{caption}"


def image_token_id(config) -> int:
    """The image token id of a LLaVA-style config (image_token_id or image_token_index);
    InputError naming the fix when it has none."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    raise InputError(f"the model's config ({type(config).__name__}) has no image_token_id / image_token_index, so "
                     "no position can be labelled an image token: pass a LLaVA-style model (a vision tower feeding a "
                     "language model, e.g. LlavaForConditionalGeneration), or set config.image_token_id to the id "
                     "its processor inserts for each image feature")


def check_llava(model) -> None:
    """InputError unless ``model`` is a LLaVA-style transformers model with an image token."""
    config = getattr(model, "config", None)
    if config is None:
        raise InputError(f"{type(model).__name__} has no config: pass a transformers LLaVA-style model")
    image_token_id(config)
    if not (hasattr(model, "get_decoder") or hasattr(model, "language_model")):
        raise InputError(f"{type(model).__name__} has no language model (get_decoder / language_model); pass a "
                         "LLaVA-style model")


def load_llava(folder: str | Path, *, device: str = "cpu", dtype: str = "float32", progress: bool = True):
    """(model in eval mode, its processor or None) from a local model folder. The config is
    checked for an image token before the weights are read."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} holds no config.json: pass a local model folder (save_pretrained's output)")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    image_token_id(config)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:  # transformers' own bars (loading the weights), switched back after
        transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            folder, local_files_only=True, dtype=getattr(torch, dtype)).to(device).eval()
        processor = None
        if (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file():
            processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model, processor


def read_pairs(path: str | Path) -> list[tuple[Path, str]]:
    """A JSON-lines file, one {"image": path, "caption": text} per line (blank lines
    skipped) -> [(image path, caption)]; image paths are resolved relative to the file's
    folder (absolute ones are kept). InputError naming the line for a bad line or a
    missing image."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such pairs file; pass a .jsonl file with one "
                         '{"image": "path", "caption": "text"} per line')
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where} is not JSON ({err.msg}); each line must be "
                             '{"image": "path", "caption": "text"}') from None
        if not isinstance(item, dict):
            raise InputError(f'{where} is not an object; each line must be {{"image": "path", "caption": "text"}}')
        for field in ("image", "caption"):
            if not isinstance(item.get(field), str) or not item[field].strip():
                raise InputError(f'{where} has no "{field}" string; each line must be '
                                 '{"image": "path", "caption": "text"}')
        image = (path.parent / item["image"]).resolve()
        if not image.is_file():
            raise InputError(f"{where}: image {image} does not exist (paths are relative to {path.parent})")
        pairs.append((image, item["caption"]))
    if len(pairs) < 2:
        raise InputError(f"{path} holds {len(pairs)} pairs; the grounding AUROC needs at least 2")
    return pairs


def examples_from_pairs(processor, pairs: Sequence[tuple], template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """(image path or PIL image, caption) pairs -> model inputs through the model's
    processor: {"input_ids": [T] list, "pixel_values": [1, 3, H, W]} each. ``template``
    holds "<image>" (the processor's image token) and "{caption}"."""
    from PIL import Image

    token = getattr(processor, "image_token", "<image>")
    if "{caption}" not in template or "<image>" not in template:
        raise InputError(f"template {template!r} must hold '<image>' and '{{caption}}'")
    out = []
    for image, caption in pairs:
        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except OSError as err:
                raise InputError(f"{image}: cannot be read as an image ({err}); fix or drop that pair") from None
        text = template.replace("<image>", token).replace("{caption}", caption)
        inputs = processor(text=text, images=image, return_tensors="pt")
        out.append({"input_ids": inputs["input_ids"][0].tolist(), "pixel_values": inputs["pixel_values"]})
    return out


def image_token_count(config) -> int:
    """Image tokens per image of a plain LLaVA config: (image_size / patch_size)^2 vision
    features, plus the CLS feature when vision_feature_select_strategy is "full"."""
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + (getattr(config, "vision_feature_select_strategy", "default") == "full")


def examples_from_ids(model, captions: Sequence[Sequence[int]], pixel_values, prefix: Sequence[int] = ()) -> list[dict]:
    """Inputs without a processor: prefix ids, the image token repeated once per vision
    feature (image_token_count), then the caption's ids. pixel_values [P, 3, H, W]
    already preprocessed, one image per caption."""
    check_llava(model)
    token, n_image = image_token_id(model.config), image_token_count(model.config)
    pixel_values = torch.as_tensor(pixel_values)
    if pixel_values.shape[0] != len(captions):
        raise InputError(f"{len(captions)} captions but {pixel_values.shape[0]} images; give one image per caption")
    return [{"input_ids": [*prefix, *[token] * n_image, *ids], "pixel_values": pixel_values[i:i + 1]}
            for i, ids in enumerate(captions)]


def layer_names(backbone, layers: Sequence[int]) -> list[str]:
    """Block indices of the language model (negative counts from the end) -> "blocks.i";
    InputError for one out of range."""
    n = len(backbone.blocks)
    names = []
    for layer in layers:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not -n <= layer < n:
            raise InputError(f"layer {layer!r} is out of range: the language model has {n} blocks, so pick layers "
                             f"from 0..{n - 1} (or -{n}..-1 from the end)")
        names.append(f"blocks.{int(layer) % n}")
    if len(set(names)) != len(names):
        raise InputError(f"layers {list(layers)} name a block twice; give each once")
    return names


def _labels(examples: list[dict], token: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per example: (image [T] bool, caption [T] bool) over its input ids."""
    images, captions = [], []
    for i, example in enumerate(examples):
        ids = np.asarray(example["input_ids"])
        image = ids == token
        if not image.any():
            raise InputError(f"pair {i} has no image token (id {token}) in its input ids: build the inputs with the "
                             "model's processor and a prompt holding <image>, or expand the image token once per "
                             "vision feature (examples_from_ids)")
        caption = np.zeros_like(image)
        caption[np.flatnonzero(image)[-1] + 1:] = True
        if not caption.any():
            raise InputError(f"pair {i} has no text after its image tokens: the caption must follow the image in "
                             "the prompt template")
        images.append(image)
        captions.append(caption)
    return images, captions


def record_pairs(model, examples: list[dict], layers: Sequence[int], out_dir: str | Path, *, batch_size: int = 8,
                 dtype: str = "float32", progress: bool = True, resume: bool = False) -> ModalityTokens:
    """Record the residual stream (block outputs) of ``layers`` over the examples' image
    and text tokens into out_dir/<blocks.i>/ (activation stores), labelled per token.
    ``model``: a LLaVA-style model (or a MultimodalBackbone). ``resume``: continue (or
    reuse, when complete) a recording of the same settings in out_dir."""
    from ..backbones import record_activations
    from ..backbones.sequence import MultimodalBackbone
    from ..store import ActivationStore

    if not isinstance(model, MultimodalBackbone):
        check_llava(model)
        model = MultimodalBackbone(model)
    backbone = model
    names = layer_names(backbone, layers)
    if len(examples) < 2:
        raise InputError(f"{len(examples)} pairs given; the grounding AUROC needs at least 2")
    images, captions = _labels(examples, backbone.image_token_id)
    stores = record_activations(backbone, examples, names, out_dir, keep=("image", "text"), batch_size=batch_size,
                                dtype=dtype, progress=progress, resume=resume)
    opened = {name: ActivationStore(stores[name]) for name in names}
    first = opened[names[0]]
    if any(store.n_tokens != first.n_tokens for store in opened.values()):  # one pass: the same rows everywhere
        raise InputError(f"the stores under {out_dir} hold different token counts "
                         f"({ {name: store.n_tokens for name, store in opened.items()} }); record into a new folder")
    example, position = first.sources(np.arange(first.n_tokens))
    offsets = np.cumsum([0] + [len(e["input_ids"]) for e in examples])
    flat = offsets[example] + position
    return ModalityTokens(layers=opened, image=torch.from_numpy(np.concatenate(images)[flat]),
                          pair=torch.from_numpy(example), caption=torch.from_numpy(np.concatenate(captions)[flat]))
