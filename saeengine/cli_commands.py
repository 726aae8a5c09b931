"""What the commands ``demo``, ``demo-synthetic`` and ``train`` do with their parsed
arguments, what each prints at the end of a run (its metrics and where the result is), and
what each says was kept when interrupted. ``record`` lives in saeengine.cli_record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_failures import one_line
from .cli_options import dataclass_from_args, given
from .cli_sweeps import parse_sweeps, sweep_configs


def final_metrics(directory: Path, steps: int) -> str:
    """The last line of ``directory``/metrics.jsonl as ``FVU .. | L0 .. | dead ..%``, or a
    note saying why there is none (a missing file, a damaged last line, a missing key)."""
    from .trainer.metrics import METRICS

    path = Path(directory) / METRICS
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return f"no final metrics: {path} is missing"
    except (OSError, UnicodeDecodeError) as err:
        return f"no final metrics: {path} cannot be read ({one_line(err)})"
    if not lines:
        return f"no final metrics: {path} is empty"
    try:
        last = json.loads(lines[-1])
    except json.JSONDecodeError:
        return f"no final metrics: the last line of {path} is not JSON"
    if not isinstance(last, dict):
        return f"no final metrics: the last line of {path} is not a JSON object"
    missing = [key for key in ("fvu", "l0", "dead") if not isinstance(last.get(key), (int, float))]
    if missing:
        return f"no final metrics: the last line of {path} lacks {', '.join(missing)}"
    text = f"FVU {last['fvu']:.4f} | L0 {last['l0']:.2f} | dead {last['dead']:.1%}"
    step = last.get("step")
    if isinstance(step, int) and step != steps - 1:
        text += f" (at step {step}, not the last step {steps - 1})"
    return text


# ---------------------------------------------------------------------------- runs
def run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    report = run_demo(dataclass_from_args(DemoConfig, args), progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    print(f"\nFVU {report['fvu']:.4f} | L0 {report['l0']:.2f} | dead {report['dead_fraction']:.1%} | "
          f"{report['total_seconds']:.0f} s\nreport: {report['report']}")
    return 0


def run_demo_synthetic(args: argparse.Namespace) -> int:
    from .demo_synthetic import SyntheticDemoConfig, run_synthetic_demo

    report = run_synthetic_demo(dataclass_from_args(SyntheticDemoConfig, args), progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    print(f"\nFVU {report['fvu']:.4f} | L0 {report['l0']:.2f} | dead {report['dead_fraction']:.1%} | "
          f"planted-dictionary recovery (mean max cos) {report['recovery_mean_max_cos']:.3f} "
          f"({report['recovery_at_init']:.3f} at init) | "
          f"checkpoint {report['checkpoint']}")
    return 0


def train_configs(args: argparse.Namespace) -> list:
    """The TrainConfigs of ``saeengine train`` (one, or one per point of its sweeps)."""
    from .trainer import TrainConfig

    flags = given(TrainConfig, args)
    return sweep_configs(flags, parse_sweeps(args.sweep, flags))


def require_store(args: argparse.Namespace) -> None:
    """FileNotFoundError naming --data and how to make a store, when it does not exist."""
    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such activation store (record one with saeengine record "
                                f"or saeengine.store.ActivationWriter)")


def run_train(args: argparse.Namespace) -> int:
    from .trainer import train

    if getattr(args, "per_rank", False):  # whole SAEs of the sweep spread over torchrun's processes
        from .distributed.cli_per_rank import run_per_rank_cli
        return run_per_rank_cli(args, train_configs(args))
    if getattr(args, "mesh", None) is not None:  # sharded over torchrun's processes
        from .distributed.cli_train import run_train_distributed
        return run_train_distributed(args)

    configs = train_configs(args)
    require_store(args)
    saes = train(args.data, configs)
    for cfg, sae in zip(configs, saes):
        directory = Path(cfg.out_dir) / cfg.run_name
        print(f"{cfg.run_name}: {sae.cfg.d_sae} latents | {final_metrics(directory, cfg.steps)} | "
              f"saved to {directory}")
    return 0


# ---------------------------------------------------------------------------- interrupts
def interrupted_train(args: argparse.Namespace) -> str:
    from .trainer import TrainConfig
    from .trainer.checkpoints import latest_checkpoint

    if getattr(args, "per_rank", False):
        from .distributed.cli_per_rank import interrupted_per_rank
        return interrupted_per_rank(args)
    if getattr(args, "mesh", None) is not None:
        from .distributed.cli_train import interrupted_train_distributed
        return interrupted_train_distributed(args)
    out_dir = Path(getattr(args, "out_dir", TrainConfig.out_dir))
    try:
        checkpoint = latest_checkpoint(out_dir)
    except Exception:  # noqa: BLE001 - a damaged checkpoint folder: say what is known, do not raise
        checkpoint = None
    if checkpoint is None:
        return (f"interrupted before the first checkpoint; nothing was kept in {out_dir} "
                f"(--checkpoint-every-tokens N checkpoints during a run)")
    again = "the same command without --no-resume" if getattr(args, "resume", True) is False else "the same command"
    return f"interrupted; the checkpoint {checkpoint} is kept, and {again} resumes from it"


def interrupted_demo(args: argparse.Namespace) -> str:
    return "interrupted; the demo keeps no checkpoint, so running it again starts over"


def interrupted_record(args: argparse.Namespace) -> str:
    again = "the same command" if getattr(args, "resume", False) else "the same command with --resume"
    return (f"interrupted; the stores in {getattr(args, 'out_dir', '--out-dir')} keep every finished shard, and "
            f"{again} continues them")
