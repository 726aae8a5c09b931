"""Where one SAE's metric lines go: metrics.jsonl always; TensorBoard and W&B when asked.

A resumed run first drops what the killed run logged after its checkpoint (the JSONL lines,
and TensorBoard's events through ``purge_step``), so every sink holds each step once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import TrainConfig

METRICS = "metrics.jsonl"


def _truncate_jsonl(path: Path, before_step: int) -> None:
    """Keep the lines of steps before ``before_step``."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < before_step]
    path.write_text("".join(line + "\n" for line in lines))


def _missing(package: str, field: str) -> ImportError:
    return ImportError(f"TrainConfig.{field} needs the {package} package, which is not installed: "
                       f"pip install {package} (or leave {field} off)")


class MetricsLog:
    """The metric sinks of one SAE in ``directory``; opened before the first step so a
    missing package fails the run at once, not at the first log line."""

    def __init__(self, directory: Path, cfg: TrainConfig, start_step: int):
        self.jsonl = directory / METRICS
        _truncate_jsonl(self.jsonl, start_step)
        self.tensorboard = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise _missing("tensorboard", "tensorboard") from err
            self.tensorboard = SummaryWriter(str(directory / "tensorboard"), purge_step=start_step or None)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise _missing("wandb", "wandb_project") from err
            # A stable id per run folder, so a resumed run continues the same W&B run.
            run_id = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:16]
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=run_id, resume="allow",
                                    dir=str(directory), config=cfg.to_dict())

    def write(self, line: dict) -> None:
        """``line``: {"step": int, metric name: float, ...}."""
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(line) + "\n")
        step = line["step"]
        scalars = {key: value for key, value in line.items() if key != "step"}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
