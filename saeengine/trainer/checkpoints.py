"""Resumable training checkpoints: every SAE of the run, its training step's state
(optimizer, dead-latent counters, step), the run's settings and the data's identity, the
data position, the RNG states, in one directory.

out_dir/checkpoints/step-000001200/ holds <sae name>/ (sae.safetensors, config.json) and
state.pt. It is written as a hidden temporary directory and renamed into place, and then
out_dir/checkpoints/LATEST is replaced atomically to name it. A run killed at any moment
therefore leaves LATEST naming a whole checkpoint; only what LATEST names is ever read.
Older checkpoints are removed only after the new one is in place. A write that fails (a
full disk raises DiskFullError) removes what it had written, so the checkpoint before it
stays the latest; a run killed mid-write leaves a hidden temporary folder, removed when
the next run starts (:func:`remove_incomplete`).

Resuming compares only what changes the math (saeengine.trainer.config):
- the fields of ``RESUME_FREE_FIELDS`` (logging, progress, checkpoint cadence, device,
  backend, ...) may change, and the fields of ``START_ONLY_FIELDS`` are not compared;
- ``total_tokens`` may change down to the tokens already trained (the schedules follow
  the new total: ``TrainConfig.lr_factor``);
- a change of any other field (lr, k, d_sae, architecture, batch_size, seed, optimizer,
  ...) raises CheckpointError naming the field and both values, and other data (a store's
  content hash, a tensor's SHA-256) raises DataMismatchError naming both.
A checkpoint of an earlier version (no settings in state.pt) is compared against the
TrainConfig saved beside its SAEs; fields since removed are ignored, with a note. One
that records no data identity resumes with a UserWarning: its data cannot be verified.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..checkpoint import CONFIG_FILE, CheckpointError
from ..errors import DataMismatchError
from ..sae import SAE
from .._atomic import atomic_write_bytes, fsync_directory, raise_if_disk_full
from .config import CHECKPOINTS_DIR, RESUME_FREE_FIELDS, SCHEDULE_FIELD, START_ONLY_FIELDS, TrainConfig

CHECKPOINTS = CHECKPOINTS_DIR
LATEST = "LATEST"
STATE = "state.pt"
STATE_VERSION = 2  # 2: per-run train_config, tokens_seen and step; the data identity

log = logging.getLogger("saeengine")


def _write_checkpoint(directory: Path, step: int, runs, source) -> None:
    directory.mkdir()
    for run in runs:
        run.sae.save(directory / run.cfg.run_name, provenance={"train_config": run.cfg.to_dict(), "step": step})
    state = {
        "version": STATE_VERSION,
        "step": step,
        "data": source.identity(),
        "source": source.state_dict(),
        "runs": {run.cfg.run_name: {**run.train_step.state_dict(), "train_config": run.cfg.to_dict()} for run in runs},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    with open(directory / STATE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _discarding(path: Path | None, exc: BaseException, target: Path) -> None:
    """Remove the half-written ``path`` (if any) and re-raise ``exc``, as DiskFullError
    naming ``target`` when the disk is full (judged before the removal frees space)."""
    try:
        if isinstance(exc, (OSError, RuntimeError)):
            raise_if_disk_full(target, exc)
        raise exc
    finally:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(out_dir: Path, step: int, runs, source) -> Path:
    """Write the checkpoint of ``step``; on failure (DiskFullError for a full disk) nothing
    of it remains and LATEST still names the checkpoint before."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:09d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_checkpoint(tmp, step, runs, source)
    except BaseException as exc:
        _discarding(tmp, exc, root / name)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_directory(root)
    try:
        atomic_write_bytes(root / LATEST, name.encode())
    except BaseException as exc:  # LATEST still names the one before: drop this one, unless LATEST named it already
        kept = (root / LATEST).is_file() and (root / LATEST).read_text().strip() == name
        _discarding(None if kept else final, exc, root / LATEST)
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_incomplete(out_dir: Path) -> list[Path]:
    """Remove what a killed checkpoint write left in out_dir/checkpoints (hidden
    temporary folders and files, never read); returns what was removed. Call with the
    run folder locked."""
    root = Path(out_dir) / CHECKPOINTS
    removed = sorted(root.glob(".*.tmp*")) if root.is_dir() else []
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / STATE).is_file() and (path / "manifest.json").is_file():  # distributed.checkpoint's MANIFEST
        raise CheckpointError(f"{pointer} names {path.name}, a sharded checkpoint of a run trained with --mesh "
                              "(saeengine.distributed.train_sharded); resume it with --mesh (any mesh, also "
                              "--mesh data=1,latent=1 in one process), or resume=False / another out_dir to start "
                              "over")
    if not (path / STATE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which has no {STATE}; the checkpoint directory "
                              "was changed by hand. Remove it, or resume=False to start over")
    return path


def _refuse(path: Path, what: str, saved, mine, fix: str) -> CheckpointError:
    return CheckpointError(f"cannot resume from {path}: {what} is {mine!r} in this run but {saved!r} in the "
                           f"checkpoint; {fix}, or resume=False (or another out_dir) to start over")


def _saved_train_config(path: Path, name: str, saved_run: dict) -> dict | None:
    """The TrainConfig dict the run was checkpointed with (fields this version knows), or
    None for a checkpoint that kept none."""
    saved = saved_run.get("train_config")
    config_path = path / name / CONFIG_FILE
    if saved is None:  # an earlier version: the TrainConfig is in the SAE's provenance
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            config = {}  # a missing or broken config.json fails, with its reason, when the SAE is loaded
        saved = (config.get("provenance", {}).get("train_config")
                 or config.get("config", {}).get("metadata", {}).get("train_config"))
    if saved is None:
        log.warning("saeengine: %s keeps no TrainConfig for %s; resuming without comparing the settings", path, name)
        return None
    try:
        known, removed = TrainConfig.known_fields(saved)
    except ValueError as err:
        raise CheckpointError(f"{path / name}: {err}") from err
    for field, why in removed.items():
        log.warning("saeengine: %s: ignoring TrainConfig.%s=%r saved by an earlier version (the field was "
                    "removed: %s)", path / name, field, saved[field], why)
    return known


def check_resumable(path: Path, saved: dict, cfg: TrainConfig, step: int) -> None:
    """Raise CheckpointError unless ``cfg`` continues the run saved as ``saved`` (a
    TrainConfig dict) at ``step``: see the module docstring for the rules."""
    defaults = TrainConfig()
    skip = set(RESUME_FREE_FIELDS) | set(START_ONLY_FIELDS) | {SCHEDULE_FIELD}
    for field, mine in cfg.to_dict().items():
        if field in skip:
            continue
        # A field the checkpoint lacks came later: the run had its default.
        theirs = saved.get(field, getattr(defaults, field))
        if theirs != mine:
            raise _refuse(path, f"TrainConfig.{field}", theirs, mine, f"set {field}={theirs!r} to continue that run")
    trained = step * cfg.batch_size
    if cfg.total_tokens < trained:
        raise CheckpointError(f"cannot resume from {path}: TrainConfig.total_tokens is {cfg.total_tokens} in this run "
                              f"but the checkpoint has trained {trained} tokens (its total_tokens: "
                              f"{saved.get(SCHEDULE_FIELD)!r}); set total_tokens >= {trained}, or resume=False "
                              "(or another out_dir) to start over")


def _describe(identity: dict) -> str:
    if identity.get("kind") == "store":
        return f"the activation store with content hash {identity['content_hash']}"
    return f"a {identity.get('dtype')} tensor of shape {identity.get('shape')} with SHA-256 {identity.get('sha256')}"


def data_mismatch(path: Path, saved: dict, mine: dict, what: str = "the checkpoint") -> DataMismatchError:
    """The error for a run folder item at ``path`` (``what``) trained on ``saved`` data
    when this run reads ``mine`` (data identities)."""
    return DataMismatchError(f"cannot resume from {path}: the data differs: this run reads {_describe(mine)} but "
                             f"{what} was trained on {_describe(saved)}; train on that data to continue that run, "
                             "or use another out_dir for this data (or resume=False to start over, replacing it)")


def _check_data(path: Path, saved: dict | None, source) -> None:
    if saved is None:  # an earlier version: nothing tells which data it was trained on
        warnings.warn(f"resuming from {path}, which records no data identity (written by an earlier saeengine), so "
                      f"its data cannot be verified: this run reads {_describe(source.identity())} and continues "
                      "as if the checkpoint was trained on it. If it was not, pass resume=False (or use another "
                      "out_dir) to start over", UserWarning, stacklevel=6)  # the caller of train()
        return
    mine = source.identity()
    if mine != saved:
        raise data_mismatch(path, saved, mine)


def _check_sae_config(path: Path, saved: SAE, sae: SAE) -> None:
    """The saved SAE's config against this run's, field by field (not ``metadata``:
    earlier versions stored the TrainConfig there)."""
    theirs, mine = saved.cfg.to_dict(), sae.cfg.to_dict()
    for field in mine:
        if field != "metadata" and theirs.get(field) != mine[field]:
            raise _refuse(path, f"SAEConfig.{field}", theirs.get(field), mine[field],
                          "train on data and settings that give the saved SAE's config")


def _pair_runs(path: Path, runs, saved_runs: dict) -> list[tuple[object, str]]:
    """Each run with the name of its saved state. A lone SAE whose name is built from its
    settings is paired with a lone saved one of another name, so that the comparison can
    name the setting that changed."""
    names = [run.cfg.run_name for run in runs]
    missing = [name for name in names if name not in saved_runs]
    if missing and len(runs) == 1 and len(saved_runs) == 1 and not runs[0].cfg.name:
        return [(runs[0], next(iter(saved_runs)))]
    if missing:
        raise CheckpointError(f"{path} holds no state for {missing} (it has {sorted(saved_runs)}); resume with the "
                              "sweep the run was started with (a name built from the settings changes with "
                              "architecture, d_sae, k and lr), or resume=False")
    return [(run, run.cfg.run_name) for run in runs]


def restore_checkpoint(path: Path, runs, source) -> int:
    """Load the checkpoint at ``path`` into ``runs`` and ``source``, after checking that
    the runs continue it; returns its step."""
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    step = int(state["step"])
    pairs = _pair_runs(path, runs, state["runs"])
    for run, name in pairs:
        saved = _saved_train_config(path, name, state["runs"][name])
        if saved is not None:
            check_resumable(path, saved, run.cfg, step)
    _check_data(path, state.get("data"), source)
    for run, name in pairs:
        saved_sae = SAE.load(path / name, device=run.sae.W_enc.device)
        _check_sae_config(path / name, saved_sae, run.sae)
        run.sae.load_state_dict(saved_sae.state_dict())
        saved_run = state["runs"][name]
        # Earlier versions kept the optimizer and the counters alone.
        run.train_step.load_state_dict({"tokens_seen": step * run.cfg.batch_size, "step": step, **saved_run})
    source.load_state_dict(state["source"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return step
