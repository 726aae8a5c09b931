"""One SAE per rank: a sweep, or several layers at once, spread over the ranks of a job.

Every rank calls :func:`train_per_rank` with the same ``configs`` (and the same data);
each trains its share with :func:`saeengine.train`, on its own device, with no
collective during training. Nothing is sharded: each SAE is exactly what a
single-process ``train(data, cfg)`` makes (same seed, same batches), so the results do
not depend on the number of ranks.

Assignment (balanced by index): rank ``r`` of ``W`` trains ``configs[r::W]``, i.e. config
``i`` runs on rank ``i % W``. Ranks hold ``ceil(n / W)`` or ``floor(n / W)`` configs; a rank
with none (``W > n``) only joins the final barrier. Configs of one rank that read the same
data with the same data settings (``TrainConfig`` ``SHARED_FIELDS``: total_tokens,
batch_size, seed, out_dir, checkpointing) run as ONE sweep call, reading each batch once;
the others run one call after another (:func:`plan`).

Layout: each SAE lands in ``out_dir/<run_name>/`` (config.json, sae.safetensors,
metrics.jsonl), where a single-process sweep puts it. ``train`` locks its out_dir and keeps
its checkpoints in ``out_dir/checkpoints/``, so the ranks cannot share one: each train call
runs in its own folder ``out_dir/.per-rank/<group>/run/`` (``<group>``: a hash of its run
names), holding that call's lock and checkpoints, and each finished SAE folder is moved to
``out_dir/<run_name>/`` (a rename: same filesystem). A folder already at
``out_dir/<run_name>/`` is moved into the call's folder first, so the trainer's own checks
apply to it unchanged (resume, DataMismatchError for other data, resume=False replacing it
with a warning), and it is moved back whatever happens. A killed rank leaves its SAEs'
folders in ``.per-rank/<group>/run/``; rerunning the same command with the same number of
ranks (the same groups) resumes them from their checkpoints. With another number of ranks
the groups change and those runs start over.

Start: under torch.distributed one ``comm.all_gather_object`` compares every rank's
configs and data (a store's path, a tensor's shape and dtype): ranks given different ones
raise ConfigError on every rank, naming each differing field (``configs[1].k: 8 on rank 0;
16 on rank 1``), before any training. Repeated SAE folders (the same out_dir and run_name
twice) raise InputError naming them, on every rank, before that.

Device: a config with device "auto" or "cuda" trains on cuda:LOCAL_RANK when CUDA is
available (:func:`rank_device`); the only collectives are the two object gathers, so a
gloo process group serves on GPUs too.

End: with ``barrier`` (default) every rank joins one ``comm.all_gather_object`` of its runs'
outcomes (this is also the barrier) and rank 0 writes ``out_dir/per_rank_summary.json``
(atomically): every run's config index, rank, folder, status and final metrics (the last
line of its metrics.jsonl). A rank whose training raised still joins it (so no rank waits
for it until the timeout), then re-raises; the summary marks its runs "failed". Without
torch.distributed (world from RANK/WORLD_SIZE alone) there is no barrier, and no summary
when the world has more than one rank. The barrier waits for the slowest rank's whole
share: a process group of your own needs a timeout that long (``run_per_rank_cli`` makes
its gloo group with :data:`BARRIER_TIMEOUT`, 72 h).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .._atomic import atomic_write_bytes, fsync_directory
from .._lock import exclusive_lock
from ..errors import InputError
from ..trainer.config import SHARED_FIELDS, TrainConfig
from . import comm
from .mesh import Mesh, MeshSpec, check_same_config, config_fields

log = logging.getLogger("saeengine")

WORK_DIR = ".per-rank"  # out_dir/.per-rank/<group>/run/: one train call's lock and checkpoints
LOCKS = "locks"  # out_dir/.per-rank/locks/<run_name>/.lock: held while that SAE trains
SUMMARY = "per_rank_summary.json"
# Process groups that run_per_rank_cli creates: the final barrier waits for the slowest
# rank's whole share of the sweep, far longer than torch's default 30 min.
BARRIER_TIMEOUT = datetime.timedelta(hours=72)


# ----- who trains what -----------------------------------------------------------------------
def rank_and_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This process's (rank, world): torch.distributed's when initialized (explicit values
    must then agree), else RANK / WORLD_SIZE from the environment (torchrun's), else 0 / 1.
    Explicit ``rank`` / ``world`` override the environment."""
    if dist.is_available() and dist.is_initialized():
        have = dist.get_rank(), dist.get_world_size()
        want = (have[0] if rank is None else rank, have[1] if world is None else world)
        if want != have:
            raise InputError(f"train_per_rank(rank={rank}, world={world}): torch.distributed is initialized as rank "
                             f"{have[0]} of {have[1]}; leave rank and world out (None) or pass those values")
        return have
    if rank is None:
        rank = _env_int("RANK", 0)
    if world is None:
        world = _env_int("WORLD_SIZE", 1)
    for name, value in (("rank", rank), ("world", world)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"train_per_rank: {name}={value!r} must be an int")
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"train_per_rank: rank={rank} of world={world}: need world >= 1 and 0 <= rank < world")
    return rank, world


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"the environment variable {name}={text!r} is not an integer (torchrun sets it; unset it "
                         "or pass rank= / world= to train_per_rank)") from None


def assigned(n_configs: int, rank: int, world: int) -> list[int]:
    """The config indices rank ``rank`` of ``world`` trains: ``range(rank, n, world)``."""
    return list(range(rank, n_configs, world))


def _data_key(item) -> tuple:
    """What says that two configs read the same data (they may then share a sweep call)."""
    from ..store import ActivationStore

    if isinstance(item, ActivationStore):
        item = item.directory
    if isinstance(item, (str, os.PathLike)):
        return ("store", os.path.realpath(os.fspath(item)))
    return ("object", id(item))  # a tensor: the same object


def _data_of(data, i: int):
    return data[i] if isinstance(data, (list, tuple)) else data


def _check_inputs(data, configs: Sequence[TrainConfig]) -> list[TrainConfig]:
    """The configs as a list; InputError for a bad list, data list or repeated folders (the
    same on every rank, before any collective)."""
    from ..store import ActivationStore

    if isinstance(configs, TrainConfig) or not isinstance(configs, (list, tuple)):
        raise InputError(f"train_per_rank takes a list of TrainConfigs (one SAE each), got {type(configs).__name__}; "
                         "wrap a single config in a list")
    configs = list(configs)
    if not configs:
        raise InputError("train_per_rank got an empty list of configs; give at least one TrainConfig")
    wrong = sorted({type(c).__name__ for c in configs if not isinstance(c, TrainConfig)})
    if wrong:
        raise InputError(f"train_per_rank takes TrainConfigs; the list holds {wrong}")
    if isinstance(data, (list, tuple)) and len(data) != len(configs):
        raise InputError(f"train_per_rank got {len(data)} data items for {len(configs)} configs: give one data "
                         "(a store or tensor for every config) or a list with one item per config (e.g. one store "
                         "per layer)")
    for i in range(len(configs)):
        item = _data_of(data, i)
        if not isinstance(item, (str, os.PathLike, ActivationStore, torch.Tensor)):
            raise InputError(f"train_per_rank: data{f'[{i}]' if isinstance(data, (list, tuple)) else ''} is a "
                             f"{type(item).__name__}; give an activation store directory, an ActivationStore or a "
                             "tensor [tokens, d_in]")
    folders: dict[tuple[str, str], list[int]] = {}
    for i, cfg in enumerate(configs):
        folders.setdefault((os.path.realpath(cfg.out_dir), cfg.run_name), []).append(i)
    repeated = {key: idx for key, idx in folders.items() if len(idx) > 1}
    if repeated:
        said = "; ".join(f"{name!r} (configs {', '.join(map(str, idx))}, out_dir {out})"
                         for (out, name), idx in repeated.items())
        raise InputError(f"train_per_rank: several configs would write the same SAE folder: {said}. Give each config "
                         "its own TrainConfig.name (or out_dir)")
    return configs


def plan(data, configs: Sequence[TrainConfig], rank: int, world: int) -> list[list[int]]:
    """The train calls of rank ``rank``: lists of config indices (of ``configs``), each one
    saeengine.train call. The rank's configs (:func:`assigned`) that read the same data
    with equal SHARED_FIELDS form one sweep call, in the order of their first config."""
    configs = _check_inputs(data, configs)
    calls: dict[tuple, list[int]] = {}
    for i in assigned(len(configs), rank, world):
        key = (_data_key(_data_of(data, i)), tuple(str(getattr(configs[i], f)) for f in SHARED_FIELDS))
        calls.setdefault(key, []).append(i)
    return list(calls.values())


def rank_device(cfg: TrainConfig, rank: int) -> str:
    """The device ``cfg`` trains on at this rank: cuda:LOCAL_RANK (LOCAL_RANK from the
    environment, else the rank) when CUDA is available and cfg.device is "auto" or "cuda";
    else cfg.device as given. More local ranks than GPUs share them round robin
    (LOCAL_RANK modulo the GPU count): small SAEs of a sweep may share one GPU."""
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{_env_int('LOCAL_RANK', rank) % torch.cuda.device_count()}"
    return cfg.device


# ----- one train call in its own folder -----------------------------------------------------
def _move_folder(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; a folder already at ``dst`` is replaced (moved aside
    first, removed once ``src`` is in place: a kill in between leaves it hidden, never half)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_directory(dst.parent)
    if src.parent != dst.parent:
        fsync_directory(src.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _group_folder(out_dir: Path, cfgs: list[TrainConfig]) -> Path:
    names = json.dumps([c.run_name for c in cfgs])
    return out_dir / WORK_DIR / hashlib.sha256(names.encode()).hexdigest()[:16]


def _train_call(data, cfgs: list[TrainConfig]) -> list:
    """saeengine.train(data, cfgs) in the call's own folder; the SAE folders end in out_dir."""
    from ..trainer import train

    out_dir = Path(cfgs[0].out_dir)
    work = _group_folder(out_dir, cfgs) / "run"
    with contextlib.ExitStack() as locks:
        # One lock per SAE folder, held over the moves and the training: a second job on
        # the same folders (even with other groups: another world size) is refused with
        # LockedError before it moves anything; train's own lock on `work` comes too late.
        for cfg in cfgs:
            locks.enter_context(exclusive_lock(out_dir / WORK_DIR / LOCKS / cfg.run_name, "per-rank SAE folder"))
        work.mkdir(parents=True, exist_ok=True)
        for cfg in cfgs:
            final, inside = out_dir / cfg.run_name, work / cfg.run_name
            if final.exists() and not inside.exists():
                _move_folder(final, inside)
            elif final.exists():
                log.warning("saeengine: %s and %s both exist; the run continues from the second (a killed per-rank "
                            "run's), and replaces the first at the end", final, inside)
        try:
            return train(data, [dataclasses.replace(c, out_dir=str(work)) for c in cfgs])
        finally:
            for cfg in cfgs:
                if (work / cfg.run_name).exists():
                    _move_folder(work / cfg.run_name, out_dir / cfg.run_name)


# ----- the summary ----------------------------------------------------------------------------
def _last_metrics(directory: Path) -> dict | None:
    """The last JSON line of directory/metrics.jsonl (the run's final step), or None."""
    from ..trainer.metrics import METRICS

    try:
        lines = [line for line in (directory / METRICS).read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    return last if isinstance(last, dict) else None


def _outcomes(configs: list[TrainConfig], mine: list[int], rank: int, failed: dict[int, str]) -> list[dict]:
    out = []
    for i in mine:
        cfg = configs[i]
        directory = Path(cfg.out_dir) / cfg.run_name
        out.append({"config_index": i, "run_name": cfg.run_name, "rank": rank, "out_dir": cfg.out_dir,
                    "directory": str(directory), "status": "failed" if i in failed else "done",
                    "error": failed.get(i), "metrics": None if i in failed else _last_metrics(directory)})
    return out


def _write_summaries(configs: list[TrainConfig], runs: list[dict], world: int) -> list[Path]:
    """out_dir/per_rank_summary.json for each out_dir of the configs: its runs (config
    order), whether all of them are done, and the ranks of the job that had no config."""
    runs = sorted(runs, key=lambda r: r["config_index"])
    busy = {r["rank"] for r in runs}
    written = []
    for out_dir in dict.fromkeys(c.out_dir for c in configs):
        here = [r for r in runs if r["out_dir"] == out_dir]
        summary = {"world": world, "assignment": "config i trains on rank i % world",
                   "idle_ranks": [r for r in range(world) if r not in busy],  # of the whole job
                   "complete": all(r["status"] == "done" for r in here), "runs": here}
        path = Path(out_dir) / SUMMARY
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(summary, indent=2, default=repr) + "\n").encode())
        written.append(path)
    return written


# ----- the entry point --------------------------------------------------------------------------
def _describe_data(item) -> Any:
    if isinstance(item, torch.Tensor):
        return {"tensor": list(item.shape), "dtype": str(item.dtype)}
    from ..store import ActivationStore

    return {"store": str(item.directory if isinstance(item, ActivationStore) else os.fspath(item))}


def _check_same_everywhere(data, configs: list[TrainConfig], rank: int, world: int) -> None:
    """Every rank must get the same configs and data (else the assignment is not a
    partition): one all_gather_object; ConfigError naming each differing config field or
    data item and the ranks, on every rank."""
    fields: dict[str, Any] = {"number of configs": len(configs)}
    for i, cfg in enumerate(configs):
        fields.update({f"configs[{i}].{name}": value for name, value in config_fields(cfg).items()})
        fields[f"data[{i}]" if isinstance(data, (list, tuple)) else "data"] = _describe_data(_data_of(data, i))
    check_same_config(Mesh(MeshSpec(data=world), rank, rank, 0), fields, what="per-rank sweep")


def train_per_rank(data, configs: Sequence[TrainConfig], *, rank: int | None = None, world: int | None = None,
                   barrier: bool = True, summary: bool = True) -> list:
    """Train this rank's share of ``configs`` (config i on rank i % world); every rank calls
    this with the same arguments.

    Args:
        data: one activation store directory / ActivationStore / tensor [tokens, d_in] for
            every config, or a list with one of them per config (several layers at once;
            d_in may differ between items). A list of another length: InputError.
        configs: the TrainConfigs, one SAE each. Their SAE folders (out_dir/<run_name>)
            must differ (InputError naming the repeats, before any training).
        rank, world: default torch.distributed's rank and world size when it is
            initialized, else the environment's RANK / WORLD_SIZE, else 0 / 1.
        barrier: at the end, wait for every rank (one comm.all_gather_object of the runs'
            outcomes; only under torch.distributed) and write the summary on rank 0.
        summary: write out_dir/per_rank_summary.json (rank 0; with world 1 also without
            torch.distributed).
    Returns:
        This rank's trained SAEs (eval mode), in config order: configs[rank::world].
        Each equals single-process ``saeengine.train(data_i, configs[i])``. A config with
        device "auto" or "cuda" trains on cuda:LOCAL_RANK when CUDA is available.

    Raises the training error of this rank (after the barrier: the other ranks log it and
    return theirs); ConfigError on every rank when the ranks got different configs or data.
    """
    configs = _check_inputs(data, configs)
    rank, world = rank_and_world(rank, world)
    gathered = dist.is_available() and dist.is_initialized() and world > 1
    if gathered:
        _check_same_everywhere(data, configs, rank, world)
    mine = assigned(len(configs), rank, world)
    if not mine:
        log.warning("saeengine: rank %d of %d has no config to train (%d configs for %d ranks: config i trains on "
                    "rank i %% %d); it only joins the final barrier", rank, world, len(configs), world, world)
    local = [dataclasses.replace(c, device=rank_device(c, rank)) for c in configs]
    cuda = list({torch.device(local[i].device) for i in mine if local[i].device.startswith("cuda:")})
    if len(cuda) == 1:
        torch.cuda.set_device(cuda[0])  # kernels launch on the current device's stream
    saes: dict[int, Any] = {}
    failed: dict[int, str] = {}
    error: Exception | None = None
    for call in plan(data, local, rank, world):
        if error is not None:  # after a failure this rank stops; the rest are reported as not run
            failed.update({i: f"not run: an earlier call on rank {rank} failed" for i in call})
            continue
        try:
            for i, sae in zip(call, _train_call(_data_of(data, call[0]), [local[i] for i in call])):
                saes[i] = sae
        except Exception as err:  # noqa: BLE001 - joined the barrier first, re-raised below
            error = err
            failed.update({i: f"{type(err).__name__}: {err}" for i in call})
    outcomes = _outcomes(configs, mine, rank, failed)
    if gathered and barrier:
        runs = [r for part in comm.all_gather_object(outcomes, None, axis="world", what="per_rank_summary")
                for r in part]
    elif world == 1:
        runs = outcomes
    else:
        runs = None
        if summary and rank == 0:
            log.warning("saeengine: no per-rank summary: rank 0 cannot see the other ranks' runs without "
                        "torch.distributed (and barrier=True)")
    if runs is not None:
        for r in runs:
            if r["status"] == "failed" and r["rank"] != rank:
                log.error("saeengine: %s failed on rank %d: %s", r["run_name"], r["rank"], r["error"])
        if summary and rank == 0:
            for path in _write_summaries(configs, runs, world):
                log.info("saeengine: per-rank summary written to %s", path)
    if error is not None:
        raise error
    return [saes[i] for i in mine]
