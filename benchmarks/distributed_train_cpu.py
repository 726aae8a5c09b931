"""Step time of the sharded trainer on CPU processes (gloo), through ``train_sharded``.

The same global batch (N = 1024 tokens, d = 64, F = 4096, k = 16, DenseAdam with clipping)
on 1, 2 and 4 processes: meshes 1 x 1, 1 x 2 (latent axis), 2 x 1 (data axis), 1 x 4 and
2 x 2, each a real ``train_sharded`` run (gloo process group from ``_spawn``, one torch
thread per process), beside the single-process ``saeengine.train`` on the same data. The
step time is the trainer's own clock: each metrics.jsonl line's tokens_per_s covers the
steps since the line before (the first line, with the first step's warm-up, is dropped),
so it includes everything a training step costs (the data loader's part, the step's
collectives, the dead-latent count at the log line).

On the shared 2-core development machine 4 processes oversubscribe the cores: the record
the issue asks for, not a speedup claim (there, more processes can only add work).

Run: ``.venv/bin/python benchmarks/distributed_train_cpu.py`` (about a minute on 2 cores);
writes benchmarks/results/<date>-cpu-distributed-train.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from saeengine.distributed import _spawn  # noqa: E402

D, F, N, K = 64, 4096, 1024, 16
LOG_EVERY, INTERVALS = 4, 4  # steps per timed interval, timed intervals
LAYOUTS = [(1, 1), (1, 2), (2, 1), (1, 4), (2, 2)]


def make_data(n_tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n_tokens, D, generator=gen) @ torch.randn(D, D, generator=gen) / D ** 0.5


def make_cfg(out_dir: str, **kw):
    from saeengine.trainer import TrainConfig

    steps = 1 + LOG_EVERY * INTERVALS
    return TrainConfig(**{**dict(d_sae=F, k=K, batch_size=N, total_tokens=N * steps, lr=1e-3, warmup_steps=2,
                                 log_every=LOG_EVERY, progress=False, device="cpu", out_dir=out_dir), **kw})


def step_ms(cfg) -> list[float]:
    """ms per step of each timed interval of a finished run's metrics.jsonl."""
    lines = [json.loads(s) for s in (Path(cfg.out_dir) / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    return [cfg.batch_size / line["tokens_per_s"] * 1e3 for line in lines[1:]]


def _worker(rank, world, data, mesh, out_dir):
    from saeengine.distributed.train import train_sharded

    cfg = make_cfg(out_dir)
    train_sharded(data, cfg, mesh)
    return step_ms(cfg) if rank == 0 else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from saeengine.trainer import train
    from saeengine.validation import run_stamp

    data = make_data(N * 16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_cfg(f"{tmp}/single")
        train(data, cfg)
        times = step_ms(cfg)
        rows.append({"layout": "saeengine.train (single-process SAE)", "processes": 1, "step_ms": times,
                     "median_step_ms": statistics.median(times)})
        print(f"{rows[-1]['layout']}: {rows[-1]['median_step_ms']:.1f} ms/step", flush=True)
        for data_size, latent in LAYOUTS:
            mesh = f"data={data_size},latent={latent}"
            times = _spawn.run(_worker, data_size * latent, data, mesh, f"{tmp}/{data_size}x{latent}",
                               timeout=600)[0]
            rows.append({"layout": f"train_sharded {mesh}", "processes": data_size * latent, "step_ms": times,
                         "median_step_ms": statistics.median(times)})
            print(f"{rows[-1]['layout']}: {rows[-1]['median_step_ms']:.1f} ms/step", flush=True)
    base = rows[0]["median_step_ms"]
    for row in rows:
        row["vs_single_process"] = row["median_step_ms"] / base
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {**run_stamp(), "commit_full": commit,
              "settings": {"backend": "gloo (CPU)", "torch_threads_per_process": 1, "d_in": D, "d_sae": F,
                           "global_batch": N, "k": K, "optimizer": "adam (DenseAdam), clip_grad_norm 1.0",
                           "steps_per_interval": LOG_EVERY, "timed_intervals": INTERVALS,
                           "clock": "metrics.jsonl tokens_per_s per log interval (first line dropped)"},
              "step_times": rows}
    report["settings"]["load_average_at_end"] = os.getloadavg()
    out = a.out or REPO / "benchmarks" / "results" / f"{dt.date.today().isoformat()}-cpu-distributed-train.json"
    out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
