"""Describers: what attribute discovery measures on an image.

A :class:`Describer` turns a batch of images into named attribute values, one per image.
How two values of an attribute are compared (steered vs base) is the attribute's *kind*:

- ``"linear"``: change = steered - base (brightness, saturation, edge density, ...);
- ``"circular"``: a value in [0, 1) turns (hue); change = the difference wrapped into
  [-0.5, 0.5), so 0.95 -> 0.05 is +0.1 turn, not -0.9;
- ``"categorical"``: a class id (the top-1 ImageNet label); change = 1.0 where the two
  differ, 0.0 where they agree; discovery reports it as ``<attribute>_change``;
- ``"presence"``: 1.0 / 0.0 (a word in a caption); change = steered - base in {-1, 0, 1};
  an attribute missing from one call's output counts as absent (0) there.

Built in: :class:`ImageStats` (brightness, saturation, hue, edge density, colourfulness),
:class:`LabelDescriber` (EfficientNet-Lite0's ImageNet top-1 label) and
:class:`CaptionDescriber` (a vision-language model's caption, as word presences; built
from a local model folder with :meth:`CaptionDescriber.from_pretrained`). Definitions and
sources: docs/attributes.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import InputError

KINDS = ("linear", "circular", "categorical", "presence")

# skimage.color.rgb2gray's luma weights (ITU-R BT.709 on the stored, gamma-encoded values)
_LUMA = np.array([0.2125, 0.7154, 0.0721])
EDGE_THRESHOLD = 0.1  # Sobel magnitude (skimage's scale, grey in [0, 1]) above which a pixel is an edge


@runtime_checkable
class Describer(Protocol):
    """Images -> named attribute values.

    ``name``: what the report calls the describer. ``describe(images)``: images uint8
    [n, H, W, 3] -> {attribute: float64 [n]} (NaN where the value is undefined for an
    image; discovery leaves such pairs out). ``kind(attribute)`` (optional; default
    "linear") says how values compare (see the module docstring); ``categories(attribute)``
    (optional) names the class ids of a categorical attribute.
    """

    name: str

    def describe(self, images: np.ndarray) -> dict[str, np.ndarray]:
        ...


def attribute_kind(describer, attribute: str) -> str:
    """The kind of ``attribute`` as ``describer`` declares it ("linear" when it declares none)."""
    kind = describer.kind(attribute) if hasattr(describer, "kind") else "linear"
    if kind not in KINDS:
        raise InputError(f"describer {getattr(describer, 'name', describer)!r} gives attribute {attribute!r} the "
                         f"kind {kind!r}; a kind is one of {', '.join(KINDS)}")
    return kind


def check_images(images) -> np.ndarray:
    """``images`` as a uint8 array [n, H, W, 3] (n >= 1); InputError otherwise."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise InputError(f"images must be uint8 [n, H, W, 3] with n >= 1, got {images.dtype} {list(images.shape)}; "
                         "pass RGB images as 8-bit arrays")
    return images


def wrap_turns(delta: np.ndarray) -> np.ndarray:
    """Circular differences in turns, wrapped into [-0.5, 0.5)."""
    return (np.asarray(delta, dtype=np.float64) + 0.5) % 1.0 - 0.5


def change(kind: str, base: np.ndarray, steered: np.ndarray) -> np.ndarray:
    """The paired change of an attribute of ``kind`` (float64 [n]; NaN where either value is)."""
    base, steered = np.asarray(base, dtype=np.float64), np.asarray(steered, dtype=np.float64)
    if kind == "circular":
        return wrap_turns(steered - base)
    if kind == "categorical":
        out = (steered != base).astype(np.float64)
        out[~(np.isfinite(base) & np.isfinite(steered))] = np.nan
        return out
    return steered - base


# ----- image statistics --------------------------------------------------------------------------

def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """rgb float [..., 3] in [0, 1] -> (hue in [0, 1) turns, saturation, value, chroma)
    with skimage.color.rgb2hsv's conventions (hue 0 and saturation 0 where undefined)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        saturation = np.where(value > 0, chroma / value, 0.0)
        safe = np.where(chroma > 0, chroma, 1.0)
        hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(chroma > 0, (hue / 6.0) % 1.0, 0.0)
    return hue, saturation, value, chroma


def _sobel_magnitude(grey: np.ndarray) -> np.ndarray:
    """grey [n, H, W] -> skimage.filters.sobel's magnitude sqrt((Gh^2 + Gv^2) / 2), with its
    kernels ([1, 2, 1] / 4 smoothing x [1, 0, -1] difference) and its edge mode (scipy's
    "reflect", i.e. the border pixel repeated)."""
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="symmetric")
    rows = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # smoothed along H: [n, H, W+2]
    cols = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]  # smoothed along W: [n, H+2, W]
    gv = (rows[:, :, :-2] - rows[:, :, 2:]) / 4.0  # difference along W
    gh = (cols[:, :-2, :] - cols[:, 2:, :]) / 4.0  # difference along H
    return np.sqrt((gh ** 2 + gv ** 2) / 2.0)


def colourfulness(rgb255: np.ndarray) -> np.ndarray:
    """Hasler & Suesstrunk's (2003) colourfulness of images [n, H, W, 3] on the 0..255 scale:
    rg = R - G, yb = (R + G) / 2 - B, M = sqrt(var_rg + var_yb) + 0.3 sqrt(mean_rg^2 + mean_yb^2)
    (population variances over each image's pixels) -> float64 [n]."""
    x = rgb255.astype(np.float64).reshape(rgb255.shape[0], -1, 3)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    return (np.sqrt(rg.var(axis=1) + yb.var(axis=1))
            + 0.3 * np.sqrt(rg.mean(axis=1) ** 2 + yb.mean(axis=1) ** 2))


class ImageStats:
    """Per-image statistics, computed from the pixels alone:

    - brightness: mean luma (skimage.color.rgb2gray's weights) in [0, 1];
    - saturation: mean HSV saturation (max - min) / max, in [0, 1];
    - hue: circular mean of the HSV hue in turns [0, 1), each pixel weighted by its chroma
      max - min (grey pixels have no hue); NaN for an image without any colour. Kind
      "circular";
    - edge_density: share of pixels whose Sobel magnitude on the grey image exceeds
      ``edge_threshold`` (0.1 on skimage's scale);
    - colourfulness: Hasler & Suesstrunk (2003), on the 0..255 scale.
    """

    name = "stats"
    ATTRIBUTES = ("brightness", "saturation", "hue", "edge_density", "colourfulness")

    def __init__(self, edge_threshold: float = EDGE_THRESHOLD):
        self.edge_threshold = float(edge_threshold)

    def kind(self, attribute: str) -> str:
        return "circular" if attribute == "hue" else "linear"

    def describe(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = check_images(images)
        rgb = images.astype(np.float64) / 255.0
        hue, saturation, _, chroma = _hsv(rgb)
        grey = rgb @ _LUMA
        n = images.shape[0]
        vector = (chroma * np.exp(2j * np.pi * hue)).reshape(n, -1).sum(axis=1)
        weight = chroma.reshape(n, -1).sum(axis=1)
        with np.errstate(invalid="ignore"):
            mean_hue = np.where(weight > 0, (np.angle(vector) / (2 * np.pi)) % 1.0, np.nan)
        return {
            "brightness": grey.reshape(n, -1).mean(axis=1),
            "saturation": saturation.reshape(n, -1).mean(axis=1),
            "hue": mean_hue,
            "edge_density": (_sobel_magnitude(grey) > self.edge_threshold).reshape(n, -1).mean(axis=1),
            "colourfulness": colourfulness(images),
        }


# ----- EfficientNet-Lite0's ImageNet label -------------------------------------------------------

def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard class-index order (torchvision's
    table, which EfficientNet-Lite0's head follows); "class <i>" without torchvision."""
    try:
        from torchvision.models import ResNet18_Weights

        return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # noqa: BLE001 - the names only label the report
        return [f"class {i}" for i in range(1000)]


class LabelDescriber:
    """EfficientNet-Lite0's top-1 ImageNet class of each image (attribute "label", kind
    "categorical": discovery reports "label_change", the share of pairs whose top-1 class
    changed, and the classes the steered images gained).

    backbone: a saeengine Backbone over EfficientNet-Lite0 (default: the packaged ImageNet
    weights, ``load_backbone("efficientnet-lite0")``). size: the input side the images are
    resized to (bilinear), 224 as the model was trained. batch_size: images per forward.
    """

    name = "label"

    def __init__(self, backbone=None, *, size: int = 224, batch_size: int = 32, device=None):
        from ..backbones import load_backbone
        from ._args import count

        self.backbone = backbone if backbone is not None else load_backbone("efficientnet-lite0")
        if device is not None:
            self.backbone.model.to(device)
        self.size = count("size", size, 8)
        self.batch_size = count("batch_size", batch_size)
        self._names = imagenet_class_names()

    def kind(self, attribute: str) -> str:
        return "categorical"

    def categories(self, attribute: str) -> list[str]:
        return self._names

    def describe(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        from .experiments.common import pixels_of

        images = check_images(images)
        top = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                pixels = pixels_of(images[start:start + self.batch_size], self.backbone, self.size)
                logits = self.backbone.forward(pixels.to(self.backbone.device))
                top.append(logits.argmax(dim=1).cpu().numpy())
        return {"label": np.concatenate(top).astype(np.float64)}


# ----- a vision-language model's captions --------------------------------------------------------

# Words a caption is made of whatever the image shows (they would only add tests).
STOPWORDS = frozenset("""a an the of in on at to and or with without is are was were be being been this that these
those it its there here image picture photo photograph showing shows shown of by for from as into over under near
some very has have having which who what while his her their them they he she we you i""".split())


def caption_words(caption: str) -> set[str]:
    """The content words of a caption: lower-cased runs of letters, stopwords and one-letter
    words dropped."""
    return {w for w in re.findall(r"[a-z]+", caption.lower()) if len(w) > 1 and w not in STOPWORDS}


class CaptionDescriber:
    """A vision-language model's caption of each image, as word presences: attribute
    "says:<word>" = 1.0 where the caption has the word, 0.0 where not (kind "presence").
    Discovery then asks which words the steered captions gain or lose consistently (the
    "caption both and diff the captions" reading of the spec's VLM describer).

    captioner: images uint8 [n, H, W, 3] -> n caption strings (any model; tests pass a
    function). :meth:`from_pretrained` builds one from a local transformers folder.
    """

    name = "vlm"

    def __init__(self, captioner: Callable[[np.ndarray], Sequence[str]], *, name: str = "vlm"):
        self.captioner = captioner
        self.name = name
        self.last_captions: list[str] = []

    def kind(self, attribute: str) -> str:
        return "presence"

    def describe(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = check_images(images)
        captions = [str(c) for c in self.captioner(images)]
        if len(captions) != images.shape[0]:
            raise InputError(f"the captioner of describer {self.name!r} returned {len(captions)} captions for "
                             f"{images.shape[0]} images; it must return one caption per image")
        self.last_captions = captions
        words = [caption_words(c) for c in captions]
        vocabulary = sorted(set().union(*words))
        return {f"says:{w}": np.array([float(w in ws) for ws in words]) for w in vocabulary}

    @classmethod
    def from_pretrained(cls, path, *, prompt: str | None = "Describe this image in a few words.",
                        max_new_tokens: int = 24, device=None, batch_size: int = 8) -> "CaptionDescriber":
        """A captioning model from a local folder (transformers, ``local_files_only``): any
        model AutoModelForImageTextToText loads (BLIP, LLaVA, Qwen-VL, ...), with its
        processor. A processor with a chat template is asked ``prompt`` beside the image;
        one without (BLIP) gets ``prompt`` as the caption's text prefix, or none when
        ``prompt`` is None. Greedy decoding of ``max_new_tokens`` tokens."""
        import torch
        import transformers

        folder = Path(path)
        if not folder.is_dir():
            raise InputError(f"vlm={path}: no such folder; pass a local folder holding a transformers "
                             "image-text-to-text model and its processor (saved with save_pretrained)")
        try:
            processor = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
            model = transformers.AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loading failure gets the same advice
            raise InputError(f"vlm={path}: could not load a vision-language model and its processor from this "
                             f"folder ({type(exc).__name__}: {exc}); it must hold a model that transformers' "
                             "AutoModelForImageTextToText loads, and its processor") from exc
        model = model.eval().to(device or "cpu")
        chat = getattr(processor, "chat_template", None) is not None and prompt is not None

        def captioner(images: np.ndarray) -> list[str]:
            from PIL import Image

            out: list[str] = []
            for start in range(0, images.shape[0], batch_size):
                pils = [Image.fromarray(im) for im in images[start:start + batch_size]]
                if chat:
                    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
                    text = [processor.apply_chat_template(messages, add_generation_prompt=True)] * len(pils)
                    inputs = processor(images=pils, text=text, return_tensors="pt", padding=True)
                elif prompt is not None:
                    inputs = processor(images=pils, text=[prompt] * len(pils), return_tensors="pt", padding=True)
                else:
                    inputs = processor(images=pils, return_tensors="pt")
                inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                with torch.no_grad():
                    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                if "input_ids" in inputs and ids.shape[1] > inputs["input_ids"].shape[1] and chat:
                    ids = ids[:, inputs["input_ids"].shape[1]:]  # decoder-only models echo the prompt
                out.extend(processor.batch_decode(ids, skip_special_tokens=True))
            return out

        return cls(captioner, name=f"vlm:{folder.name}")


# ----- by name -----------------------------------------------------------------------------------

DESCRIBER_NAMES = ("stats", "label", "vlm=PATH")


def parse_describers(text: str) -> list[tuple[str, str | None]]:
    """"stats,label,vlm=/models/blip" -> [("stats", None), ("label", None), ("vlm", "/models/blip")];
    InputError for an unknown name, a vlm without a path, a repeat, or nothing."""
    specs: list[tuple[str, str | None]] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if name not in ("stats", "label", "vlm") or (name == "vlm") != bool(sep and value):
            raise InputError(f"unknown describer {part!r}; choose from stats, label, vlm=PATH (a local "
                             "vision-language model folder), comma-separated")
        if any(name == seen for seen, _ in specs):
            raise InputError(f"describer {name!r} is named twice in {text!r}; name each once")
        specs.append((name, value or None))
    if not specs:
        raise InputError(f"no describer in {text!r}; name at least one of stats, label, vlm=PATH")
    return specs


def build_describers(text: str, *, device=None) -> list:
    """The describers named by ``text`` (see :func:`parse_describers`)."""
    built = []
    for name, value in parse_describers(text):
        if name == "stats":
            built.append(ImageStats())
        elif name == "label":
            built.append(LabelDescriber(device=device))
        else:
            built.append(CaptionDescriber.from_pretrained(value, device=device))
    return built


__all__ = ["Describer", "ImageStats", "LabelDescriber", "CaptionDescriber", "attribute_kind", "change",
           "wrap_turns", "colourfulness", "caption_words", "parse_describers", "build_describers",
           "imagenet_class_names", "KINDS"]
