"""The tokens of the modality task and the per-layer table: record a LLaVA-style model's
residual stream over (image, caption) pairs, or draw the planted-direction synthetic pairs;
then per layer, train a small SAE on the tokens (or take a given one), encode them in
chunks, and measure the modality scores, the shared latents and the pair grounding
(saeengine.eval.modality; definitions in docs/modality.md).

Recording goes through MultimodalBackbone and record_activations: one activation store per
layer under out_dir (streamed, nothing held but a batch). Each example's sequence is
labelled from its input ids: image tokens (the model's image token id), text tokens (the
rest, pad excluded); the caption tokens, the text side of the pair grounding, are the text
tokens after the example's last image token (the prompt template puts the caption there;
text before the image, such as <s>, counts as text for the rates but not for grounding).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ._args import count
from .modality import MIN_RATE, SHARED_HIGH, SHARED_LOW, ModalityCounts, PairSets

DEFAULT_TEMPLATE = "<image>\n{caption}"


@dataclasses.dataclass
class ModalityTokens:
    """The tokens of one pass, at one or more layers, with their labels.

    layers:  {layer name: tokens [N, d] float tensor or an ActivationStore of N rows}; every
             layer holds the same N tokens in the same order.
    image:   [N] bool, an image token (else a text token).
    pair:    [N] int64, the (image, caption) pair of the token.
    caption: [N] bool, a text token of the pair's caption (the text side of grounding).
    directions: synthetic data only: {layer: {"image": [C, d], "text": [C, d]}}, the planted
             concept directions as image tokens and as text tokens carry them.
    """

    layers: dict
    image: torch.Tensor
    pair: torch.Tensor
    caption: torch.Tensor
    directions: dict | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.image.shape[0])


# ----- synthetic pairs with planted concept directions --------------------------------------
def synthetic_pairs(*, n_pairs: int = 240, d: int = 48, n_concepts: int = 12, n_styles: int = 8,
                    image_tokens: int = 6, caption_tokens: int = 4, shared: bool = True, noise: float = 0.05,
                    seed: int = 0) -> ModalityTokens:
    """Pairs whose image and caption tokens carry the pair's concept, beside features of
    their own modality ("styles").

    Every pair i has a concept c_i (uniform over n_concepts). Every token is the sum of two
    features with amplitudes ~ U(1, 2), plus N(0, noise^2) noise per dimension: slot 1 is
    the pair's concept (probability 0.8 on image tokens, 0.7 on caption tokens), else a
    style; slot 2 is a style, another than slot 1's. Image tokens draw their styles from
    n_styles image-only directions v, caption tokens from n_styles text-only directions w.
    The concept is u_img[c_i] on image tokens and u_txt[c_i] on caption tokens. All
    directions are orthonormal. shared=True: u_img = u_txt (one direction per concept in
    both modalities: its latents should be shared); shared=False, the control: u_img and
    u_txt are disjoint (no latent should be shared, the grounding is at chance). Two
    features per token: a TopK SAE with k = 2 has no slot left to fire on noise. The
    layer is named "planted-shared" or "disjoint-control"; each pair is image_tokens image
    tokens then caption_tokens caption tokens.
    """
    n_pairs, d, n_concepts = count("n_pairs", n_pairs, 2), count("d", d), count("n_concepts", n_concepts)
    n_styles = count("n_styles", n_styles, 2)
    image_tokens, caption_tokens = count("image_tokens", image_tokens), count("caption_tokens", caption_tokens)
    needed = n_concepts * (1 if shared else 2) + 2 * n_styles
    if d < needed:
        raise InputError(f"d={d} cannot hold {needed} orthonormal directions; use d >= {needed}")
    gen = torch.Generator().manual_seed(int(seed))
    basis = torch.linalg.qr(torch.randn(d, needed, generator=gen, dtype=torch.float64))[0].T.float()  # [needed, d]
    u_img = basis[:n_concepts]
    u_txt = u_img if shared else basis[n_concepts:2 * n_concepts]
    v, w = basis[needed - 2 * n_styles:needed - n_styles], basis[needed - n_styles:]
    concept = torch.randint(n_concepts, (n_pairs,), generator=gen)
    per_pair = image_tokens + caption_tokens
    image = torch.tensor(([True] * image_tokens + [False] * caption_tokens) * n_pairs)
    pair = torch.arange(n_pairs).repeat_interleave(per_pair)
    n = n_pairs * per_pair
    c = concept[pair]
    style = torch.randint(n_styles, (n,), generator=gen)
    other = (style + 1 + torch.randint(n_styles - 1, (n,), generator=gen)) % n_styles
    picks = torch.stack([style, other], 1)  # [n, 2]
    styles = torch.where(image[:, None, None], v[picks], w[picks])  # [n, 2, d]
    has_concept = torch.rand(n, generator=gen) < torch.where(image, 0.8, 0.7)
    first = torch.where(has_concept[:, None], torch.where(image[:, None], u_img[c], u_txt[c]), styles[:, 1])
    amp = 1 + torch.rand(n, 2, generator=gen)
    tokens = amp[:, :1] * first + amp[:, 1:] * styles[:, 0] + noise * torch.randn(n, d, generator=gen)
    name = "planted-shared" if shared else "disjoint-control"
    return ModalityTokens(layers={name: tokens}, image=image, pair=pair, caption=~image,
                          directions={name: {"image": u_img, "text": u_txt}})


def concepts_found(sae, directions: dict, shared: np.ndarray, threshold: float = 0.9) -> dict:
    """How many planted concepts a shared latent recovers: for each concept c, the best
    cosine between a shared latent's decoder row and the concept's image direction (and
    its text direction); found when both are >= threshold."""
    rows = torch.nn.functional.normalize(sae.W_dec.detach().float().cpu(), dim=1)[torch.from_numpy(shared)]
    out = {}
    for side in ("image", "text"):
        target = torch.nn.functional.normalize(directions[side].float(), dim=1)
        out[side] = (target @ rows.T).max(1).values if rows.shape[0] else torch.zeros(target.shape[0])
    both = torch.minimum(out["image"], out["text"])
    return {"n_concepts": int(both.shape[0]), "found": int((both >= threshold).sum()), "threshold": threshold,
            "best_cosine": both.tolist()}


# ----- LLaVA-style models -------------------------------------------------------------------
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


# ----- the per-layer table -------------------------------------------------------------------
def _rows(tokens, start: int, stop: int) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens[start:stop].float()
    return tokens.get(np.arange(start, stop)).float()


def _all_rows(tokens) -> torch.Tensor:
    return tokens.float() if isinstance(tokens, torch.Tensor) else _rows(tokens, 0, tokens.n_tokens)


@torch.no_grad()
def measure_layer(sae, tokens, data: ModalityTokens, *, low: float = SHARED_LOW, high: float = SHARED_HIGH,
                  min_rate: float = MIN_RATE, min_share: float = 0.0, seed: int = 0, chunk: int = 4096,
                  progress: bool = False, desc: str = "encode") -> tuple[dict, dict, dict]:
    """Encode one layer's tokens in chunks -> (modality result, grounding result, the
    reconstruction metrics {"fvu", "l0"})."""
    from .batch import code_pairs
    from .metrics import ReconstructionMetrics

    chunk = count("chunk", chunk)
    n = data.n_tokens
    n_rows = tokens.shape[0] if isinstance(tokens, torch.Tensor) else tokens.n_tokens
    if n_rows != n:
        raise InputError(f"the layer holds {n_rows} tokens but the labels {n}; record all layers in one pass")
    counts, sets, metrics = ModalityCounts(sae.cfg.d_sae), PairSets(sae.cfg.d_sae), ReconstructionMetrics()
    device = next(sae.parameters()).device
    for start in tqdm(range(0, n, chunk), desc=desc, unit="chunk", disable=not progress):
        stop = min(start + chunk, n)
        x = _rows(tokens, start, stop).to(device)
        code = sae.encode(x)
        values, indices = code_pairs(code)
        metrics.add(x, sae.decode(code).float(), values)
        image = data.image[start:stop]
        counts.add(values, indices, kinds=image)
        grounded = image | data.caption[start:stop]  # the image side and the caption side
        sets.add(values[grounded.to(values.device)], indices[grounded.to(indices.device)],
                 pairs=data.pair[start:stop][grounded], kinds=image[grounded])
    scores = metrics.result()
    return (counts.result(low=low, high=high, min_rate=min_rate), sets.result(min_share=min_share, seed=seed),
            {"fvu": scores["fvu"], "l0": scores["l0"]})


def analyze(data: ModalityTokens, *, saes: dict | None = None, d_sae: int | None = None, k: int = 16,
            epochs: int = 20, seed: int = 0, sae_dir: str | Path | None = None, low: float = SHARED_LOW,
            high: float = SHARED_HIGH, min_rate: float = MIN_RATE, min_share: float = 0.0, chunk: int = 4096,
            progress: bool = True) -> dict:
    """The per-layer table of ``data``: for each layer, the given SAE (saes[layer]) or one
    trained here on all its tokens (TopK, d_sae latents, default 4 x d; k; saved under
    sae_dir/<layer>/sae when sae_dir is given).

    Returns {"layers": [row per layer], "latents": {layer: {"p_img", "p_txt", "score",
    "category"} [F] each}, "grounding": {layer: {"matched", "mismatched", "derangement"}}}.
    A row: layer, sae, d_sae, k, n_tokens, n_image_tokens, n_text_tokens, n_caption_tokens,
    n_pairs, fvu, l0, live, dead, image, text, shared, rare_mixed, shared_fraction,
    shared_fraction_of_all, auroc, matched_mean, mismatched_mean, image_set_size_mean,
    caption_set_size_mean (and concepts_found for the synthetic layers)."""
    from .experiments.common import train_small_sae

    saes = dict(saes or {})
    table, latents, grounding = [], {}, {}
    for layer, tokens in data.layers.items():
        sae, origin = saes.get(layer), "given"
        if sae is None:
            x = _all_rows(tokens)
            width = count("d_sae", d_sae) if d_sae is not None else 4 * x.shape[1]
            folder = Path(sae_dir) / layer if sae_dir is not None else None
            sae = train_small_sae(x, d_sae=width, k=min(count("k", k), width), epochs=epochs, seed=seed,
                                  out_dir=folder)
            origin = str(folder / "sae") if folder is not None else "trained (not saved)"
            del x
        modality, ground, recon = measure_layer(sae, tokens, data, low=low, high=high, min_rate=min_rate,
                                                min_share=min_share, seed=seed, chunk=chunk, progress=progress,
                                                desc=f"encode {layer}")
        row = {"layer": layer, "sae": origin, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "n_tokens": data.n_tokens,
               "n_image_tokens": modality["n_image_tokens"], "n_text_tokens": modality["n_text_tokens"],
               "n_caption_tokens": int(data.caption.sum()), "n_pairs": ground["n_pairs"], **recon}
        row.update({key: modality[key] for key in ("live", "dead", "image", "text", "shared", "rare_mixed",
                                                   "shared_fraction", "shared_fraction_of_all")})
        row.update({key: ground[key] for key in ("auroc", "matched_mean", "mismatched_mean", "image_set_size_mean",
                                                 "caption_set_size_mean")})
        if data.directions and layer in data.directions:
            row["concepts_found"] = concepts_found(sae, data.directions[layer], modality["is_shared"])
        table.append(row)
        latents[layer] = {key: modality[key] for key in ("p_img", "p_txt", "score", "category")}
        grounding[layer] = {key: ground[key] for key in ("matched", "mismatched", "derangement")}
    thresholds = {"low": low, "high": high, "min_rate": min_rate, "min_share": min_share, "seed": seed}
    return {"thresholds": thresholds, "layers": table, "latents": latents, "grounding": grounding}


def synthetic_demo(*, seed: int = 0, d_sae: int = 64, k: int = 2, epochs: int = 20, low: float = SHARED_LOW,
                   high: float = SHARED_HIGH, min_rate: float = MIN_RATE, min_share: float = 0.0,
                   progress: bool = True, **pairs) -> dict:
    """The planted-direction demo: synthetic_pairs (``pairs``: its options) with shared
    concept directions and the disjoint control, drawn with the same seed (so the same
    pairs, concepts and layout), each analysed as one "layer" by analyze()."""
    shared, control = (synthetic_pairs(shared=flag, seed=seed, **pairs) for flag in (True, False))
    data = ModalityTokens(layers={**shared.layers, **control.layers}, image=shared.image, pair=shared.pair,
                          caption=shared.caption, directions={**shared.directions, **control.directions})
    return analyze(data, d_sae=d_sae, k=k, epochs=epochs, seed=seed, low=low, high=high, min_rate=min_rate,
                   min_share=min_share, progress=progress)
