"""Sharded training checkpoints: one file per latent slice plus a manifest, crash-safe,
reloadable at another world size and mesh shape, exportable to a single-file SAE.

Layout of ``root/step-000001200/`` (``root`` is a run's checkpoints folder):

- ``latent-00001-of-00004.safetensors``: one per latent slice [lo, hi), written by the
  rank at data index 0 of that slice (the data-axis replicas hold the same rows, so one
  copy is kept): the slice's rows of every latent-indexed tensor, ``sae.W_enc`` [hi-lo, d],
  ``sae.b_enc`` [hi-lo], ``sae.W_dec`` [hi-lo, d], the optimizer's moments of those rows
  (``optim.<path>``, e.g. ``optim.state.W_enc.m`` [hi-lo, d]), and the dead-latent
  counters ``last_fired`` [hi-lo] (int64; the latest stamp over the data replicas).
- ``replicated.safetensors``: what every rank holds alike, written once by rank 0:
  ``sae.b_dec`` [d], ``sae.norm_mean`` [d], ``sae.norm_scale`` [], other buffers, and the
  optimizer state of the dense parameters (b_dec's moments, torch Adam's step counts).
- ``manifest.json``: format, run id, the run's config and its SHA-256, the SAEConfig, the
  mesh (data, latent) and world size, F, and per file its slice bounds, tensors, size and
  SHA-256; the step, the JSON part of the optimizer state and the counters (``tree``), and
  free-form ``extra`` (the loader position).

Saving (each rank's part is a pure function; :func:`save_sharded` adds the collectives):
rank 0 makes the hidden folder ``.step-N.tmp`` (:func:`begin_save`); after a barrier each
slice's writer writes its file atomically (:func:`write_shard`), rank 0 the replicated
file (:func:`write_replicated`); after a second barrier (the gather of the files' records)
rank 0 writes ``manifest.json`` LAST, renames the folder to ``step-N`` and replaces
``LATEST`` atomically (:func:`commit`), then removes older checkpoints. A save killed at
any moment (any rank, SIGKILL) leaves ``LATEST`` naming the previous whole checkpoint;
the hidden folder is never read and is removed by the next save. Every rank must see
the same filesystem (one machine, or a shared filesystem across nodes).

Loading (:func:`load_shard`) reads any slice [lo, hi): each row comes from whichever old
file holds it, so a checkpoint saved at data=2,latent=2 loads at data=1,latent=4, at one
process, or at any other mesh. It refuses, with a CheckpointError naming the file and the
fix: a manifest of another run (run id) or another config (naming the fields), an edited
manifest (its config no longer matches its hash), a missing shard, a shard whose size or
SHA-256 differs from the manifest, slices that do not tile [0, F). :func:`export_sae`
writes the gathered SAE in saeengine's single-file format (``SAE.load`` reads it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._atomic import atomic_write, atomic_write_bytes, fsync_directory
from ..checkpoint_checks import read_json_object, sha256
from ..errors import CheckpointError, ConfigError, InputError

log = logging.getLogger("saeengine")

FORMAT = "saeengine.sharded_checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPLICATED_FILE = "replicated.safetensors"
LATEST = "LATEST"
ROW_ROLES = ("encoder_rows", "decoder_rows")
_TENSOR = "__tensor__"  # a tensor's place in the JSON skeleton of the optimizer state
_STEP_DIR = re.compile(r"step-(\d{9,})")
# manifest.json's fields with their JSON types
_FIELDS: dict[str, type | tuple] = {
    "format": str, "format_version": int, "run_id": str, "library_version": str, "saved_at": str, "step": int,
    "config": dict, "config_sha256": str, "sae_config": dict, "mesh": dict, "world_size": int, "d_sae": int,
    "files": list, "replicated": dict, "tree": dict, "extra": dict}
_FILE_FIELDS = {"file": str, "rank": int, "latent_rank": int, "lo": int, "hi": int, "bytes": int, "sha256": str,
                "tensors": dict}


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def shard_file_name(latent_rank: int, latent_size: int) -> str:
    return f"latent-{latent_rank:05d}-of-{latent_size:05d}.safetensors"


def new_run_id() -> str:
    """A fresh run id (rank 0 makes it at a run's start; the run keeps it when resumed)."""
    return uuid.uuid4().hex


def config_sha256(config: dict) -> str:
    """SHA-256 of a config dict's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----- one slice's state, and how it maps onto a module + optimizer -------------------------
@dataclass
class TrainingShard:
    """One latent slice [lo, hi) of a run's training state, as tensors on the CPU.

    rows: latent-indexed tensors, each [hi - lo, ...]: "sae.W_enc", "sae.b_enc",
        "sae.W_dec" (and "sae.log_threshold" for JumpReLU), the optimizer's moments of
        those rows ("optim.<path>"), "last_fired" (int64).
    replicated: the rest, alike on every rank: "sae.b_dec", "sae.norm_mean",
        "sae.norm_scale", the dense parameters' optimizer state.
    tree: JSON: "sae_config" (the FULL SAEConfig, d_sae = F), "row_names" (the module's
        latent-row parameters), "param_names" (its parameters in order), "optimizer" (the
        optimizer's state_dict with each tensor replaced by {"__tensor__": name}, or
        None), "counters" (step, tokens_seen, ...).
    meta: filled on load: "step", "run_id", "mesh", "extra" of the manifest.
    """

    lo: int
    hi: int
    rows: dict[str, torch.Tensor]
    replicated: dict[str, torch.Tensor]
    tree: dict
    meta: dict = field(default_factory=dict)


def _host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy (never an alias of a live parameter, which later steps change), compact
    (a slice of a full tensor is written as its rows only)."""
    return t.detach().to("cpu", copy=True).contiguous()


def _named_optimizer_state(optimizer, param_names: list[str]) -> dict:
    """The optimizer's state_dict with torch Adam's parameter indices replaced by names
    (so that a module of another layout maps them back by name)."""
    state = optimizer.state_dict()
    if "param_groups" in state:  # torch.optim's layout (DenseAdam): state keyed by parameter index
        state = {"state": {param_names[i]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [param_names[i] for i in g["params"]]}
                                  for g in state["param_groups"]],
                 "torch_layout": True}
    return state


def _flatten(tree: Any, path: list[str], row_names: set[str], n_rows: int, lo: int, hi: int, full: bool,
             rows: dict, replicated: dict) -> Any:
    """Tensors of ``tree`` into ``rows`` (latent-indexed: under a row parameter's name, with
    dim 0 of the slice's or, when ``full``, of all rows) or ``replicated``; returns the
    JSON skeleton."""
    if isinstance(tree, torch.Tensor):
        key = "optim." + ".".join(path)
        is_row = any(p in row_names for p in path) and tree.dim() >= 1 and tree.shape[0] == n_rows
        if is_row:
            rows[key] = _host(tree[lo:hi] if full else tree)
        else:
            replicated[key] = _host(tree)
        return {_TENSOR: key}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise CheckpointError(f"optimizer state at {'.'.join(path) or 'top'} has non-string keys "
                                  f"{sorted(map(repr, tree))[:4]}; a sharded checkpoint stores DenseAdam or "
                                  "RowSparseAdam state (saeengine.optim)")
        return {k: _flatten(v, path + [k], row_names, n_rows, lo, hi, full, rows, replicated) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_flatten(v, path + [str(i)], row_names, n_rows, lo, hi, full, rows, replicated)
                for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise CheckpointError(f"optimizer state at {'.'.join(path)} holds a {type(tree).__name__}; a sharded "
                          "checkpoint stores tensors and JSON values")


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {k: _unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    return tree


def shard_from_training(module, optimizer=None, last_fired: torch.Tensor | None = None, *, lo: int, hi: int,
                        counters: dict | None = None) -> TrainingShard:
    """The training state of latent slice [lo, hi), copied to the CPU.

    module: an SAE-like module with ``state_dict()``, ``parameter_roles()`` and ``cfg``
        (the full SAEConfig), holding either this slice's rows (a LatentShardedSAE,
        W_enc [hi-lo, d]) or all F rows (a single-process SAE: the slice is cut out).
    optimizer: a saeengine.optim optimizer over ``module`` (DenseAdam, RowSparseAdam), or None.
    last_fired: [hi-lo] or [F] int64 dead-latent counters, or None.
    counters: JSON values to keep (step, tokens_seen, ...).
    """
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
        raise ConfigError(f"a latent slice needs 0 <= lo <= hi, got lo={lo!r}, hi={hi!r}")
    roles = module.parameter_roles()
    row_names = {name for name, role in roles.items() if role in ROW_ROLES}
    state = module.state_dict()
    n_rows = {tuple(state[name].shape[:1]) for name in row_names}
    if len(n_rows) != 1:
        raise CheckpointError(f"the module's latent-row parameters {sorted(row_names)} differ in their number of "
                              f"rows ({sorted(n_rows)}); they must all be indexed by latent")
    (n_rows,) = n_rows.pop()
    full = n_rows != hi - lo
    if full and n_rows < hi:
        raise ConfigError(f"slice [{lo}, {hi}) does not fit the module's {n_rows} latent rows: give the module of "
                          f"that slice (W_enc [{hi - lo}, d]) or the full one (W_enc [>= {hi}, d])")
    rows, replicated = {}, {}
    for name, t in state.items():
        if name in row_names:
            rows[f"sae.{name}"] = _host(t[lo:hi] if full else t)
        else:
            replicated[f"sae.{name}"] = _host(t)
    param_names = [name for name, _ in module.named_parameters()]
    skeleton = None
    if optimizer is not None:
        named = _named_optimizer_state(optimizer, param_names)
        skeleton = _flatten(named, [], row_names, n_rows, lo, hi, full, rows, replicated)
    if last_fired is not None:
        if last_fired.shape != (n_rows,):
            raise CheckpointError(f"last_fired has shape {tuple(last_fired.shape)}; expected [{n_rows}] (one counter "
                                  "per latent row of the module)")
        rows["last_fired"] = _host(last_fired[lo:hi] if full else last_fired)
    tree = {"sae_config": json.loads(json.dumps(module.cfg.to_dict())), "row_names": sorted(row_names),
            "param_names": param_names, "optimizer": skeleton, "counters": dict(counters or {})}
    try:
        json.dumps(tree, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"counters and the optimizer's settings must be JSON values: {err}") from None
    return TrainingShard(lo, hi, rows, replicated, tree)


def apply_to_training(shard: TrainingShard, module, optimizer=None, last_fired: torch.Tensor | None = None) -> dict:
    """Copy ``shard`` into ``module`` (holding the rows [shard.lo, shard.hi), or all F when
    the shard is the whole range), ``optimizer`` and ``last_fired``, in place; returns the
    counters. The inverse of :func:`shard_from_training`."""
    tensors = {**shard.replicated, **shard.rows}
    state = {name[4:]: t for name, t in tensors.items() if name.startswith("sae.")}
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"the checkpoint's slice [{shard.lo}, {shard.hi}) does not fit this module: {err}; build "
                              "the module of that slice (same SAEConfig, mesh slice bounds)") from None
    if optimizer is not None:
        skeleton = shard.tree.get("optimizer")
        if skeleton is None:
            raise CheckpointError("the checkpoint holds no optimizer state (it was saved with optimizer=None); "
                                  "resume without one, or start the optimizer afresh")
        named = _unflatten(skeleton, tensors)
        if named.pop("torch_layout", False):  # names back to this module's parameter indices
            index = {name: i for i, (name, _) in enumerate(module.named_parameters())}
            unknown = sorted(set(named["state"]) - set(index))
            if unknown:
                raise CheckpointError(f"the checkpoint's optimizer state is for parameters {unknown}, which this "
                                      f"module lacks (it has {sorted(index)}); build the module of that run")
            named = {"state": {index[name]: s for name, s in named["state"].items()},
                     "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}
        optimizer.load_state_dict(named)
    if last_fired is not None:
        if "last_fired" not in shard.rows:
            raise CheckpointError("the checkpoint holds no dead-latent counters (last_fired)")
        last_fired.copy_(shard.rows["last_fired"])
    return dict(shard.tree.get("counters", {}))


def sae_from_shard(shard: TrainingShard):
    """The full SAE of a shard that spans every latent ([0, F)), on the CPU."""
    from ..config import SAEConfig
    from ..sae import SAE

    cfg = SAEConfig.from_dict(shard.tree["sae_config"])
    if (shard.lo, shard.hi) != (0, cfg.d_sae):
        raise CheckpointError(f"slice [{shard.lo}, {shard.hi}) is not the whole SAE [0, {cfg.d_sae}); load it with "
                              "load_full() to gather every slice")
    sae = SAE(cfg, device="meta")
    state = {name[4:]: t for name, t in {**shard.replicated, **shard.rows}.items() if name.startswith("sae.")}
    sae.load_state_dict(state, assign=True)
    return sae


# ----- saving: the parts of the protocol ----------------------------------------------------
def _specs(tensors: dict[str, torch.Tensor]) -> dict:
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in tensors.items()}


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> dict:
    """Write ``tensors`` atomically to ``path`` -> {bytes, sha256, tensors}."""
    record: dict = {}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in header.items()})
        except SafetensorError as err:  # it hides the OS error in its text (see saeengine.checkpoint)
            found = re.search(r"\(os error (\d+)\)", str(err))
            if found is None:
                raise
            raise OSError(int(found.group(1)), f"writing {tmp} failed: {err}") from err
        record.update(bytes=tmp.stat().st_size, sha256=sha256(tmp))

    atomic_write(path, write)
    return {**record, "tensors": _specs(tensors)}


def tmp_dir(root: Path, step: int) -> Path:
    """The hidden folder a save of ``step`` writes into before it is committed."""
    return Path(root) / f".{step_name(step)}.tmp"


def begin_save(root: str | Path, step: int) -> Path:
    """Rank 0, before a barrier: a fresh hidden folder for the save of ``step`` (a stale one
    of a killed save is removed first)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_shard(tmp: str | Path, shard: TrainingShard, *, latent_rank: int, latent_size: int, rank: int,
                run_id: str, step: int) -> dict:
    """The writer of latent slice ``latent_rank``: its rows, atomically -> the file's record
    for the manifest ({file, rank, latent_rank, lo, hi, bytes, sha256, tensors})."""
    name = shard_file_name(latent_rank, latent_size)
    header = {"format": FORMAT, "run_id": run_id, "step": step, "lo": shard.lo, "hi": shard.hi}
    record = _write_tensors(Path(tmp) / name, shard.rows, header)
    return {"file": name, "rank": rank, "latent_rank": latent_rank, "lo": shard.lo, "hi": shard.hi, **record}


def write_replicated(tmp: str | Path, shard: TrainingShard, *, run_id: str, step: int) -> dict:
    """Rank 0: the replicated tensors, atomically -> their record ({file, bytes, sha256, tensors})."""
    header = {"format": FORMAT, "run_id": run_id, "step": step}
    return {"file": REPLICATED_FILE, **_write_tensors(Path(tmp) / REPLICATED_FILE, shard.replicated, header)}


def _mesh_dict(mesh) -> dict:
    """(data, latent), {"data", "latent"} or a MeshSpec/Mesh -> {"data": int, "latent": int}."""
    if isinstance(mesh, dict):
        data, latent = mesh.get("data"), mesh.get("latent")
    elif isinstance(mesh, (tuple, list)) and len(mesh) == 2:
        data, latent = mesh
    else:
        spec = getattr(mesh, "spec", mesh)
        data, latent = getattr(spec, "data", None), getattr(spec, "latent", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (data, latent)):
        raise ConfigError(f"a mesh is (data, latent) sizes >= 1, got {mesh!r}")
    return {"data": data, "latent": latent}


def check_world(mesh, world_size: int) -> dict:
    """InputError (as saeengine.distributed.init_mesh raises) unless the mesh's data x
    latent equals ``world_size``; returns the mesh dict."""
    m = _mesh_dict(mesh)
    if m["data"] * m["latent"] != world_size:
        raise InputError(f"the mesh data={m['data']},latent={m['latent']} needs {m['data'] * m['latent']} processes "
                          f"but the world size is {world_size}; launch data x latent processes (torchrun "
                          f"--nproc-per-node {m['data'] * m['latent']}) or pass a mesh whose sizes multiply to "
                          f"{world_size}")
    return m


def _check_tiling(path: Path, files: list[dict], d_sae: int, latent_size: int | None) -> None:
    """The files' slices, in order of lo, must tile [0, F) exactly."""
    if latent_size is not None and len(files) != latent_size:
        raise CheckpointError(f"{path}: {len(files)} shard files for a latent axis of {latent_size}; every latent "
                              "slice writes one file")
    at = 0
    for rec in sorted(files, key=lambda r: (r["lo"], r["hi"])):
        if rec["lo"] != at or rec["hi"] < rec["lo"]:
            what = "a gap" if rec["lo"] > at else "an overlap"
            raise CheckpointError(f"{path}: the shard slices leave {what} at latent {min(at, rec['lo'])} "
                                  f"({rec['file']} holds [{rec['lo']}, {rec['hi']})); the files must tile "
                                  f"[0, {d_sae}) once: the manifest was edited, or files of different saves were mixed")
        at = rec["hi"]
    if at != d_sae:
        raise CheckpointError(f"{path}: the shard slices end at latent {at} but F = {d_sae}; rows [{at}, {d_sae}) "
                              "are in no file")


def commit(root: str | Path, step: int, records: list[dict], replicated: dict, *, tree: dict, run_id: str,
           config: dict | None, mesh, world_size: int, extra: dict | None = None, keep: int = 1) -> Path:
    """Rank 0, after every file is written: manifest.json LAST, then the rename of the
    hidden folder to ``step-N``, LATEST, and the removal of all but the ``keep`` newest
    checkpoints (and of hidden folders of killed saves). Returns the checkpoint's folder."""
    from .. import __version__

    root = Path(root)
    m = check_world(mesh, world_size)
    sae_config = tree["sae_config"]
    d_sae = int(sae_config["d_sae"])
    tmp = tmp_dir(root, step)
    records = sorted(records, key=lambda r: r["latent_rank"])
    _check_tiling(tmp / MANIFEST, records, d_sae, m["latent"])
    config = json.loads(json.dumps(config if config is not None else sae_config))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "run_id": run_id, "library_version": __version__,
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "step": int(step),
        "config": config, "config_sha256": config_sha256(config), "sae_config": sae_config, "mesh": m,
        "world_size": world_size, "d_sae": d_sae, "files": records, "replicated": replicated, "tree": tree,
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(manifest, indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save to {tmp}: config and extra must be JSON values ({err})") from None
    atomic_write_bytes(tmp / MANIFEST, text.encode())
    final = root / step_name(step)
    aside = None
    if final.exists():  # a save of the same step again: keep the old one until LATEST moves
        aside = root / f".{final.name}.tmp-replaced"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_directory(root)
    atomic_write_bytes(root / LATEST, final.name.encode())
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    committed = sorted((p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name)), key=lambda p: int(p.name[5:]))
    for old in [p for p in committed if p != final][: max(0, len(committed) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    remove_incomplete(root)
    return final


def remove_incomplete(root: str | Path) -> list[Path]:
    """Remove the hidden folders of killed saves in ``root`` (never read). Call only when
    no save is in flight (at a run's start, or from :func:`commit`)."""
    root = Path(root)
    removed = sorted(p for p in root.glob(".step-*.tmp*")) if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return removed


def save_sharded_local(root: str | Path, step: int, shards: list[TrainingShard], *, run_id: str,
                       config: dict | None = None, mesh=None, extra: dict | None = None, keep: int = 1) -> Path:
    """The whole save in one process: ``shards`` are the latent slices in order (what the
    data-index-0 rank of each slice would write); ``mesh`` (data, latent) defaults to
    (1, len(shards)). For tools and tests that hold every slice; :func:`save_sharded` is
    the multi-process version."""
    m = _mesh_dict(mesh if mesh is not None else (1, len(shards)))
    if len(shards) != m["latent"]:
        raise ConfigError(f"{len(shards)} latent slices for a mesh with latent={m['latent']}; give one shard per "
                          "latent slice")
    first = shards[0]
    for i, s in enumerate(shards[1:], 1):
        differ = [n for n in first.replicated if n not in s.replicated or not torch.equal(first.replicated[n],
                                                                                             s.replicated[n])]
        if differ or s.tree != first.tree:
            raise CheckpointError(f"latent slice {i} disagrees with slice 0 on replicated state "
                                  f"({differ or 'the optimizer settings or counters'}); the ranks diverged")
    tmp = begin_save(root, step)
    records = [write_shard(tmp, s, latent_rank=i, latent_size=m["latent"], rank=i, run_id=run_id, step=step)
               for i, s in enumerate(shards)]
    rep = write_replicated(tmp, first, run_id=run_id, step=step)
    return commit(root, step, records, rep, tree=first.tree, run_id=run_id, config=config, mesh=m,
                  world_size=m["data"] * m["latent"], extra=extra, keep=keep)


# ----- saving with torch.distributed ----------------------------------------------------------
def _all_ok(what: str, error: BaseException | None, group=None) -> None:
    """comm.agree over ``group``: a failure elsewhere raises CheckpointError on this rank too
    (so no rank waits forever at the next barrier)."""
    from . import comm

    comm.agree(error, what, group, raise_as=CheckpointError, label="checkpoint_status",
               hint="nothing was committed and the checkpoint before stays the latest")


def save_sharded(root: str | Path, step: int, shard: TrainingShard, mesh, *, run_id: str, config: dict | None = None,
                 extra: dict | None = None, keep: int = 1, group=None,
                 on_written: Callable[[], None] | None = None) -> Path:
    """Every rank of the mesh calls this with its slice's state; returns the checkpoint's
    folder on every rank once it is committed.

    mesh: a saeengine.distributed Mesh (rank, world_size, data_rank, latent_rank,
        data_size, latent_size). The rank at data index 0 of each latent slice writes its
        file; rank 0 writes the replicated file and commits (:func:`commit`).
    on_written: called after this rank's files are written and before the commit's
        barrier (the crash tests kill a rank there).
    The dead-latent counters saved are the latest stamp over the data replicas (an
    all_reduce MAX of ``last_fired`` over the data group: a latent fired if it fired on
    any replica); every other row tensor is the data-index-0 rank's, which the replicas
    must share (their gradients are summed over the data group).
    Raises InputError before any collective when the mesh does not match the world.
    """
    import torch.distributed as dist

    from . import comm

    world = dist.get_world_size(group)
    check_world((mesh.data_size, mesh.latent_size), world)
    if mesh.world_size != world or dist.get_rank(group) != mesh.rank:
        raise ConfigError(f"the mesh says rank {mesh.rank} of {mesh.world_size} but torch.distributed says rank "
                          f"{dist.get_rank(group)} of {world}; build the mesh in this process group (init_mesh)")
    if mesh.data_size > 1 and "last_fired" in shard.rows:
        fired = shard.rows["last_fired"].to(getattr(mesh, "device", "cpu"), copy=True)
        comm.all_reduce(fired, mesh.data_group, axis="data", what="checkpoint_last_fired", op="max")
        shard = replace(shard, rows={**shard.rows, "last_fired": fired.cpu()})
    err = None
    if mesh.rank == 0:
        try:
            begin_save(root, step)
        except BaseException as exc:  # noqa: BLE001 - told to every rank below
            err = exc
    _all_ok(f"creating {tmp_dir(root, step)}", err, group)
    record = rep = err = None
    try:
        tmp = tmp_dir(root, step)
        if mesh.data_rank == 0:
            record = write_shard(tmp, shard, latent_rank=mesh.latent_rank, latent_size=mesh.latent_size,
                                 rank=mesh.rank, run_id=run_id, step=step)
        if mesh.rank == 0:
            rep = write_replicated(tmp, shard, run_id=run_id, step=step)
        if on_written is not None:
            on_written()
    except BaseException as exc:  # noqa: BLE001
        err = exc
    records = comm.all_gather_object((record, None if err is None else f"{type(err).__name__}: {err}"), group,
                                     axis="world", what="checkpoint_records")
    if err is not None:
        raise err
    failed = [(r, e) for r, (_, e) in enumerate(records) if e is not None]
    if failed:
        raise CheckpointError(f"writing the checkpoint of step {step} failed on rank {failed[0][0]} ({failed[0][1]}); "
                              "nothing was committed and the checkpoint before stays the latest")
    err = final = None
    if mesh.rank == 0:
        try:
            final = commit(root, step, [r for r, _ in records if r is not None], rep, tree=shard.tree, run_id=run_id,
                           config=config, mesh=(mesh.data_size, mesh.latent_size), world_size=world, extra=extra,
                           keep=keep)
        except BaseException as exc:  # noqa: BLE001
            err = exc
    _all_ok(f"committing the checkpoint of step {step}", err, group)
    return final if final is not None else Path(root) / step_name(step)


# ----- loading ---------------------------------------------------------------------------------
def latest_sharded(root: str | Path) -> Path | None:
    """The newest committed checkpoint in ``root``: the one LATEST names, or (LATEST
    missing or naming a removed folder, after a kill inside a commit) the highest
    ``step-N`` holding a manifest; None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / MANIFEST).is_file():
            return named
    committed = sorted((p for p in root.glob("step-*") if _STEP_DIR.fullmatch(p.name) and (p / MANIFEST).is_file()),
                       key=lambda p: int(p.name[5:])) if root.is_dir() else []
    if committed and pointer.is_file():
        log.warning("saeengine: %s names no committed checkpoint; using the newest one, %s", pointer, committed[-1])
    return committed[-1] if committed else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the manifest was edited or written by another tool: resume from "
                           "another checkpoint, or start the run again")


def _check_fields(path: Path, data: dict) -> None:
    if data.get("format") != FORMAT:
        raise _bad(path, f"field 'format' is {data.get('format')!r}, expected {FORMAT!r} (not a sharded checkpoint: "
                         "a single-file SAE loads with SAE.load)")
    version = data.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version}; this saeengine reads up to {FORMAT_VERSION}: "
                              "upgrade saeengine to load it")
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise _bad(path, f"fields {missing} are missing")
    for name, kind in _FIELDS.items():
        value = data[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _bad(path, f"field {name!r} is {type(value).__name__}, expected {kind.__name__}")
    for i, rec in enumerate(data["files"]):
        if not isinstance(rec, dict) or any(not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)
                                            for k, t in _FILE_FIELDS.items()):
            raise _bad(path, f"files[{i}] is not {{{', '.join(_FILE_FIELDS)}}}")
        if "/" in rec["file"] or rec["file"].startswith("."):
            raise _bad(path, f"files[{i}] names {rec['file']!r}, not a file of this folder")
    mesh = data["mesh"]
    if set(mesh) != {"data", "latent"} or not all(_is_int(v) and v >= 1 for v in mesh.values()) \
            or mesh["data"] * mesh["latent"] != data["world_size"]:
        raise _bad(path, f"field 'mesh' is {mesh}, not {{data, latent}} sizes >= 1 whose product is the world size "
                         f"{data['world_size']}")
    rep = data["replicated"]
    if rep.get("file") != REPLICATED_FILE or not _is_int(rep.get("bytes")) or not isinstance(rep.get("sha256"), str):
        raise _bad(path, "field 'replicated' is not {file, bytes, sha256, tensors}")


def _differing(saved: dict, mine: dict) -> str:
    names = sorted(set(saved) | set(mine), key=str)
    parts = [f"{n}={mine.get(n)!r} here, {saved.get(n)!r} in the checkpoint" for n in names
             if saved.get(n) != mine.get(n)]
    return "; ".join(parts[:6]) + (f"; and {len(parts) - 6} more" if len(parts) > 6 else "") or "(equal once sorted)"


def read_manifest(step_dir: str | Path, *, run_id: str | None = None, config: dict | None = None) -> dict:
    """manifest.json of a committed checkpoint, verified (fields, its config's hash, the
    files tiling [0, F)); with ``run_id`` / ``config``, refused unless it is that run's
    checkpoint of that config (CheckpointError naming the field and the fix)."""
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    data = read_json_object(path, f"a sharded checkpoint folder holds {MANIFEST}; {step_dir} has none (a save "
                                  "killed before its commit leaves only a hidden .step-N.tmp folder): resume from "
                                  "the folder LATEST names")
    _check_fields(path, data)
    if config_sha256(data["config"]) != data["config_sha256"]:
        raise _bad(path, "field 'config' does not match its recorded SHA-256 'config_sha256'")
    _check_tiling(path, data["files"], data["d_sae"], data["mesh"].get("latent"))
    if run_id is not None and data["run_id"] != run_id:
        raise CheckpointError(f"{path} belongs to run {data['run_id']} but this run is {run_id}; point the run at "
                              "its own folder (or another out_dir), or start over (resume=False) to replace it")
    if config is not None:
        mine = json.loads(json.dumps(config))
        if config_sha256(mine) != data["config_sha256"]:
            raise CheckpointError(f"{path} was saved with another config: {_differing(data['config'], mine)}; "
                                  "resume with the checkpoint's settings, or start a new run")
    return data


def _verify_file(step_dir: Path, rec: dict) -> Path:
    path = step_dir / rec["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {step_dir / MANIFEST} lists it (latent slice [{rec.get('lo')}, "
                              f"{rec.get('hi')}) written by rank {rec.get('rank', 0)}). Copy it from the machine that "
                              "wrote it (each rank must write to a shared filesystem), or resume from an earlier "
                              "checkpoint")
    size = path.stat().st_size
    if size != rec["bytes"]:
        raise CheckpointError(f"{path}: truncated or replaced: {size} bytes, the manifest records {rec['bytes']}; "
                              "restore it from a backup, or resume from an earlier checkpoint")
    actual = sha256(path)
    if actual != rec["sha256"]:
        raise CheckpointError(f"{path}: corrupted: checksum mismatch (sha256 {actual[:16]}..., the manifest records "
                              f"{rec['sha256'][:16]}...); restore it from a backup, or resume from an earlier "
                              "checkpoint")
    return path


def _empty(spec: dict) -> torch.Tensor:
    return torch.empty([0, *spec["shape"][1:]], dtype=getattr(torch, spec["dtype"]))


def load_shard(step_dir: str | Path, lo: int, hi: int, *, run_id: str | None = None, config: dict | None = None,
               verify: bool = True, weights_only: bool = False) -> TrainingShard:
    """Latent slice [lo, hi) of a checkpoint, from whichever of its files hold those rows
    (any 0 <= lo <= hi <= F: the checkpoint's own mesh does not matter). ``verify``
    checks the size and SHA-256 of every file read (each is hashed whole).
    ``weights_only``: only the SAE's tensors ("sae.*"), not the optimizer state (an
    export reads a third of the bytes into memory)."""
    step_dir = Path(step_dir)
    data = read_manifest(step_dir, run_id=run_id, config=config)
    F = data["d_sae"]
    if not (_is_int(lo) and _is_int(hi) and 0 <= lo <= hi <= F):
        raise ConfigError(f"slice [{lo}, {hi}) is not inside [0, {F}) (the checkpoint's F); compute it with "
                          "saeengine.distributed.mesh.latent_slice(F, latent_rank, latent_size)")
    files = sorted(data["files"], key=lambda r: r["lo"])
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in files[0]["tensors"]
                                             if not weights_only or name.startswith("sae.")}
    for rec in files:
        a, b = max(lo, rec["lo"]), min(hi, rec["hi"])
        if set(rec["tensors"]) != set(files[0]["tensors"]):
            raise _bad(step_dir / MANIFEST, f"{rec['file']} holds tensors {sorted(rec['tensors'])}, "
                                            f"{files[0]['file']} holds {sorted(files[0]['tensors'])}")
        if a >= b:
            continue
        path = _verify_file(step_dir, rec) if verify else step_dir / rec["file"]
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in parts:
                    parts[name].append(fh.get_slice(name)[a - rec["lo"]:b - rec["lo"]])
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: unreadable ({err}); the file is truncated or corrupted: restore it, or "
                                  "resume from an earlier checkpoint") from err
    rows = {name: torch.cat(ts) if ts else _empty(files[0]["tensors"][name]) for name, ts in parts.items()}
    rep_path = _verify_file(step_dir, data["replicated"]) if verify else step_dir / REPLICATED_FILE
    try:
        with safe_open(str(rep_path), framework="pt") as fh:
            replicated = {name: fh.get_tensor(name) for name in fh.keys()
                          if not weights_only or name.startswith("sae.")}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{rep_path}: unreadable ({err}); restore it, or resume from an earlier "
                              "checkpoint") from err
    meta = {"step": data["step"], "run_id": data["run_id"], "mesh": data["mesh"], "extra": data["extra"],
            "config": data["config"]}
    return TrainingShard(lo, hi, rows, replicated, data["tree"], meta)


def load_full(step_dir: str | Path, **kwargs) -> TrainingShard:
    """Every latent [0, F) of a checkpoint (:func:`load_shard`'s keywords)."""
    data = read_manifest(step_dir)
    return load_shard(step_dir, 0, data["d_sae"], **kwargs)


def load_sharded(step_dir: str | Path, mesh, **kwargs) -> TrainingShard:
    """This rank's latent slice for ``mesh`` (a Mesh: latent_rank, latent_size, data_size,
    world_size), which may differ from the mesh the checkpoint was saved at."""
    from .mesh import latent_slice

    check_world((mesh.data_size, mesh.latent_size), mesh.world_size)
    data = read_manifest(step_dir, run_id=kwargs.get("run_id"), config=kwargs.get("config"))
    lo, hi = latent_slice(data["d_sae"], mesh.latent_rank, mesh.latent_size)
    return load_shard(step_dir, lo, hi, **kwargs)


def export_sae(step_dir: str | Path, out_dir: str | Path, *, run_id: str | None = None,
               config: dict | None = None) -> Path:
    """Gather every slice of a sharded checkpoint into one SAE and write it in saeengine's
    single-file format (``SAE.load(out_dir)`` reads it); returns ``out_dir``."""
    shard = load_full(step_dir, run_id=run_id, config=config, weights_only=True)
    sae = sae_from_shard(shard)
    return sae.save(out_dir, provenance={"exported_from": str(step_dir), "run_id": shard.meta["run_id"],
                                         "step": shard.meta["step"], "mesh": shard.meta["mesh"]})
