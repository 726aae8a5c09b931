"""``saeengine.train``: train one SAE, or a sweep of them on the same batches."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..sae import SAE
from .checkpoints import latest_checkpoint, restore_checkpoint, save_checkpoint
from .config import TrainConfig, check_sweep
from .data import batch_source, d_in_of, init_sample
from .init import init_from_sample
from .metrics import MetricsLog
from .step import TrainStep
from ..checkpoint import CheckpointError


@dataclass
class _Run:
    """One SAE of the run with its training step (optimizer and dead-latent counters)."""

    cfg: TrainConfig
    sae: SAE
    train_step: TrainStep
    directory: Path
    log: MetricsLog | None = None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _make_run(cfg: TrainConfig, d_in: int, device: torch.device, out_dir: Path) -> _Run:
    sae = SAE(cfg.sae_config(d_in), device=device, seed=cfg.seed)
    return _Run(cfg, sae, TrainStep(sae, cfg), out_dir / cfg.run_name)


@torch.no_grad()
def _start_from_saved(sae: SAE, directory: str) -> None:
    """Copy a saved SAE's weights and statistics into ``sae`` (TrainConfig.init_from)."""
    saved = SAE.load(directory, device=sae.W_enc.device)
    mine, theirs = sae.cfg, saved.cfg
    for field in ("d_in", "d_sae", "architecture"):
        if getattr(mine, field) != getattr(theirs, field):
            raise CheckpointError(f"TrainConfig.init_from={directory!r}: the saved SAE has {field}="
                                  f"{getattr(theirs, field)!r} but this run has {getattr(mine, field)!r}; "
                                  f"set {field} to match, or start fresh (init_from='')")
    sae.load_state_dict({name: value.to(sae.state_dict()[name].dtype) for name, value in saved.state_dict().items()})


def _read_metrics(runs: list[_Run], metrics: list[dict]) -> list[dict]:
    """Each run's step metrics and dead fraction as Python numbers, read in one host sync.
    The training steps themselves never sync, so this read is also where the host waits
    for the GPU: the tokens/s interval must end after it, not before."""
    names = [name for name, value in metrics[0].items() if isinstance(value, torch.Tensor)]
    table = torch.stack([torch.stack([m[name].float() for name in names] + [run.train_step.dead.float().mean()])
                         for run, m in zip(runs, metrics)]).tolist()
    return [{**m, **dict(zip(names, row)), "dead": row[-1]} for m, row in zip(metrics, table)]


def train(data, config: TrainConfig | list[TrainConfig]) -> SAE | list[SAE]:
    """Train an SAE (or a sweep of SAEs, one per config) and return it (them).

    Args:
        data: an activation store directory (or ActivationStore), or a tensor [tokens, d_in].
        config: a TrainConfig, or a list of them: a sweep. Every SAE of a sweep sees the
            same batches, read once per step. The configs must share the data settings
            (total_tokens, batch_size, seed, device, out_dir, checkpointing).
    Returns:
        The trained SAE in eval mode (a list for a list of configs). Each is also saved to
        out_dir/<name>/, with metrics.jsonl beside it. Resumable checkpoints go to
        out_dir/checkpoints/. With ``resume`` (the default) a call finds the latest one and
        continues from it, so that a killed run ends bit-for-bit where an uninterrupted
        run would (same device and backend). Resuming compares only the settings that
        change the math: logging, progress, checkpoint cadence, device and backend may
        change, total_tokens may grow (the schedules follow the new total:
        TrainConfig.lr_factor), and any other change, or other data, raises
        CheckpointError naming the field and both values
        (saeengine.trainer.checkpoints).

    Example::

        sae = saeengine.train("acts/clip-b16-layer8", saeengine.TrainConfig(d_sae=2**16, k=32))
    """
    configs = [config] if isinstance(config, TrainConfig) else list(config)
    check_sweep(configs)
    first = configs[0]
    device = _device(first.device)
    out_dir = Path(first.out_dir)
    source = batch_source(data, first.batch_size, first.seed, device)
    runs = [_make_run(cfg, d_in_of(source), device, out_dir) for cfg in configs]
    checkpoint = latest_checkpoint(out_dir) if first.resume else None
    if checkpoint is not None:
        start = restore_checkpoint(checkpoint, runs, source)
    else:
        start = 0
        fresh = [run for run in runs if not run.cfg.init_from]
        sample = init_sample(source, first.seed) if fresh else None
        for run in runs:
            if run.cfg.init_from:
                _start_from_saved(run.sae, run.cfg.init_from)
            else:
                init_from_sample(run.sae, sample, run.cfg.b_dec_init)
    for run in runs:
        run.directory.mkdir(parents=True, exist_ok=True)
        run.log = MetricsLog(run.directory, run.cfg, start)
        run.sae.train()

    steps, batch = first.steps, first.batch_size
    every = first.checkpoint_every_tokens
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not first.progress, desc="train",
               unit="step", dynamic_ncols=True)
    batches = iter(source)
    tick, tick_step = time.perf_counter(), start
    for step in bar:
        x = next(batches)
        metrics = [run.train_step(x) for run in runs]
        if step % first.log_every == 0 or step == steps - 1:
            read = _read_metrics(runs, metrics)  # the clock stops once the GPU has done this step
            now = time.perf_counter()
            tokens_per_s = (step + 1 - tick_step) * batch / max(now - tick, 1e-9)
            tick, tick_step = now, step + 1
            for run, m in zip(runs, read):
                run.log.write({"step": step, "tokens": (step + 1) * batch, **m, "tokens_per_s": tokens_per_s})
            bar.set_postfix(tok_s=f"{tokens_per_s:.3g}", fvu=f"{read[0]['fvu']:.4f}", l0=f"{read[0]['l0']:.1f}",
                            dead=f"{read[0]['dead']:.1%}")
        if every and (step + 1) * batch // every > step * batch // every:
            save_checkpoint(out_dir, step + 1, runs, source)
    bar.close()
    if start < steps or checkpoint is None:
        save_checkpoint(out_dir, steps, runs, source)
    for run in runs:
        run.log.close()
        run.sae.eval()
        run.sae.save(run.directory, provenance={"train_config": run.cfg.to_dict(), "steps": steps,
                                                "data": source.identity()})
    saes = [run.sae for run in runs]
    return saes[0] if isinstance(config, TrainConfig) else saes
