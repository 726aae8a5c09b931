"""``saeengine.train``: train one SAE, or a sweep of them on the same batches."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._lock import exclusive_lock
from ..errors import CheckpointError, ConfigError
from ..sae import SAE
from .checkpoints import restore_checkpoint, save_checkpoint
from .config import TrainConfig, check_sweep
from .data import batch_source, init_sample
from .finite import NonFiniteWatch
from .init import init_from_sample
from .metrics import MetricsLog
from .rundir import prepare_run_folder
from .step import TrainStep


@dataclass
class _Run:
    """One SAE of the run with its training step (optimizer and dead-latent counters)."""

    cfg: TrainConfig
    sae: SAE
    train_step: TrainStep
    directory: Path
    log: MetricsLog | None = None


def resolve_device(name: str) -> torch.device:
    """TrainConfig.device -> the device; ConfigError for a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"TrainConfig.device={name!r} is invalid: this machine has {count} CUDA device(s)"
                              f"{'' if count else ' (torch.cuda.is_available() is False)'}; use device='cpu', "
                              "'auto' or an index below the device count")
    return device


def _configs(config) -> list[TrainConfig]:
    if isinstance(config, TrainConfig):
        return [config]
    if isinstance(config, (list, tuple)):
        return list(config)
    raise TypeError(f"train() takes a TrainConfig or a list of them (a sweep), got {type(config).__name__}")


def initial_sae(cfg: TrainConfig, d_in: int, device: torch.device | str | None = None) -> SAE:
    """The SAE a fresh run of ``cfg`` on d_in-wide data starts from, before the sample fits
    its normalization and b_dec: its weights depend on cfg.seed alone. (What the planted-
    dictionary checks measure before training, to show that training found the atoms.)"""
    return SAE(cfg.sae_config(d_in), device=device, seed=cfg.seed)


def _make_run(cfg: TrainConfig, d_in: int, device: torch.device, out_dir: Path) -> _Run:
    sae = initial_sae(cfg, d_in, device)
    return _Run(cfg, sae, TrainStep(sae, cfg), out_dir / cfg.run_name)


def check_init_from(saved, mine, directory: str) -> None:
    """CheckpointError unless the saved SAEConfig ``saved`` (TrainConfig.init_from=directory)
    fits this run's SAEConfig ``mine``: the same d_in, d_sae and architecture."""
    for field in ("d_in", "d_sae", "architecture"):
        if getattr(mine, field) != getattr(saved, field):
            raise CheckpointError(f"TrainConfig.init_from={directory!r}: the saved SAE has {field}="
                                  f"{getattr(saved, field)!r} but this run has {getattr(mine, field)!r}; "
                                  f"set {field} to match, or start fresh (init_from='')")


@torch.no_grad()
def _start_from_saved(sae: SAE, directory: str) -> None:
    """Copy a saved SAE's weights and statistics into ``sae`` (TrainConfig.init_from)."""
    saved = SAE.load(directory, device=sae.W_enc.device)
    check_init_from(saved.cfg, sae.cfg, directory)
    sae.load_state_dict({name: value.to(sae.state_dict()[name].dtype) for name, value in saved.state_dict().items()})


def checkpoint_due(step: int, batch_size: int, every_tokens: int) -> bool:
    """Whether a checkpoint follows step ``step`` (0-based): each time the tokens trained
    cross a multiple of ``every_tokens`` (0: never, only at the end)."""
    return bool(every_tokens) and (step + 1) * batch_size // every_tokens > step * batch_size // every_tokens


def run_provenance(cfg: TrainConfig, steps: int, source) -> dict:
    """What a trained SAE's config.json records of its run (saeengine.trainer.rundir checks
    "data", "train_config" and "steps" when a run is started again in its folder)."""
    provenance = {"train_config": cfg.to_dict(), "steps": steps, "data": source.identity()}
    store = getattr(source, "store", None)
    if store is not None:  # what saeengine.eval.encode checks another store's layer against
        provenance["store"] = {"dir": str(store.directory), "backbone": store.meta.backbone,
                               "layer": store.meta.layer, "token_kind": store.meta.token_kind}
    return provenance


def _read_metrics(runs: list[_Run], metrics: list[dict], watch: NonFiniteWatch) -> tuple[list[dict], list[int]]:
    """Each run's step metrics and dead fraction as Python numbers, and the watch's first
    bad steps, read in one host sync. The training steps themselves never sync, so this
    read is also where the host waits for the GPU: the tokens/s interval must end after
    it, not before. (float64 holds the fp32 metrics and the step numbers exactly.)"""
    names = [name for name, value in metrics[0].items() if isinstance(value, torch.Tensor)]
    table = torch.stack([torch.stack([m[name].float() for name in names] + [run.train_step.dead.float().mean()]
                                     ).double() for run, m in zip(runs, metrics)])
    table = torch.cat([table, watch.first_bad.double()[:, None]], dim=1).tolist()
    read = [{**m, **dict(zip(names, row)), "dead": row[-2]} for m, row in zip(metrics, table)]
    return read, [int(row[-1]) for row in table]


def _start(runs: list[_Run], source, first: TrainConfig, out_dir: Path) -> int | None:
    """Resume from the run folder's checkpoint (returns its step), or initialize the SAEs
    (returns None)."""
    checkpoint = prepare_run_folder(out_dir, runs, source, first.resume)
    if checkpoint is not None:
        return restore_checkpoint(checkpoint, runs, source)
    fresh = [run for run in runs if not run.cfg.init_from]
    sample = init_sample(source, first.seed) if fresh else None
    for run in runs:
        if run.cfg.init_from:
            _start_from_saved(run.sae, run.cfg.init_from)
        else:
            init_from_sample(run.sae, sample, run.cfg.b_dec_init)
    return None


def _train_locked(source, configs: list[TrainConfig], device: torch.device, out_dir: Path) -> list[SAE]:
    first = configs[0]
    runs = [_make_run(cfg, source.d_in, device, out_dir) for cfg in configs]
    resumed_at = _start(runs, source, first, out_dir)
    start = resumed_at or 0
    for run in runs:
        run.directory.mkdir(parents=True, exist_ok=True)
        run.log = MetricsLog(run.directory, run.cfg, start)
        run.sae.train()
    steps, batch = first.steps, first.batch_size
    every = first.checkpoint_every_tokens
    watch = NonFiniteWatch([run.cfg.run_name for run in runs], device, start)
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not first.progress, desc="train",
               unit="step", dynamic_ncols=True)
    batches = iter(source)
    try:
        tick, tick_step = time.perf_counter(), start
        for step in bar:
            x = next(batches)
            metrics = [run.train_step(x) for run in runs]
            watch.update(step, metrics)
            if watch.every_step:
                watch.check(source, first)
            if step % first.log_every == 0 or step == steps - 1:
                read, bad = _read_metrics(runs, metrics, watch)  # the clock stops once the GPU has done this step
                watch.raise_if_bad(bad, source, first)
                now = time.perf_counter()
                tokens_per_s = (step + 1 - tick_step) * batch / max(now - tick, 1e-9)
                tick, tick_step = now, step + 1
                for run, m in zip(runs, read):
                    run.log.write({"step": step, "tokens": (step + 1) * batch, **m, "tokens_per_s": tokens_per_s})
                bar.set_postfix(tok_s=f"{tokens_per_s:.3g}", fvu=f"{read[0]['fvu']:.4f}", l0=f"{read[0]['l0']:.1f}",
                                dead=f"{read[0]['dead']:.1%}")
            if checkpoint_due(step, batch, every):
                watch.check_before_save(runs, step + 1, source, first)
                save_checkpoint(out_dir, step + 1, runs, source)
        bar.close()
        watch.check_before_save(runs, steps, source, first)
        if start < steps or resumed_at is None:
            save_checkpoint(out_dir, steps, runs, source)
        for run in runs:
            run.sae.eval()
            run.sae.save(run.directory, provenance=run_provenance(run.cfg, steps, source))
    finally:
        bar.close()
        batches.close()  # stops the store loader's thread now, not when collected
        for run in runs:
            run.log.close()
    return [run.sae for run in runs]


def train(data, config: TrainConfig | list[TrainConfig]) -> SAE | list[SAE]:
    """Train an SAE (or a sweep of SAEs, one per config) and return it (them).

    Args:
        data: an activation store directory (or ActivationStore), or a floating-point
            tensor [tokens, d_in].
        config: a TrainConfig, or a list of them: a sweep. Every SAE of a sweep sees the
            same batches, read once per step. The configs must share the data settings
            (total_tokens, batch_size, seed, device, out_dir, checkpointing).
    Returns:
        The trained SAE in eval mode (a list for a list of configs). Each is also saved to
        out_dir/<name>/ (config.json records the TrainConfig, the steps and the data in
        ``provenance``), with metrics.jsonl beside it: one JSON object per log line,
        {"step", "tokens", "fvu", "auxk", "l0", "sparsity", "k", "lr", "dead" (the
        fraction of dead latents), "tokens_per_s"}. The last step (total_tokens //
        batch_size - 1) is always logged, so the last line of a finished run's
        metrics.jsonl holds its final fvu, l0 and dead. Resumable checkpoints go to
        out_dir/checkpoints/.

    Resuming: with ``resume`` (the default) a call finds the latest checkpoint and
    continues from it, so that a killed run ends bit-for-bit where an uninterrupted run
    would (same device and backend). Resuming compares only the settings that change the
    math: logging, progress, checkpoint cadence, device and backend may change,
    total_tokens may grow (the schedules follow the new total: TrainConfig.lr_factor),
    and any other change raises CheckpointError naming the field and both values
    (saeengine.trainer.checkpoints). Other data than the run folder's (a store's
    content hash, a tensor's SHA-256, in a checkpoint or a saved SAE) raises
    DataMismatchError naming both, so a rerun on new data never returns the old SAE. A
    saved SAE in an SAE's folder (with no checkpoint to resume) that cannot be checked,
    its config.json unreadable or without provenance.data, train_config or steps, raises
    CheckpointError naming the folder: resuming never replaces what it cannot verify. A
    checkpoint of an earlier version that records no data identity resumes with a
    UserWarning that its data cannot be verified. With ``resume=False`` the run starts
    over, and an earlier run in out_dir is replaced with a UserWarning: its checkpoints
    and the saved SAEs of this run's names are removed at the start
    (saeengine.trainer.rundir).

    Safety: the run holds an exclusive lock on out_dir (out_dir/.lock) for its whole
    duration; a second train() on the same out_dir raises LockedError at once, naming
    the holder, and touches nothing. Data too small for one batch raises ConfigError
    before any work. A full disk raises DiskFullError and leaves no half-written
    checkpoint: the one before stays the latest, and a rerun after freeing space resumes
    from it.

    Non-finite values: a tensor is checked once up front, and the store rows of the
    initialization sample as they are read (NonFiniteError naming the first bad rows). A
    NaN or inf loss stops the run with NonFiniteError naming the step, the batch's rows
    (for a store also their images and positions, and which rows hold NaN or inf) and
    the likely cause; the exception carries ``step``, ``rows`` and ``saes``. The check
    costs no host sync per step on a GPU: the first bad step is kept on the device and
    read at each log line, before each checkpoint and at the end (on the CPU it is read
    after every step). Before anything is saved every SAE's parameters are checked, so
    no checkpoint or SAE with a NaN is ever written.

    Example::

        sae = saeengine.train("acts/clip-b16-layer8", saeengine.TrainConfig(d_sae=2**16, k=32))
    """
    configs = _configs(config)
    check_sweep(configs)
    first = configs[0]
    device = resolve_device(first.device)
    source = batch_source(data, first.batch_size, first.seed, device)
    out_dir = Path(first.out_dir)
    with exclusive_lock(out_dir, "training run folder"):
        saes = _train_locked(source, configs, device, out_dir)
    return saes[0] if isinstance(config, TrainConfig) else saes
