"""Shuffled-loader throughput from page-cached shards (the issue's target: >= 1 GB/s of fp16
batches on one CPU core).

    python benchmarks/bench_loader.py                   # 1 GiB store, d=1024, batch 4096
    python benchmarks/bench_loader.py --gib 0.01 --seconds 1    # smoke

Writes a store of random fp16 activations to a temporary directory, reads it once so the
shards are in the page cache, then times the shuffled loader. The loader's own thread
does the gathering; torch and numpy are limited to one thread. Prints GB/s of delivered
batches, and writes a JSON stamp with --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saeengine.store import ActivationLoader, ActivationStore, ActivationWriter


def build_store(directory: Path, n_tokens: int, d: int, shard_tokens: int) -> ActivationStore:
    rng = np.random.default_rng(0)
    chunk = 1 << 16
    with ActivationWriter(directory, d_in=d, dtype="float16", backbone="random", layer="-",
                          token_kind="patch", shard_tokens=shard_tokens) as writer:
        for start in range(0, n_tokens, chunk):
            n = min(chunk, n_tokens - start)
            acts = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
            tokens = np.arange(start, start + n)
            writer.add(acts, tokens // 256, tokens % 256)
    store = ActivationStore(directory)
    store.get(np.arange(0, store.n_tokens, 1))  # touch every page: page-cached from here on
    return store


def measure(store: ActivationStore, batch_size: int, seconds: float) -> dict:
    loader = ActivationLoader(store, batch_size, shuffle=True, seed=0, epochs=None)
    batches = iter(loader)
    next(batches)  # thread start-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += 1
    elapsed = time.perf_counter() - start
    batches.close()
    nbytes = count * batch_size * store.d_in * 2
    return {"batches": count, "seconds": elapsed, "gb_per_s": nbytes / elapsed / 1e9}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="store size in GiB of fp16 activations")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n_tokens = max(args.batch, int(args.gib * 2**30) // (2 * args.d))
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "store", n_tokens, args.d, shard_tokens=max(1, n_tokens // 8))
        result = measure(store, args.batch, args.seconds)
    result.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), tokens=n_tokens,
                  d=args.d, batch=args.batch, cpu=platform.processor() or platform.machine(),
                  cpu_count=os.cpu_count(), python=platform.python_version(), numpy=np.__version__,
                  torch=torch.__version__)
    print(json.dumps(result))
    print(f"shuffled fp16 batches: {result['gb_per_s']:.2f} GB/s ({args.batch} x {args.d}, "
          f"{n_tokens} tokens, one loader thread)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
