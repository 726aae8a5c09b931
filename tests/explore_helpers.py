"""A tiny REAL encode output for the explorer's tests (test_explore_api, test_explore_browser).

EfficientNet-Lite0 (its ImageNet weights, offline) features of 24 MNIST digits at 96 px,
recorded at blocks.5 (80 channels, stride 16: a 6x6 patch grid, 36 tokens per image), a
TopK SAE (F=128, k=8) trained on that store, and ``encode_store`` over it. The digits are
PNG files listed by absolute path, so the store's recorded image paths open from anywhere
and the explorer finds the pixels itself.

Layout under the base folder::

    images/digit-XX.png   the 24 digits (28x28 grey)
    images.txt            their absolute paths, one a line (what was recorded)
    acts/blocks.5/        the activation store
    run/sae/              the trained SAE (config.json names the store it was trained on)
    encoded/              the encode output: make_explore_dir returns this folder

Built once per process (about 5-10 s on 2 cores) and shared by every test of the session.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

N_IMAGES = 24
IMAGE_SIZE = 96
LAYER = "blocks.5"
D_SAE = 128
K = 8
GRID = (6, 6)  # 96 px / stride 16

_built: dict[str, Path] = {}
_lock = threading.Lock()


def _base(where) -> Path:
    if hasattr(where, "mktemp"):  # pytest's tmp_path_factory
        return Path(where.mktemp("explore"))
    return Path(where)


def make_explore_dir(where) -> Path:
    """The encode output folder (built under ``where``: a tmp_path_factory or a folder),
    built once per process: later calls return the first one."""
    with _lock:
        if "dir" in _built and (_built["dir"] / "summary.json").is_file():
            return _built["dir"]
        _built["dir"] = build_explore_dir(_base(where))
        return _built["dir"]


def build_explore_dir(base: Path) -> Path:
    """Build the folders above under ``base``; returns base/encoded."""
    from PIL import Image

    from saeengine.backbones import load_backbone, record_activations
    from saeengine.eval.datasets import mnist_digits
    from saeengine.eval.encode import encode_store
    from saeengine.store import ActivationStore
    from saeengine.trainer import TrainConfig, train

    torch.manual_seed(0)
    base = Path(base)
    images, labels = mnist_digits(N_IMAGES, seed=0)
    folder = base / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / f"digit-{i:02d}-{int(label)}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path.resolve()))
    listing = base / "images.txt"
    listing.write_text("\n".join(paths) + "\n")
    backbone = load_backbone("efficientnet-lite0")
    backbone.image_size = IMAGE_SIZE
    store_dir = record_activations(backbone, listing, [LAYER], base / "acts", batch_size=N_IMAGES,
                                   progress=False)[LAYER]
    store = ActivationStore(store_dir)
    n = store.n_tokens
    cfg = TrainConfig(d_sae=D_SAE, k=K, total_tokens=30 * n, batch_size=256, warmup_steps=10, seed=0, device="cpu",
                      out_dir=str(base / "run"), name="sae", progress=False, log_every=10**9,
                      dead_after_tokens=n, resume=False)
    sae = train(str(store_dir), cfg)
    encode_store(sae, store, base / "encoded", top_k=16, device="cpu", backend="torch", progress=False,
                 sae_dir=base / "run" / "sae")
    return base / "encoded"


@pytest.fixture(scope="session")
def explore_dir(tmp_path_factory) -> Path:
    """The tiny encode output (session-scoped): import this fixture into a test module
    (``from explore_helpers import explore_dir  # noqa: F401``)."""
    return make_explore_dir(tmp_path_factory)


def labels_of_images() -> np.ndarray:
    """The digits' labels, in image order (the same draw as the build)."""
    from saeengine.eval.datasets import mnist_digits

    return mnist_digits(N_IMAGES, seed=0)[1]
