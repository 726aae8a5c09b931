"""``saeengine train ... --mesh data=D,latent=L``: one TopK SAE trained over D x L processes
(:func:`saeengine.distributed.train.train_sharded`), launched by torchrun::

    torchrun --nproc-per-node 4 -m saeengine train --data acts/store --mesh data=2,latent=2 \\
        --d-sae 65536 --k 32 --batch-size 8192 --out-dir runs/big

Every process runs the same command line. Rank 0 prints the result line; every rank
prints its own error line (the one that failed says why, the others that it failed).
``--mesh data=1,latent=1`` runs without torchrun, as one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from .mesh import parse_mesh

MESH_HELP = ("train one TopK SAE over a mesh of processes: D data replicas (each reads its own part of every "
             "batch) x L latent slices (each holds d_sae / L latents and their Adam state). Launch D x L "
             "processes with the same arguments: torchrun --nproc-per-node D*L -m saeengine train ... --mesh "
             "data=D,latent=L (gloo on CPUs, NCCL with cuda:LOCAL_RANK on GPUs); --batch-size is the global "
             "batch and must divide by D. Checkpoints (--checkpoint-every-tokens) are one file per latent slice "
             "and resume at any mesh. data=1,latent=1 runs as one process without torchrun. Not with --sweep")


def _mesh(text: str):
    try:
        return parse_mesh(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_mesh_options(parser: argparse.ArgumentParser) -> None:
    """``--mesh data=D,latent=L`` on the train command (None when not given)."""
    parser.add_argument("--mesh", type=_mesh, default=None, metavar="data=D,latent=L", help=MESH_HELP)


def run_train_distributed(args: argparse.Namespace) -> int:
    """``saeengine train --mesh ...`` on this rank: train_sharded, then (rank 0) the result line."""
    from ..cli_commands import final_metrics, train_configs
    from ..cli_failures import UsageError
    from .train import train_sharded

    configs = train_configs(args)
    if len(configs) != 1:
        raise UsageError(f"--mesh trains one SAE, but --sweep asks for {len(configs)}; drop --sweep, or train one "
                         "SAE per rank (--per-rank)")
    from ..cli_commands import require_store

    require_store(args)
    cfg = configs[0]
    sae = train_sharded(args.data, cfg, args.mesh)
    if sae is not None:
        directory = Path(cfg.out_dir) / cfg.run_name
        print(f"{cfg.run_name}: {sae.cfg.d_sae} latents, trained over mesh {args.mesh} | "
              f"{final_metrics(directory, cfg.steps)} | saved to {directory}")
    return 0


def interrupted_train_distributed(args: argparse.Namespace) -> str:
    """What Ctrl-C of a sharded run kept."""
    from ..trainer.checkpoints import CHECKPOINTS
    from ..trainer.config import TrainConfig
    from .checkpoint import latest_sharded

    out_dir = Path(getattr(args, "out_dir", TrainConfig.out_dir))
    try:
        checkpoint = latest_sharded(out_dir / CHECKPOINTS)
    except Exception:  # noqa: BLE001 - a damaged folder: say what is known, do not raise
        checkpoint = None
    if checkpoint is None:
        return (f"interrupted before the first sharded checkpoint; nothing was kept in {out_dir} "
                "(--checkpoint-every-tokens N checkpoints during a run)")
    again = "the same command without --no-resume" if getattr(args, "resume", True) is False else "the same command"
    return f"interrupted; the sharded checkpoint {checkpoint} is kept, and {again} (at any --mesh) resumes from it"
