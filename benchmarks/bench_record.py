"""Recording overhead: record_activations against the bare forward pass over the same
images (the issue's target: at most 10% more).

    python benchmarks/bench_record.py [--images 64] [--batch 16] [--layers blocks.5,blocks.10]

EfficientNet-Lite0 (real weights, offline) on skimage's photos repeated, on the GPU when
present. Prints both times and the overhead. Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from saeengine.backbones import efficientnet_lite, record_activations


def sample_images(n: int):
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    return [photos[i % len(photos)] for i in range(n)]


def bare_forward(backbone, images, batch: int) -> None:
    with torch.no_grad():
        for start in range(0, len(images), batch):
            backbone.forward(backbone.preprocess(images[start:start + batch]).to(backbone.device))
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", default="blocks.5,blocks.10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    backbone = efficientnet_lite()
    if torch.cuda.is_available():
        backbone.model.cuda()
    images = sample_images(args.images)
    layers = args.layers.split(",")
    bare_forward(backbone, images[: args.batch], args.batch)  # warm-up
    bare, recorded = [], []
    for _ in range(args.repeats):  # interleaved, medians: the machine's noise hits both
        start = time.perf_counter()
        bare_forward(backbone, images, args.batch)
        bare.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            record_activations(backbone, images, layers, tmp, batch_size=args.batch, progress=False)
            recorded.append(time.perf_counter() - start)
    bare_s, rec_s = sorted(bare)[len(bare) // 2], sorted(recorded)[len(recorded) // 2]
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": str(backbone.device),
              "images": args.images, "batch": args.batch, "layers": layers, "bare_s": bare_s, "record_s": rec_s,
              "overhead": rec_s / bare_s - 1, "torch": torch.__version__, "python": platform.python_version(),
              "cpu": platform.processor() or platform.machine()}
    print(json.dumps(result))
    print(f"bare forward {bare_s:.2f} s, recording {rec_s:.2f} s: overhead {result['overhead']:+.1%}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
