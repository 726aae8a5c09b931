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
runs in its own work folder ``out_dir/.per-rank/<group>/run/`` (``<group>``: a hash of the
call's run names), holding that call's lock, checkpoints and unfinished SAE folders.

Finished SAEs are never moved into a work folder (:func:`_train_call`), so no failure,
Ctrl-C or kill can hide or replace one:

- ``out_dir/<run_name>/`` holding a saved SAE whose provenance matches (same data identity,
  the settings a resume compares: not out_dir, device, logging or progress; the same
  steps) is loaded and returned as it is, not trained again. Other data raises
  DataMismatchError, other settings CheckpointError (the trainer's rules and messages),
  before any training; a folder there without a saved SAE raises InputError. With
  ``resume=False`` it is trained again and replaced once that run has finished.
- Otherwise a finished leftover of a killed job (``.per-rank/*/run/<run_name>``, of any
  group: another number of ranks too) whose provenance matches is moved into place.
- The rest train in the call's work folder, resuming its checkpoint (the same command
  with the same number of ranks resumes a killed job; an unfinished run that another
  number of ranks left starts over, with a warning naming it). Only after ``train``
  returned is each SAE folder renamed to ``out_dir/<run_name>/``; an SAE already there
  (``resume=False``, or a ``total_tokens`` that grew: its metrics.jsonl is copied into the
  work folder first, so the continued run keeps its log lines) is replaced only then, moved aside
  first and removed once the new one is in place (a kill in between leaves the new one as
  a finished leftover, found by the next call).

The provenance in ``out_dir/<run_name>/config.json`` records the caller's ``out_dir`` and
``device`` (rewritten before the move: the trainer saw the work folder and cuda:N).

Start: ``train_per_rank`` first checks its arguments (the configs, the data list, rank and
world, every data item's identity: a store's content hash, a tensor's SHA-256). Under
torch.distributed every rank then joins one gather of the outcome (``comm.agree``), so an
error on one rank raises on all (its own error there, one of its class naming it elsewhere),
and a second one compares every rank's configs and data identities: ranks given different
ones raise ConfigError on every rank, naming each differing field (``configs[1].k: 8 on
rank 0; 16 on rank 1``), before any training.

Device: a config with device "auto" or "cuda" trains on cuda:LOCAL_RANK when CUDA is
available (:func:`rank_device`); the only collectives are three small object gathers (two
at start, one at the end), so a gloo process group serves on GPUs too.

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
import glob
import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .._atomic import atomic_write_bytes, fsync_directory
from .._lock import exclusive_lock
from ..errors import InputError
from ..trainer.config import SHARED_FIELDS, TrainConfig
from . import comm
from .launch import world_from_env
from .mesh import Mesh, MeshSpec, check_same_config, config_fields

log = logging.getLogger("saeengine")

WORK_DIR = ".per-rank"  # out_dir/.per-rank/<group>/run/: one train call's lock and checkpoints
LOCKS = "locks"  # out_dir/.per-rank/locks/<run_name>/.lock: held while that SAE trains
SUMMARY = "per_rank_summary.json"
GROUP_FILE = "group.json"  # out_dir/.per-rank/<group>/group.json: the group's run names and world size
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
        world = world_from_env() or 1  # launch's reading of torchrun's WORLD_SIZE (InputError when bad)
    for name, value in (("rank", rank), ("world", world)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"train_per_rank: {name}={value!r} must be an int")
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"train_per_rank: rank={rank} of world={world}: need world >= 1 and 0 <= rank < world")
    return rank, world


def _env_int(name: str, default: int) -> int:
    """RANK / LOCAL_RANK as torchrun sets them (launch reads only WORLD_SIZE)."""
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
def _identity(item) -> dict:
    """The data identity the trainer records and compares (saeengine.trainer.data): a
    store's content hash, or a tensor's shape, dtype and SHA-256. ConfigError /
    NonFiniteError for data the trainer would refuse."""
    from ..trainer.data import batch_source

    return batch_source(item, 1, 0, torch.device("cpu")).identity()


def _group_folder(out_dir: Path, cfgs: list[TrainConfig]) -> Path:
    names = json.dumps([c.run_name for c in cfgs])
    return out_dir / WORK_DIR / hashlib.sha256(names.encode()).hexdigest()[:16]


class _Folder:
    """What saeengine.trainer.rundir checks of a run: its config and SAE folder."""

    def __init__(self, cfg: TrainConfig, directory: Path):
        self.cfg, self.directory = cfg, directory


class _Data:
    """A data identity where rundir expects a batch source."""

    def __init__(self, identity: dict):
        self._identity = identity

    def identity(self) -> dict:
        return self._identity


def _finished(directory: Path, cfg: TrainConfig, identity: dict) -> bool | None:
    """Whether ``directory`` holds the SAE ``cfg`` makes on this data: True (same data,
    the settings a resume compares, the same steps), False (a run that ``cfg`` continues:
    fewer steps), None (no saved SAE there). Raises as the trainer does for a saved SAE it
    may not continue: DataMismatchError (other data), CheckpointError (other settings, or
    unverifiable)."""
    from ..trainer.rundir import check_finished, saved_provenance

    provenance = saved_provenance(directory)
    if provenance is None:
        return None
    check_finished([_Folder(cfg, directory)], _Data(identity))
    return provenance["steps"] == cfg.steps


def _restore_provenance(directory: Path, user: TrainConfig) -> None:
    """Make ``directory``/config.json record the caller's out_dir and device, not the
    work folder and cuda:N that train saw (an atomic rewrite; the weights are untouched)."""
    from ..checkpoint import CONFIG_FILE

    path = directory / CONFIG_FILE
    config = json.loads(path.read_text())
    recorded = config["provenance"]["train_config"]
    wanted = {"out_dir": user.out_dir, "device": user.device}
    if any(recorded.get(k) != v for k, v in wanted.items()):
        recorded.update(wanted)
        atomic_write_bytes(path, (json.dumps(config, indent=2) + "\n").encode())


def _place(src: Path, dst: Path, root: Path, replace: bool) -> None:
    """Rename the finished SAE folder ``src`` to ``dst``. A folder at ``dst`` is replaced
    only when ``replace`` (checked at the call's start): moved aside into root/replaced/
    first and removed once ``src`` is in place, so a kill in between leaves ``src`` whole
    (a finished leftover the next call moves into place) and nothing half-written."""
    aside = None
    if dst.exists():
        if not replace:
            raise InputError(f"{dst} appeared while {src} trained (another program wrote it): it is kept, and the "
                             f"finished SAE stays in {src}; remove one of them and run again")
        aside = root / "replaced" / f"{dst.name}.{uuid.uuid4().hex[:8]}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(dst, aside)
    os.replace(src, dst)
    fsync_directory(dst.parent)
    fsync_directory(src.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _leftovers(root: Path, work: Path, name: str) -> list[Path]:
    """Every work folder's copy of SAE folder ``name``: this call's group first, then the
    other groups' (jobs with another number of ranks)."""
    others = sorted(g / "run" / name for g in root.iterdir() if g.is_dir() and g / "run" != work) \
        if root.is_dir() else []
    return [p for p in [work / name, *others] if p.is_dir()]


def _promote_leftover(root: Path, work: Path, final: Path, cfg: TrainConfig, user: TrainConfig,
                      identity: dict) -> bool:
    """Move a killed job's finished copy of this SAE (any group) to ``final`` (absent);
    True when one was. Unfinished copies of other groups are named in a warning: their
    checkpoints hold another set of runs, so this call cannot resume them."""
    unfinished = []
    for candidate in _leftovers(root, work, cfg.run_name):
        try:
            done = _finished(candidate, cfg, identity)
        except Exception as err:  # noqa: BLE001 - another run's leftover: not this SAE, kept as it is
            log.info("saeengine: %s is not this run's SAE (%s); kept as it is", candidate, err)
            continue
        if done:
            _restore_provenance(candidate, user)
            _place(candidate, final, root, replace=False)
            log.info("saeengine: %s: the finished SAE a killed job left in %s", final, candidate.parent)
            return True
        if candidate.parent != work:
            unfinished.append(candidate)
    for candidate in unfinished:
        log.warning("saeengine: %s holds an unfinished run of %s from a job with another number of ranks (%s); its "
                    "checkpoint holds other runs, so %s starts over here (rerun with that number of ranks to "
                    "resume it instead)", candidate, cfg.run_name, _group_note(candidate.parent.parent),
                    cfg.run_name)
    return False


def _group_note(group: Path) -> str:
    try:
        meta = json.loads((group / GROUP_FILE).read_text())
        return f"world {meta['world']}, runs {meta['run_names']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "no group.json"


def _train_call(data, cfgs: list[TrainConfig], users: list[TrainConfig], identity: dict, world: int) -> list:
    """The SAEs of ``cfgs`` (one saeengine.train call's worth): finished ones loaded from
    out_dir/<name>, the rest trained in the call's work folder and moved there after
    ``train`` returned (module docstring). ``users``: the configs as the caller gave them
    (their out_dir and device go into the provenance); ``identity``: the data's."""
    from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE
    from ..sae import SAE
    from ..trainer import train
    from ..trainer.loop import resolve_device
    from ..trainer.metrics import METRICS

    out_dir = Path(cfgs[0].out_dir)
    root = out_dir / WORK_DIR
    group = _group_folder(out_dir, cfgs)
    work = group / "run"
    with contextlib.ExitStack() as locks:
        # One lock per SAE folder, held over the checks, the training and the moves: a
        # second job on the same folders (even with other groups: another world size) is
        # refused with LockedError before it touches anything.
        for cfg in cfgs:
            locks.enter_context(exclusive_lock(root / LOCKS / cfg.run_name, "per-rank SAE folder"))
        for cfg in cfgs:  # what a kill mid-replacement left aside: the new SAE is in place or a leftover
            for old in (root / "replaced").glob(f"{glob.escape(cfg.run_name)}.{'[0-9a-f]' * 8}"):
                shutil.rmtree(old, ignore_errors=True)
        saes: dict[str, Any] = {}
        todo, replace = [], set()
        for cfg, user in zip(cfgs, users):
            final = out_dir / cfg.run_name
            if final.exists() and not ((final / CONFIG_FILE).exists() or (final / WEIGHTS_FILE).exists()):
                raise InputError(f"{final} exists but holds no saved SAE ({CONFIG_FILE}, {WEIGHTS_FILE}); per-rank "
                                 "training never leaves such a folder there, so it is not overwritten: remove it, "
                                 "or give the run another TrainConfig.name")
            if not cfg.resume:  # start over; a finished SAE is replaced once the new one is
                if final.exists():
                    warnings.warn(f"TrainConfig.resume=False: {final} holds a saved SAE; {cfg.run_name} trains "
                                  "again from the start and replaces it once that run has finished (a run that "
                                  "fails or is interrupted leaves it as it is)", UserWarning, stacklevel=3)
                replace.add(cfg.run_name)
                todo.append(cfg)
                continue
            done = _finished(final, cfg, identity)  # raises for an SAE of other data or settings
            if done is None and _promote_leftover(root, work, final, cfg, user, identity):
                done = True
            if done:
                saes[cfg.run_name] = SAE.load(final, device=resolve_device(cfg.device)).eval()
                continue
            if done is False:  # a run this config continues (total_tokens grew): replaced when it has
                replace.add(cfg.run_name)
                kept = work / cfg.run_name / METRICS
                if not kept.exists() and (final / METRICS).exists():  # keep its log lines when it resumes
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(final / METRICS, kept)
            todo.append(cfg)
        if todo:
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(group / GROUP_FILE, (json.dumps(
                {"run_names": [c.run_name for c in cfgs], "world": world}) + "\n").encode())
            trained = train(data, [dataclasses.replace(c, out_dir=str(work)) for c in todo])
            by_name = {u.run_name: u for u in users}
            for cfg, sae in zip(todo, trained):  # train returned: every SAE of the call is saved
                _restore_provenance(work / cfg.run_name, by_name[cfg.run_name])
                _place(work / cfg.run_name, out_dir / cfg.run_name, root, cfg.run_name in replace)
                saes[cfg.run_name] = sae
        return [saes[c.run_name] for c in cfgs]


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
def _identities(data, configs: list[TrainConfig]) -> list[dict]:
    """Each config's data identity (:func:`_identity`), computed once per data item."""
    known: dict[tuple, dict] = {}
    out = []
    for i in range(len(configs)):
        item = _data_of(data, i)
        key = _data_key(item)
        if key not in known:
            known[key] = _identity(item)
        out.append(known[key])
    return out


def _check_same_everywhere(data, configs: list[TrainConfig], identities: list[dict], rank: int, world: int) -> None:
    """Every rank must get the same configs and data (else the assignment is not a
    partition): one all_gather_object; ConfigError naming each differing config field or
    data item (by identity: a store's content hash, a tensor's SHA-256) and the ranks, on
    every rank."""
    fields: dict[str, Any] = {"number of configs": len(configs)}
    for i, cfg in enumerate(configs):
        fields.update({f"configs[{i}].{name}": value for name, value in config_fields(cfg).items()})
        fields[f"data[{i}]" if isinstance(data, (list, tuple)) else "data"] = identities[i]
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
        Each equals single-process ``saeengine.train(data_i, configs[i])``; one already
        finished in out_dir/<run_name> (same data and settings) is loaded from there, not
        trained again. A config with
        device "auto" or "cuda" trains on cuda:LOCAL_RANK when CUDA is available.

    Raises the training error of this rank (after the barrier: the other ranks log it and
    return theirs), e.g. DataMismatchError for a finished SAE of other data in its folder;
    ConfigError on every rank when the ranks got different configs or data; a start-up
    error of one rank (bad arguments, RANK / WORLD_SIZE, data) on every rank.
    """
    # Checks that may fail on one rank only (its arguments, its environment, its data) run
    # before the first collective, and every rank learns of any failure in it.
    group_world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    error = None
    try:
        configs = _check_inputs(data, configs)
        rank, world = rank_and_world(rank, world)
        local = [dataclasses.replace(c, device=rank_device(c, rank)) for c in configs]
        identities = _identities(data, configs)
    except Exception as err:  # noqa: BLE001 - shared with the other ranks first, re-raised there
        error = err
    # One gather of every rank's outcome: the failing rank raises its own error, the others
    # one of its class naming it (comm.agree), so no rank is left waiting alone.
    comm.agree(error, "train_per_rank's checks of its arguments", local=group_world == 1, label="per_rank_start",
               hint="give every rank the same, valid arguments")
    gathered = group_world > 1
    if gathered:
        _check_same_everywhere(data, configs, identities, rank, world)
    mine = assigned(len(configs), rank, world)
    if not mine:
        log.warning("saeengine: rank %d of %d has no config to train (%d configs for %d ranks: config i trains on "
                    "rank i %% %d); it only joins the final barrier", rank, world, len(configs), world, world)
    cuda = list({torch.device(local[i].device) for i in mine if local[i].device.startswith("cuda:")})
    if len(cuda) == 1:
        torch.cuda.set_device(cuda[0])  # kernels launch on the current device's stream
    saes: dict[int, Any] = {}
    failed: dict[int, str] = {}
    error = None
    for call in plan(data, local, rank, world):
        if error is not None:  # after a failure this rank stops; the rest are reported as not run
            failed.update({i: f"not run: an earlier call on rank {rank} failed" for i in call})
            continue
        try:
            for i, sae in zip(call, _train_call(_data_of(data, call[0]), [local[i] for i in call],
                                                [configs[i] for i in call], identities[call[0]], world)):
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
