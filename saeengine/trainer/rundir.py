"""The run folder at the start of a run (out_dir, locked by the caller): what to resume,
and what may not be reused.

out_dir holds checkpoints/ (saeengine.trainer.checkpoints) and one folder per SAE with the
trained SAE, whose config.json records the data it was trained on (``provenance.data``:
a store's content hash, or a tensor's shape, dtype and SHA-256) and its TrainConfig.

- ``resume=True``: resume from the latest checkpoint (which checks the settings and the
  data); with no checkpoint, a finished SAE in an SAE's folder must have been trained on
  this data (DataMismatchError) with settings this run continues (CheckpointError), so
  that a rerun on other data never returns, or silently replaces, an SAE of other data.
  A saved SAE that cannot be checked (its config.json unreadable, or without
  ``provenance.data``, ``train_config`` or ``steps``: saved by hand, or by an earlier
  version) raises CheckpointError too: replacing it is resume=False's job, with its warning.
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


PROVENANCE_FIELDS = {"data": dict, "train_config": dict, "steps": int}  # what check_finished compares


def _unverifiable(directory: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{directory} holds a saved SAE that this run cannot check ({why}), so resuming would "
                           "replace it without knowing what data and settings it was trained with. Give this run "
                           "another name (TrainConfig.name) or out_dir to keep it, or pass resume=False to replace it")


def saved_provenance(directory: Path) -> dict | None:
    """The provenance of the SAE saved in ``directory`` (its fields checked), or None when
    no SAE is saved there; CheckpointError for one whose config.json cannot say."""
    path = directory / CONFIG_FILE
    if not path.exists() and not (directory / WEIGHTS_FILE).exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _unverifiable(directory, f"{path} is unreadable: {err}") from err
    provenance = config.get("provenance") if isinstance(config, dict) else None
    if not isinstance(provenance, dict):
        raise _unverifiable(directory, f"{path} has no 'provenance' object")
    wrong = [f"provenance.{field}" for field, kind in PROVENANCE_FIELDS.items()
             if not isinstance(provenance.get(field), kind) or isinstance(provenance.get(field), bool)]
    if wrong:
        raise _unverifiable(directory, f"{path} lacks {', '.join(wrong)}, or holds a wrong type there")
    return provenance


def check_finished(runs, source) -> None:
    """The SAEs already saved in the runs' folders were trained on this data, with
    settings that this run continues."""
    for run in runs:
        provenance = saved_provenance(run.directory)
        if provenance is None:
            continue
        if provenance["data"] != source.identity():
            raise data_mismatch(run.directory, provenance["data"], source.identity(), "the SAE saved there")
        try:
            known, _ = TrainConfig.known_fields(provenance["train_config"])
        except ValueError as err:
            raise CheckpointError(f"{run.directory / CONFIG_FILE}: {err}") from err
        check_resumable(run.directory, known, run.cfg, provenance["steps"])


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
        check_finished(runs, source)
    return checkpoint
