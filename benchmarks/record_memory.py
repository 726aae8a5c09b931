"""Recording memory: peak RSS of record_activations on N and factor*N images (issue 14:
10x the images, peak RSS within 20%).

    python benchmarks/record_memory.py [--images 20] [--factor 10] [--side 2000] [--out FILE]

Writes synthetic photo-like images (JPEG quality 92, about 1.6 MB at 2000x1500, and every
fourth a PNG at half the side, about 1.9 MB) into a temporary folder, then records each
folder in a fresh subprocess with a tiny random-initialized conv backbone (the model's
size does not matter here: decoding does) and reads the child's own peak RSS
(resource.getrusage ru_maxrss). Prints and writes JSON: machine, commit, date, N, both
peaks, their ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def tiny_backbone(seed: int = 0, image_size: int = 16, width: int = 8, depth: int = 3):
    """A random-initialized conv net behind the Backbone interface: blocks.0 .. blocks.{depth-1}
    give feature maps [B, width, image_size/2, image_size/2] (a token per position), the
    last one [B, width, image_size/4, image_size/4] (so layers fill their shards at
    different rates)."""
    import torch
    from torch import nn

    from saeengine.backbones import Backbone
    from saeengine.backbones.base import IMAGENET_MEAN, IMAGENET_STD

    class TinyConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Conv2d(width, width, 3, stride=2 if i == depth - 1 else 1, padding=1), nn.GELU())
                for i in range(depth))

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)
            return x.mean((2, 3))

    torch.manual_seed(seed)
    return Backbone(TinyConvNet(), "tiny-conv", image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    spatial=True)


def write_images(folder: Path, n: int, side: int, unique: int = 8, seed: int = 0) -> int:
    """n photo-like files (hard links to ``unique`` distinct ones: decoding cost and size
    are per file) -> total bytes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = []
    for i in range(min(unique, n)):
        png = i % 4 == 3
        w, h = (side // 2, side * 3 // 8) if png else (side, side * 3 // 4)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / (97.0 + 7 * i) + c) * 60 + np.cos(y / 53.0 * (c + 1)) * 60 + 128
                         for c in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"source-{i}.{'png' if png else 'jpg'}"
        Image.fromarray(pixels).save(path, **({"compress_level": 1} if png else {"quality": 92}))
        sources.append(path)
    total = 0
    for i in range(n):
        source = sources[i % len(sources)]
        target = folder / f"img-{i:05d}{source.suffix}"
        os.link(source, target)
        total += target.stat().st_size
    for source in sources:
        source.unlink()
    return total


def child(folder: str, out_dir: str, batch: int) -> None:
    """Record ``folder`` and print this process's peak RSS as JSON."""
    sys.path.insert(0, str(HERE.parent))
    from saeengine.backbones import record_activations
    from saeengine.store import ActivationStore

    stores = record_activations(tiny_backbone(), folder, ["blocks.1"], out_dir, batch_size=batch, progress=False)
    store = ActivationStore(stores["blocks.1"])
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "images": store.n_images, "tokens": store.n_tokens}))


def measure(folder: Path, out_dir: Path, batch: int) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(folder), str(out_dir),
                           "--batch", str(batch)], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"recording child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()


def run(images: int, factor: int, side: int, batch: int, workdir: Path, unique: int = 8) -> dict:
    """Measure in ``workdir``; ``unique`` distinct images are generated per folder."""
    small, large = images, images * factor
    bytes_small = write_images(workdir / "small", small, side, unique)
    bytes_large = write_images(workdir / "large", large, side, unique)
    a = measure(workdir / "small", workdir / "acts-small", batch)
    b = measure(workdir / "large", workdir / "acts-large", batch)
    assert (a["images"], b["images"]) == (small, large), (a, b)
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "HEAD") or None,
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "machine": {"node": platform.node(), "cpu": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.system()},
            "what": "record_activations of a folder, tiny conv backbone, blocks.1, peak RSS of the recording process",
            "N": small, "factor": factor, "batch": batch, "side": side, "unique_images": unique,
            "mean_file_mb": round((bytes_small + bytes_large) / (small + large) / 1e6, 3),
            "peak_rss_mib_N": round(a["peak_rss_mib"], 1), "peak_rss_mib_factorN": round(b["peak_rss_mib"], 1),
            "ratio": round(b["peak_rss_mib"] / a["peak_rss_mib"], 4), "target_ratio": 1.2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="N: images in the small folder")
    parser.add_argument("--factor", type=int, default=10, help="the large folder holds factor*N images")
    parser.add_argument("--side", type=int, default=2000, help="JPEG width in pixels (PNGs: half)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, args.batch)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.images, args.factor, args.side, args.batch, Path(tmp))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
