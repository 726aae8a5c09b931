"""``train_sharded``: train one TopK SAE over a mesh of processes (data axis x latent axis),
with the single-process trainer's data, initialization, schedules, metrics, checkpoint
cadence and resume rules, and sharded checkpoints that resume at any mesh.

Every rank calls :func:`train_sharded` with the same arguments. What each part reuses:

- data: the trainer's batch source at the GLOBAL batch size
  (:func:`saeengine.trainer.data.batch_source`), split by
  :func:`saeengine.distributed.data.shard_batches`: data rank r reads the r-th part of
  every global batch (the single-process batches, in the same order);
- start: rank 0 alone takes the run folder's lock for the whole run, clears what killed
  saves left, and decides between resuming and starting fresh (the rules of
  :mod:`saeengine.trainer.rundir` and :func:`saeengine.trainer.checkpoints.check_resumable`:
  logging, cadence, device and the mesh may change, total_tokens may grow, any other
  field or other data is refused naming it); its decision, the run id and any error are
  broadcast, so every rank raises the same error instead of waiting at a collective;
- a fresh SAE: :class:`LatentShardedSAE` from ``cfg.seed`` (the same full matrix
  whatever the mesh), the normalization and b_dec fitted on the trainer's init sample
  (:func:`init_sample`, :func:`init_from_sample`; the same global sample on every rank,
  and rank 0's result broadcast so that the replicated tensors agree bit for bit); or
  ``cfg.init_from``'s saved SAE, sliced;
- the step: :class:`saeengine.distributed.step.ShardedTrainStep` (the sharded twin of
  TrainStep; its metrics are global-batch values, identical on every rank);
- checkpoints: every ``checkpoint_every_tokens`` (the trainer's rule, ``checkpoint_due``)
  and at the end, with :func:`saeengine.distributed.checkpoint.save_sharded` into
  ``out_dir/checkpoints/`` (one file per latent slice + manifest; the manifest's config
  is {"train_config": TrainConfig.to_dict(), "data": the data identity}, its extra the
  global loader position); ``out_dir/checkpoints/RUN_ID`` pins the run id, so a
  manifest of another run put there is refused;
- the result: rank 0 gathers the final checkpoint into one SAE and saves it to
  ``out_dir/<run_name>/`` with the single-process trainer's provenance (plus run_id and
  mesh), beside metrics.jsonl (rank 0 writes the metric lines, as saeengine.train does).

Returns the trained SAE (on the CPU, in eval mode: the whole dictionary need not fit one
device) on rank 0, None on the other ranks; every rank returns only after the export is
written.
"""

from __future__ import annotations

import contextlib
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._atomic import atomic_write_bytes
from .._lock import exclusive_lock
from ..errors import CheckpointError, ConfigError
from ..sae import SAE
from ..trainer.checkpoints import CHECKPOINTS, LATEST as SINGLE_LATEST, STATE, check_resumable, data_mismatch
from ..trainer.config import TrainConfig
from ..trainer.data import batch_source, init_sample
from ..trainer.finite import NonFiniteWatch
from ..trainer.init import init_from_sample
from ..trainer.loop import check_init_from, checkpoint_due, run_provenance
from ..trainer.metrics import MetricsLog
from ..trainer.rundir import prepare_run_folder
from . import checkpoint as ck
from . import comm
from .data import shard_batches
from .latent_shard import LatentShardedSAE
from .launch import distributed
from .mesh import Mesh, MeshSpec, check_same_config

RUN_ID_FILE = "RUN_ID"
MANIFEST_CONFIG_KEYS = ("train_config", "data")


@dataclass
class _Folder:
    """What trainer.rundir reads of one SAE of a run (its settings and its folder)."""

    cfg: TrainConfig
    directory: Path


@dataclass
class _Slice:
    """What NonFiniteWatch.check_before_save reads of a run: the module to check."""

    sae: LatentShardedSAE


def manifest_config(cfg: TrainConfig, source) -> dict:
    """The config a sharded checkpoint of this run records: the TrainConfig and the data."""
    return {"train_config": cfg.to_dict(), "data": source.identity()}


def _agree(mesh: Mesh, error: BaseException | None, what: str) -> None:
    """comm.agree over the world (nothing to tell in a one-process mesh): another rank's
    failure raises CheckpointError here."""
    comm.agree(error, what, raise_as=CheckpointError, local=not mesh.distributed)


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (to be broadcast), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable exception travels as its text
        return RuntimeError(f"{type(error).__name__}: {error}")


def _single_process_checkpoint(root: Path) -> Path | None:
    """The single-process trainer's latest checkpoint in ``root`` (state.pt, no manifest), if any."""
    pointer = root / SINGLE_LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE).is_file() and not (path / ck.MANIFEST).is_file() else None


def check_checkpoint(path: Path, cfg: TrainConfig, source, run_id: str | None) -> dict:
    """The manifest of sharded checkpoint ``path`` if this run continues it: the run id
    (when pinned), the data (DataMismatchError naming both) and the settings (the
    single-process resume rules), else CheckpointError naming the field and the fix."""
    manifest = ck.read_manifest(path, run_id=run_id)
    saved = manifest["config"]
    if sorted(saved) != sorted(MANIFEST_CONFIG_KEYS):
        raise CheckpointError(f"{path / ck.MANIFEST}: its config has the keys {sorted(saved)}, not "
                              f"{list(MANIFEST_CONFIG_KEYS)}: it was not written by saeengine's sharded trainer; "
                              "resume it with the tool that wrote it, or use another out_dir")
    if saved["data"] != source.identity():
        raise data_mismatch(path, saved["data"], source.identity())
    try:
        known, _ = TrainConfig.known_fields(saved["train_config"])
    except ValueError as err:
        raise CheckpointError(f"{path / ck.MANIFEST}: {err}") from err
    check_resumable(path, known, cfg, manifest["step"])
    return manifest


def _decide_start(cfg: TrainConfig, source, out_dir: Path) -> dict:
    """Rank 0, holding the run folder's lock: {"checkpoint": path or None, "run_id"}."""
    root = out_dir / CHECKPOINTS
    ck.remove_incomplete(root)
    latest = ck.latest_sharded(root) if cfg.resume else None
    if latest is None:
        single = _single_process_checkpoint(root) if cfg.resume else None
        if single is not None:
            raise CheckpointError(f"{out_dir} holds a checkpoint of the single-process trainer ({single}); resume it "
                                  "with saeengine train without --mesh (saeengine.train), use another out_dir for "
                                  "the sharded run, or start over with --no-resume (resume=False)")
        # resume=False: start over (removing the earlier run, with a warning); resume=True: a
        # finished SAE in the run's folder must be of this data and settings.
        prepare_run_folder(out_dir, [_Folder(cfg, out_dir / cfg.run_name)], source, cfg.resume)
        run_id = ck.new_run_id()
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / RUN_ID_FILE, run_id.encode())
        return {"checkpoint": None, "run_id": run_id}
    pinned = (root / RUN_ID_FILE).read_text().strip() if (root / RUN_ID_FILE).is_file() else None
    manifest = check_checkpoint(latest, cfg, source, pinned)
    return {"checkpoint": str(latest), "run_id": manifest["run_id"]}


@torch.no_grad()
def _init_fresh(module: LatentShardedSAE, cfg: TrainConfig, source, mesh: Mesh) -> LatentShardedSAE:
    """The start of a fresh run on this rank: weights from cfg.seed (or cfg.init_from),
    the normalization and b_dec from the init sample; rank 0's replicated tensors sent to all."""
    if cfg.init_from:
        saved = SAE.load(cfg.init_from)
        check_init_from(saved.cfg, module.cfg, cfg.init_from)
        module.load_state_dict(LatentShardedSAE.from_sae(saved, mesh, device=module.b_dec.device).state_dict())
    else:
        init_from_sample(module, init_sample(source, cfg.seed), cfg.b_dec_init)
    if mesh.distributed:  # the replicated tensors must agree bit for bit on every rank
        flat = torch.cat([module.b_dec.float(), module.norm_mean, module.norm_scale.reshape(1)])
        comm.broadcast(flat, None, src=0, axis="world", what="init_replicated")
        d = module.cfg.d_in
        module.b_dec.copy_(flat[:d].to(module.b_dec.dtype))
        module.norm_mean.copy_(flat[d:2 * d])
        module.norm_scale.copy_(flat[2 * d])
    return module


def _read(metrics: dict, dead: torch.Tensor) -> dict:
    """The step's metrics as Python numbers (one host read), with the dead fraction."""
    names = [name for name, value in metrics.items() if isinstance(value, torch.Tensor)]
    values = torch.stack([metrics[name].float() for name in names] + [dead.float()]).double().tolist()
    return {**metrics, **dict(zip(names, values)), "dead": values[-1]}


class _ShardedRun:
    """One rank's part of a sharded run (state shared by the loop, saving and export)."""

    def __init__(self, data, cfg: TrainConfig, mesh: Mesh):
        from .step import ShardedTrainStep

        self.cfg, self.mesh, self.device = cfg, mesh, mesh.device
        self.out_dir = Path(cfg.out_dir)
        self.root = self.out_dir / CHECKPOINTS
        # The settings first: a field set differently on one rank is then named on every
        # rank, instead of failing a local check below on that rank alone.
        check_same_config(mesh, {**cfg.to_dict(), "mesh": str(mesh.spec)}, "training config")
        error = None
        try:
            ShardedTrainStep.check_config(cfg)
            if cfg.batch_size // mesh.data_size < 2:
                raise ConfigError(f"TrainConfig.batch_size={cfg.batch_size} gives each of the {mesh.data_size} data "
                                  f"ranks {cfg.batch_size // mesh.data_size} token(s) per step; the FVU needs at "
                                  f"least 2: use batch_size >= {2 * mesh.data_size} or a smaller data axis")
            self.global_source = batch_source(data, cfg.batch_size, cfg.seed, self.device)
            self.source = shard_batches(self.global_source, mesh.data_rank, mesh.data_size)
            self.module = LatentShardedSAE(cfg.sae_config(self.source.d_in), mesh, device=self.device,
                                           seed=cfg.seed)
            self.step = ShardedTrainStep(self.module, cfg, mesh)
        except Exception as err:  # noqa: BLE001 - told to every rank
            error = err
        comm.agree(error, "setting up the run", local=not mesh.distributed)  # the failing rank's error class on all
        check_same_config(mesh, {"data": self.source.identity()}, "training data")
        self.config = manifest_config(cfg, self.source)

    # ----- start ------------------------------------------------------------------------------
    def start(self, stack: contextlib.ExitStack) -> int | None:
        """Resume (returns the checkpoint's step) or initialize (returns None)."""
        decision = None
        if self.mesh.rank == 0:
            try:
                stack.enter_context(exclusive_lock(self.out_dir, "training run folder"))
                decision = _decide_start(self.cfg, self.source, self.out_dir)
            except Exception as err:  # noqa: BLE001 - told to every rank below
                decision = {"error": _portable(err)}
        if self.mesh.distributed:
            decision = comm.broadcast_object(decision, None, src=0, what="start")
        if "error" in decision:
            raise decision["error"]
        self.run_id = decision["run_id"]
        if decision["checkpoint"] is None:
            error = None
            try:
                _init_fresh(self.module, self.cfg, self.source, self.mesh)
            except Exception as err:  # noqa: BLE001
                error = err
            _agree(self.mesh, error, "initializing the SAE")
            return None
        path, error, step = Path(decision["checkpoint"]), None, None
        try:  # each rank reads (and verifies) only the files that hold its slice
            shard = ck.load_sharded(path, self.mesh, run_id=self.run_id)
            counters = ck.apply_to_training(shard, self.module, self.step.optimizer, self.step.last_fired)
            self.step.load_state_dict({"optimizer": self.step.optimizer.state_dict(),
                                       "last_fired": self.step.last_fired,
                                       "tokens_seen": counters["tokens_seen"], "step": counters["step"]})
            self.source.load_state_dict(shard.meta["extra"]["loader"])
            step = int(counters["step"])
        except Exception as err:  # noqa: BLE001
            error = err
        _agree(self.mesh, error, f"loading the checkpoint {path}")
        return step

    # ----- checkpoints --------------------------------------------------------------------------
    def save(self, step: int, watch: NonFiniteWatch) -> Path:
        """The sharded checkpoint after ``step`` steps (every rank)."""
        error = None
        try:  # losses are global (the same verdict everywhere), parameters this slice's
            watch.check_before_save([_Slice(self.module)], step, self.source, self.cfg)
        except Exception as err:  # noqa: BLE001
            error = err
        _agree(self.mesh, error, f"checking the SAE before the checkpoint of step {step}")
        shard = ck.shard_from_training(self.module, self.step.optimizer, self.step.last_fired, lo=self.module.lo,
                                       hi=self.module.hi, counters={"tokens_seen": self.step.tokens_seen,
                                                                    "step": self.step.steps_done})
        extra = {"loader": self.source.state_dict(), "run_name": self.cfg.run_name}
        if self.mesh.distributed:
            return ck.save_sharded(self.root, step, shard, self.mesh, run_id=self.run_id, config=self.config,
                                   extra=extra)
        return ck.save_sharded_local(self.root, step, [shard], run_id=self.run_id, config=self.config, mesh=(1, 1),
                                     extra=extra)

    def export(self, steps: int) -> SAE | None:
        """Rank 0: the final checkpoint gathered into one SAE, saved to out_dir/<run_name>/."""
        sae, error = None, None
        if self.mesh.rank == 0:
            try:
                latest = ck.latest_sharded(self.root)
                sae = ck.sae_from_shard(ck.load_full(latest, run_id=self.run_id, weights_only=True)).eval()
                provenance = {**run_provenance(self.cfg, steps, self.global_source), "run_id": self.run_id,
                              "mesh": str(self.mesh.spec), "exported_from": str(latest)}
                sae.save(self.out_dir / self.cfg.run_name, provenance=provenance)
            except Exception as err:  # noqa: BLE001
                error = err
        _agree(self.mesh, error, "exporting the trained SAE")
        return sae

    # ----- the loop -----------------------------------------------------------------------------
    def run(self) -> SAE | None:
        cfg, mesh = self.cfg, self.mesh
        with contextlib.ExitStack() as stack:
            resumed_at = self.start(stack)
            start, steps, batch = resumed_at or 0, cfg.steps, cfg.batch_size
            log, error = None, None
            if mesh.rank == 0:  # the metric sinks (a missing tensorboard or wandb fails here, on every rank)
                try:
                    (self.out_dir / cfg.run_name).mkdir(parents=True, exist_ok=True)
                    log = stack.enter_context(contextlib.closing(MetricsLog(self.out_dir / cfg.run_name, cfg,
                                                                            start)))
                except Exception as err:  # noqa: BLE001
                    error = err
            _agree(mesh, error, "opening the metric sinks")
            self.module.train()
            watch = NonFiniteWatch([cfg.run_name], self.device, start)
            bar = stack.enter_context(contextlib.closing(
                tqdm(range(start, steps), initial=start, total=steps, disable=not (cfg.progress and mesh.rank == 0),
                     desc=f"train {mesh.spec}", unit="step", dynamic_ncols=True)))
            batches = iter(self.source)
            stack.callback(getattr(batches, "close", lambda: None))  # stops the store loader's thread now
            tick, tick_step, saved_at = time.perf_counter(), start, None
            for step in bar:
                metrics = self.step(next(batches))
                watch.update(step, [metrics])
                if watch.every_step:
                    watch.check(self.source, cfg)
                if step % cfg.log_every == 0 or step == steps - 1:
                    read = _read(metrics, self.step.dead_fraction())  # every rank: a collective
                    watch.check(self.source, cfg)
                    now = time.perf_counter()
                    tokens_per_s = (step + 1 - tick_step) * batch / max(now - tick, 1e-9)
                    tick, tick_step = now, step + 1
                    if log is not None:
                        log.write({"step": step, "tokens": (step + 1) * batch, **read, "tokens_per_s": tokens_per_s})
                        bar.set_postfix(tok_s=f"{tokens_per_s:.3g}", fvu=f"{read['fvu']:.4f}",
                                        l0=f"{read['l0']:.1f}", dead=f"{read['dead']:.1%}")
                if checkpoint_due(step, batch, cfg.checkpoint_every_tokens):
                    saved_at = step + 1
                    self.save(saved_at, watch)
            bar.close()
            if (start < steps or resumed_at is None) and saved_at != steps:
                self.save(steps, watch)
            return self.export(steps)


def train_sharded(data, config: TrainConfig, mesh: Mesh | MeshSpec | str = "data=1,latent=1") -> SAE | None:
    """Train one TopK SAE over a mesh of processes; every rank calls this (module docstring).

    Args:
        data: an activation store directory (or ActivationStore), or a floating-point
            tensor [tokens, d_in] (the same on every rank).
        config: the TrainConfig (``batch_size`` is the GLOBAL batch: it must divide by the
            data axis; what :class:`ShardedTrainStep` does not support sharded raises
            ConfigError naming the field).
        mesh: a :class:`Mesh` (from ``init_mesh``, in an initialized process group), or
            its shape "data=D,latent=L": then the process group is initialized from
            torchrun's environment (gloo on CPUs, NCCL on GPUs) and destroyed at the end
            (:func:`saeengine.distributed.launch.distributed`). A world size that does not
            match the mesh raises InputError naming both and the fix.
    Returns:
        On rank 0 the trained SAE (on the CPU, eval mode), also saved to
        out_dir/<run_name>/ beside metrics.jsonl; None on the other ranks.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train_sharded trains one SAE: pass a TrainConfig, got {type(config).__name__} "
                          "(a sweep: one SAE per rank, saeengine.distributed.per_rank)")
    if isinstance(mesh, Mesh):
        return _ShardedRun(data, config, mesh).run()
    with distributed(mesh, config.device) as m:
        return _ShardedRun(data, config, m).run()
