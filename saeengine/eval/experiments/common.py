"""What the offline experiments share: digits to pixels, a block's tokens of a batch of
images (no store needed at this scale), EfficientNet-Lite0's pooled embedding, a small
TopK SAE trained on a token tensor, and the command line that writes a result file."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...backbones.base import Backbone


def experiment_setup(size: str, sizes: dict, seed: int):
    """(the settings of ``size``, EfficientNet-Lite0 with its ImageNet weights, the start
    time), torch's generator seeded; InputError for an unknown size."""
    from ...backbones import load_backbone
    from ...errors import InputError

    if size not in sizes:
        raise InputError(f"size must be one of {sorted(sizes)}, got {size!r}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    return sizes[size], load_backbone("efficientnet-lite0"), start


def pixels_of(images: np.ndarray, backbone: Backbone, size: int) -> torch.Tensor:
    """uint8 images [n, h, w] (grey) or [n, h, w, 3] -> [n, 3, size, size] float32, resized
    bilinearly and normalized with the backbone's mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@torch.no_grad()
def block_tokens(backbone: Backbone, layer: str, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[n, T, d] float32 tokens of ``layer`` for pixels [n, 3, H, W] (the whole model runs;
    the tokens are the block output's positions, row-major)."""
    out: list[torch.Tensor] = []
    handle = backbone.layer_module(layer).register_forward_hook(
        lambda module, inputs, output: out.append(backbone.to_tokens(output).float().cpu()))
    try:
        for start in range(0, pixels.shape[0], batch_size):
            backbone.forward(pixels[start:start + batch_size].to(backbone.device))
    finally:
        handle.remove()
    return torch.cat(out)


def efficientnet_pooled(backbone: Backbone):
    """pixels [n, 3, H, W] -> [n, 1280] EfficientNet-Lite0's pooled final embedding (the
    input of its ImageNet classifier). Block hooks (splice) apply inside it."""
    model = backbone.model

    def pooled(pixels: torch.Tensor) -> torch.Tensor:
        return model._avg_pooling(model.extract_features(pixels)).flatten(1)
    return pooled


def train_small_sae(tokens: torch.Tensor, *, d_sae: int, k: int, epochs: int = 20, batch_size: int = 256,
                    seed: int = 0, out_dir: str | Path | None = None):
    """A TopK SAE trained on tokens [N, d] (mean-norm normalized, AuxK on) for ``epochs``
    passes over the tokens; saved under out_dir (a temporary folder by default)."""
    from ... import TrainConfig, train

    n = tokens.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(d_sae=d_sae, k=k, total_tokens=epochs * n, batch_size=min(batch_size, n),
                          warmup_steps=10, seed=seed, device="cpu", out_dir=str(out_dir or tmp), name="sae",
                          progress=False, log_every=10**9, dead_after_tokens=max(n, 1))
        return train(tokens.float(), cfg)


@torch.no_grad()
def sae_summary(sae, tokens: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """tokens [N, d] -> (maxima [d_sae] float32: each latent's largest value, frequency
    [d_sae] float64: share of tokens where it is > 0, {"fvu", "l0", "alive"}), from the
    evaluation's own accumulators (LatentStats, ReconstructionMetrics)."""
    from ..batch import code_pairs
    from ..latent_stats import LatentStats
    from ..metrics import ReconstructionMetrics

    stats, metrics = LatentStats(sae.cfg.d_sae), ReconstructionMetrics()
    for start in range(0, tokens.shape[0], chunk):
        x = tokens[start:start + chunk]
        code = sae.encode(x)
        values, indices = code_pairs(code)
        stats.add(values, indices)
        metrics.add(x, sae.decode(code).float(), values)
    found, scores = stats.result(), metrics.result()
    return (found["max"], found["frequency"],
            {"fvu": scores["fvu"], "l0": scores["l0"], "alive": int((found["count"] > 0).sum())})


def experiment_main(name: str, description: str, run: Callable[..., dict], argv: list[str] | None) -> int:
    """The command line of an experiment: --size, --seed, --threads, --out, --no-progress;
    writes {"date", "commit" (taken before the run), "torch", "threads", **run(size, seed,
    progress)} as strict JSON (NaN -> null), atomically."""
    from ..._atomic import atomic_write_bytes
    from ...validation import current_commit
    from .._json import jsonable

    parser = argparse.ArgumentParser(prog=f"python -m saeengine.eval.experiments.{name}", description=description)
    parser.add_argument("--size", choices=("small", "full"), default="full", help="small: the tests' size; full: the "
                        "README's numbers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data draws, the SAEs and the baselines")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); the numbers depend on it in the last bits")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stamp = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": current_commit(),
             "torch": torch.__version__, "threads": torch.get_num_threads()}
    result = {**stamp, **run(args.size, seed=args.seed, progress=not args.no_progress)}
    text = json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n"  # strict JSON: NaN -> null
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, text.encode())
    return 0
