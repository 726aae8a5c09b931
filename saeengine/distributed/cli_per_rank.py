"""``saeengine train --per-rank``: the SAEs of a sweep spread over the ranks of a torchrun
job, one SAE (or one share of the sweep) per rank (saeengine.distributed.per_rank).

    torchrun --nproc-per-node 4 -m saeengine train --data STORE --sweep k=16,32,64,128 --per-rank

Without torchrun (no WORLD_SIZE in the environment) it is the single-process sweep, plus
the summary file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

PER_RANK_HELP = ("spread the SAEs of the sweep over the ranks of a torchrun job: config i trains on rank i %% "
                 "world, each with the single-process trainer on its own GPU (cuda:LOCAL_RANK), reading the store "
                 "itself; a rank's configs that share the data settings run as one sweep. Each SAE is saved to "
                 "OUT_DIR/<name>/ as without --per-rank, and rank 0 writes OUT_DIR/per_rank_summary.json (every "
                 "run, its rank and final metrics). Rerun the same command with the same number of ranks to resume. "
                 "e.g. torchrun --nproc-per-node 4 -m saeengine train --data STORE --sweep k=16,32,64,128 --per-rank")


def add_per_rank_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--per-rank`` to the ``train`` parser."""
    parser.add_argument("--per-rank", dest="per_rank", action="store_true", default=False, help=PER_RANK_HELP)


def _joined():
    """launch.distributed for the whole job (a mesh of data=world, latent=1): torchrun's
    process group when WORLD_SIZE is set and none exists (gloo even on GPUs: the only
    collectives are a few all_gather_object calls of small Python objects; with the 72 h
    BARRIER_TIMEOUT, since the final barrier waits for the slowest rank's whole share),
    destroyed at the end; the caller's group as it is; no group without torchrun. Bad
    WORLD_SIZE, or torchrun variables missing: InputError."""
    from .launch import distributed, world_from_env
    from .mesh import MeshSpec
    from .per_rank import BARRIER_TIMEOUT

    world = dist.get_world_size() if dist.is_initialized() else (world_from_env() or 1)
    return distributed(MeshSpec(data=world), "cpu", timeout_s=BARRIER_TIMEOUT.total_seconds())


def run_per_rank_cli(args: argparse.Namespace, configs: list) -> int:
    """``saeengine train ... --per-rank``: train this rank's configs, print one line per
    SAE (prefixed with the rank), and on rank 0 where the summary is. Returns 0."""
    from ..cli_commands import final_metrics
    from ..cli_failures import UsageError
    from .per_rank import SUMMARY, assigned, rank_and_world, train_per_rank

    if getattr(args, "mesh", None) is not None:
        raise UsageError(f"--per-rank and --mesh {args.mesh} both split the job over the ranks: --per-rank gives each "
                         "rank whole SAEs of the sweep, --mesh shards one SAE over them; choose one")
    from ..cli_commands import require_store

    require_store(args)
    with _joined():
        saes = train_per_rank(args.data, configs)
        rank, world = rank_and_world()
        mine = assigned(len(configs), rank, world)
        if not mine:
            print(f"[rank {rank}/{world}] no SAE to train ({len(configs)} configs for {world} ranks)")
        for i, sae in zip(mine, saes):
            cfg = configs[i]
            directory = Path(cfg.out_dir) / cfg.run_name
            print(f"[rank {rank}/{world}] {cfg.run_name}: {sae.cfg.d_sae} latents | "
                  f"{final_metrics(directory, cfg.steps)} | saved to {directory}")
        if rank == 0 and (dist.is_initialized() or world == 1):
            for out_dir in dict.fromkeys(c.out_dir for c in configs):
                print(f"[rank 0/{world}] summary of every rank's runs: {Path(out_dir) / SUMMARY}")
    return 0


def interrupted_per_rank(args: argparse.Namespace) -> str:
    """What ``saeengine train --per-rank`` says on Ctrl-C: where the checkpoints are kept."""
    from ..trainer import TrainConfig
    from .per_rank import WORK_DIR

    out_dir = Path(getattr(args, "out_dir", TrainConfig.out_dir))
    kept = sorted(out_dir.glob(f"{WORK_DIR}/*/run/checkpoints/step-*"))
    if not kept:
        return (f"interrupted before the first checkpoint; nothing was kept in {out_dir} "
                f"(--checkpoint-every-tokens N checkpoints during a run)")
    return (f"interrupted; {len(kept)} checkpoint(s) are kept under {out_dir / WORK_DIR}, and the same command on "
            "the same number of ranks resumes from them")
