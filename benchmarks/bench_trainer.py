"""Trainer overhead: ``saeengine.train`` tokens/s against the bare step on the same device.

    python benchmarks/bench_trainer.py --out benchmarks/results/<date>-<gpu>-trainer.json   # GPU: F=2^18
    python benchmarks/bench_trainer.py --d-in 64 --d-sae 1024 --k 8 --batch 1024 --steps 40   # CPU smoke

The bare step is the trainer's own step (saeengine.trainer.TrainStep, built from the same
TrainConfig) on a batch already on the device: learning rate, forward with AuxK over the
dead latents listed ahead, dead-latent counters, backward, and the optimizer with its
constraints (parallel-gradient removal, clipping, Adam, decoder projection). The trainer
adds the rest: the activation-store loader (pinned buffers, a background thread), the
loop and metric logging. Its tokens/s is the median of the intervals between metric lines in
metrics.jsonl, after the first. The issue's target: trainer >= 90% of the bare step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import saeengine
from bench_loader import build_store
from saeengine.trainer import TrainStep
from run_benchmarks import bench_ms, stamp


def bare_step_ms(cfg: saeengine.TrainConfig, d_in: int, device: torch.device) -> float:
    """Median ms of the trainer's own step (TrainStep, as ``cfg`` builds it) on one batch
    already on the device: the trainer's work without the loader, the loop and the logs."""
    sae = saeengine.SAE(cfg.sae_config(d_in), device=device, seed=cfg.seed)
    step = TrainStep(sae, cfg)
    x = torch.randn(cfg.batch_size, d_in, device=device)  # fp32, as the trainer's batches
    return bench_ms(lambda: step(x), device)


def trainer_tokens_per_s(store_dir: Path, cfg: saeengine.TrainConfig) -> float:
    saeengine.train(str(store_dir), cfg)
    lines = [json.loads(line) for line in (Path(cfg.out_dir) / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    rates = [line["tokens_per_s"] for line in lines[1:-1]]  # the first interval holds compilation
    return statistics.median(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=2**18)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--autocast", default="bfloat16", help="none, bfloat16 or float16 (CUDA only)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        n_tokens = max(args.batch * 8, min(args.batch * args.steps, 2**19))  # several epochs at most
        build_store(Path(tmp) / "store", n_tokens, args.d_in, shard_tokens=max(1, n_tokens // 8))
        cfg = saeengine.TrainConfig(d_sae=args.d_sae, k=args.k, batch_size=args.batch,
                                    total_tokens=args.batch * args.steps, autocast=args.autocast,
                                    out_dir=str(Path(tmp) / "run"), log_every=10, progress=False, resume=False)
        trainer = trainer_tokens_per_s(Path(tmp) / "store", cfg)
        bare_ms = bare_step_ms(cfg, args.d_in, device)
    bare = args.batch / (bare_ms / 1e3)
    result = {**stamp(device), "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch": args.batch,
              "steps": args.steps, "autocast": args.autocast, "bare_step_ms": bare_ms,
              "bare_tokens_per_s": bare, "trainer_tokens_per_s": trainer, "trainer_fraction": trainer / bare}
    print(json.dumps(result))
    print(f"trainer {trainer:.4g} tok/s, bare step {bare:.4g} tok/s ({bare_ms:.2f} ms): "
          f"{trainer / bare:.1%} of the bare step (target >= 90%)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
