"""Resumable training checkpoints: every SAE of the run, its optimizer, its dead-latent
counters, the data position, the RNG states and the step, in one directory.

out_dir/checkpoints/step-000001200/ holds <sae name>/ (sae.safetensors, config.json) and
state.pt. It is written as a hidden temporary directory and renamed into place, and then
out_dir/checkpoints/LATEST is replaced atomically to name it. A run killed at any moment
therefore leaves LATEST naming a whole checkpoint. Older checkpoints are removed only
after the new one is in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..sae import SAE
from .._atomic import atomic_write_bytes, fsync_directory

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE = "state.pt"


def save_checkpoint(out_dir: Path, step: int, runs, source) -> Path:
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:09d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for run in runs:
        run.sae.save(tmp / run.cfg.run_name, provenance={"train_config": run.cfg.to_dict(), "step": step})
    state = {
        "step": step,
        "source": source.state_dict(),
        "runs": {run.cfg.run_name: {"optimizer": run.opt.state_dict(), "last_fired": run.last_fired.cpu()}
                 for run in runs},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    with open(tmp / STATE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_directory(root)
    atomic_write_bytes(root / LATEST, name.encode())
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which has no {STATE}; the checkpoint directory "
                              "was changed by hand. Remove it, or resume=False to start over")
    return path


def restore_checkpoint(path: Path, runs, source) -> int:
    """Load the checkpoint at ``path`` into ``runs`` and ``source``; returns its step."""
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    missing = [run.cfg.run_name for run in runs if run.cfg.run_name not in state["runs"]]
    if missing:
        raise CheckpointError(f"{path} holds no state for {missing} (it has {sorted(state['runs'])}); "
                              "resume with the sweep the run was started with, or resume=False")
    for run in runs:
        saved = SAE.load(path / run.cfg.run_name, device=run.sae.W_enc.device)
        if saved.cfg != run.sae.cfg:
            raise CheckpointError(f"{path / run.cfg.run_name}: the SAE config differs from this run's; "
                                  "resume with the same TrainConfig, or resume=False")
        run.sae.load_state_dict(saved.state_dict())
        run.opt.load_state_dict(state["runs"][run.cfg.run_name]["optimizer"])
        run.last_fired.copy_(state["runs"][run.cfg.run_name]["last_fired"])
        run.tokens_seen = int(state["step"]) * run.cfg.batch_size
    source.load_state_dict(state["source"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])
