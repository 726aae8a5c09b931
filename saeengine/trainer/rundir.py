"""The run folder at the start of a run (out_dir, locked by the caller): what to resume,
and what may not be reused.

out_dir holds checkpoints/ (saeengine.trainer.checkpoints) and one folder per SAE with the
trained SAE, whose config.json records the data it was trained on (``provenance.data``:
a store's content hash, or a tensor's shape, dtype and SHA-256) and its TrainConfig.

- ``resume=True``: resume from the latest checkpoint (which checks the settings and the
  data); with no checkpoint, a finished SAE in an SAE's folder must have been trained on
  this data (DataMismatchError) with settings this run continues (CheckpointError), so
  that a rerun on other data never returns, or silently replaces, an SAE of other data.
- ``resume=False``: start over. An earlier run in the folder is replaced, with a
  UserWarning naming it: its checkpoints and this run's saved SAEs are removed at once
  (so that a run killed later cannot leave the old SAE looking like its result).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ..errors import CheckpointError
from .checkpoints import CHECKPOINTS, check_resumable, data_mismatch, latest_checkpoint, remove_incomplete
from .config import TrainConfig


def _saved_provenance(directory: Path) -> dict | None:
    """The provenance of the SAE saved in ``directory``, or None when none is (an
    unreadable config.json counts as none: the SAE loader reports the damage)."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    provenance = config.get("provenance") if isinstance(config, dict) else None
    return provenance if isinstance(provenance, dict) else None


def _check_finished(runs, source) -> None:
    """The SAEs already saved in the runs' folders were trained on this data, with
    settings that this run continues."""
    for run in runs:
        provenance = _saved_provenance(run.directory)
        if provenance is None:
            continue
        saved_data = provenance.get("data")
        if saved_data is not None and saved_data != source.identity():
            raise data_mismatch(run.directory, saved_data, source.identity(), "the SAE saved there")
        saved_cfg, steps = provenance.get("train_config"), provenance.get("steps")
        if isinstance(saved_cfg, dict) and isinstance(steps, int):
            try:
                known, _ = TrainConfig.known_fields(saved_cfg)
            except ValueError as err:
                raise CheckpointError(f"{run.directory / CONFIG_FILE}: {err}") from err
            check_resumable(run.directory, known, run.cfg, steps)


def _start_over(out_dir: Path, runs) -> None:
    root = out_dir / CHECKPOINTS
    checkpoints = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
    saved = [run for run in runs if (run.directory / CONFIG_FILE).exists() or (run.directory / WEIGHTS_FILE).exists()]
    if not checkpoints and not saved:
        return
    what = [f"checkpoints {checkpoints}"] if checkpoints else []
    what += [f"the saved SAEs {[run.cfg.run_name for run in saved]}"] if saved else []
    warnings.warn(f"TrainConfig.resume=False: {out_dir} holds an earlier run ({' and '.join(what)}); starting over "
                  "replaces it, and those files are removed now. Use another out_dir to keep them.",
                  UserWarning, stacklevel=6)  # the caller of train()
    shutil.rmtree(root, ignore_errors=True)
    for run in saved:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            (run.directory / name).unlink(missing_ok=True)


def prepare_run_folder(out_dir: Path, runs, source, resume: bool) -> Path | None:
    """Clear what killed runs left half-written, apply the rules above, and return the
    checkpoint to resume from (None: start fresh)."""
    out_dir = Path(out_dir)
    remove_incomplete(out_dir)
    if not resume:
        _start_over(out_dir, runs)
        return None
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        _check_finished(runs, source)
    return checkpoint
