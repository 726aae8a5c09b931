"""Bytes that ShardedTrainStep moves on the data axis per step, counted by
saeengine.distributed.comm, DenseAdam vs RowSparseAdam, on a 2x1 gloo mesh (two CPU
processes): d=128, F=65536, a global batch of 512 random tokens, k=32, 3 steps.

    .venv/bin/python benchmarks/distributed_step_bytes.py   # -> benchmarks/results/<date>-cpu-distributed-step-bytes.json
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from saeengine.distributed import _spawn  # noqa: E402

D, F, N, K, STEPS = 128, 65536, 512, 32, 3


def _worker(rank, world, optimizer):
    from saeengine import SAE
    from saeengine.distributed import LatentShardedSAE, counting, init_mesh
    from saeengine.distributed.step import ShardedTrainStep
    from saeengine.trainer.config import TrainConfig

    mesh = init_mesh("data=2,latent=1")
    cfg = TrainConfig(d_sae=F, k=K, batch_size=N, total_tokens=N * 100, lr=1e-3, optimizer=optimizer)
    step = ShardedTrainStep(LatentShardedSAE.from_sae(SAE(cfg.sae_config(D), seed=0), mesh), cfg, mesh)
    gen = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(STEPS):
        x = torch.randn(N, D, generator=gen)[rank * N // 2:(rank + 1) * N // 2]
        with counting() as log:
            step(x)
        steps.append(log.by_label())
    return steps


def main() -> None:
    from saeengine.validation import run_stamp

    report = {**run_stamp(), "settings": {"mesh": "data=2,latent=1", "backend": "gloo (CPU)", "d_in": D, "d_sae": F,
                                          "global_batch": N, "k": K, "steps": STEPS, "data": "torch.randn, seed 1"},
              "bytes_per_rank_per_step": {}}
    for optimizer in ("adam", "row_sparse_adam"):
        report["bytes_per_rank_per_step"][optimizer] = _spawn.run(_worker, 2, optimizer, timeout=600)[0]
    out = REPO / "benchmarks" / "results" / f"{dt.date.today().isoformat()}-cpu-distributed-step-bytes.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["bytes_per_rank_per_step"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
