"""Where one SAE's metric lines go: metrics.jsonl always; TensorBoard and W&B when asked.

metrics.jsonl holds one JSON object per log line (saeengine.train's docstring lists the
keys); the last step of a run is always logged, so a finished run's last line is its final
step.

A resumed run first drops what the killed run logged after its checkpoint (the JSONL lines,
and TensorBoard's events through ``purge_step``), so every sink holds each step once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .._atomic import atomic_write_bytes, raise_if_disk_full
from .config import TrainConfig

METRICS = "metrics.jsonl"

log = logging.getLogger("saeengine")


def _truncate_jsonl(path: Path, before_step: int) -> None:
    """Keep the lines of steps before ``before_step`` (replacing the file atomically). A
    line that is not JSON, the tail of a write that a kill cut short, is dropped with a note."""
    if not path.exists():
        return
    kept, broken = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"] if line else None
        except (ValueError, KeyError, TypeError):
            broken += 1
            continue
        if step is not None and step < before_step:
            kept.append(line)
    if broken:
        log.warning("saeengine: %s: dropped %d damaged line(s) (a killed run's last write)", path, broken)
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


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
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as exc:
            raise_if_disk_full(self.jsonl, exc)
            raise
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
