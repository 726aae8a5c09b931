"""Tiny activation stores and SAEs for the encode tests (test_eval_encode, test_faults_encode,
test_hostile_encode)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saeengine import SAE, SAEConfig
from saeengine.store import ActivationWriter

D_IN = 16
MAX_TOKENS = 10  # tokens of the largest image: a CLS token at position 0, then patches
KINDS = ["cls"] + ["patch"] * (MAX_TOKENS - 1)


def image_sizes(n_images: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, MAX_TOKENS + 1, n_images)


def make_store(directory: Path, n_images: int = 12, *, seed: int = 0, d_in: int = D_IN, cls: bool = True,
               layer: str = "blocks.3", backbone: str = "tiny", shard_tokens: int = 50, dtype: str = "float16",
               sizes=None, close: bool = True, paths: bool = False) -> Path:
    """Images 0..n-1 of 1..MAX_TOKENS tokens each (positions 0..n_i - 1; with ``cls`` the
    store's token_kinds make position 0 the CLS token), random activations; with ``paths``
    image i is recorded as "img-<i>.png"."""
    rng = np.random.default_rng(seed + 1)
    sizes = image_sizes(n_images, seed) if sizes is None else np.asarray(sizes)
    extra = {"token_kinds": KINDS} if cls else {}
    writer = ActivationWriter(directory, d_in=d_in, dtype=dtype, backbone=backbone, layer=layer,
                              token_kind="cls+patch" if cls else "patch", extra=extra, shard_tokens=shard_tokens)
    if paths:
        writer.add_image_paths([f"img-{i}.png" for i in range(len(sizes))])
    for image, n in enumerate(sizes.tolist()):
        writer.add((rng.normal(size=(n, d_in)) + 0.5).astype(np.float32), np.full(n, image), np.arange(n))
    if close:
        writer.close()
    else:
        writer.flush()
        writer.abort()
    return Path(directory)


def make_sae(architecture: str = "topk", *, d_in: int = D_IN, d_sae: int = 64, k: int = 4, seed: int = 0,
             metadata: dict | None = None) -> SAE:
    """A random SAE whose latents fire on the random stores above (biases around zero)."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, architecture=architecture, metadata=metadata or {}),
              seed=seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=torch.Generator().manual_seed(seed)) * 0.1 - 0.2)
        if architecture == "batchtopk":
            sae.threshold.fill_(0.5)
    return sae.eval()


def folder_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of an encode folder but the lock (which names its last holder)."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.name != ".lock"}
