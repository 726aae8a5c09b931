"""``saeengine.train``: train one SAE, or a sweep of them on the same batches."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import SAEConfig
from ..sae import SAE
from .checkpoints import latest_checkpoint, restore_checkpoint, save_checkpoint
from .config import TrainConfig, check_sweep
from .data import batch_source, d_in_of, init_sample
from .init import init_from_sample
from .metrics import MetricsLog
from ..checkpoint import CheckpointError
from ..optim import DeferredLatents, RowSparseAdam, dead_latents_later, fired_rows, mark_fired_, resample_dead_latents_


@dataclass
class _Run:
    """One SAE of the run with its optimizer and dead-latent counters."""

    cfg: TrainConfig
    sae: SAE
    opt: torch.optim.Optimizer
    last_fired: torch.Tensor  # [F] int64: tokens seen when each latent last fired
    directory: Path
    tokens_seen: int = 0
    log: MetricsLog | None = None
    next_dead: DeferredLatents | None = None  # the next step's dead latents, listed ahead

    @property
    def dead(self) -> torch.Tensor:
        return self.tokens_seen - self.last_fired >= self.cfg.dead_after_tokens


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _optim_backend(cfg: TrainConfig) -> str:
    """The optimizer-side ops (row-sparse Adam, resampling) have torch and cuda backends;
    "triton" there means the fastest available, as "auto" does."""
    return cfg.backend if cfg.backend in ("torch", "cuda") else "auto"


def _make_run(cfg: TrainConfig, d_in: int, device: torch.device, out_dir: Path) -> _Run:
    sae_cfg = SAEConfig(d_in=d_in, d_sae=cfg.d_sae, architecture=cfg.architecture, k=cfg.k,
                        normalization=cfg.normalization, k_aux=cfg.k_aux or None, aux_alpha=cfg.aux_alpha,
                        jumprelu_threshold=cfg.jumprelu_threshold, metadata={"train_config": cfg.to_dict()})
    sae = SAE(sae_cfg, device=device, seed=cfg.seed)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "row_sparse_adam":
        opt = RowSparseAdam(sae, lr=cfg.learning_rate, betas=betas, moment_dtype=getattr(torch, cfg.moment_dtype),
                            backend=_optim_backend(cfg))
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate, betas=betas)
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.int64, device=device)
    return _Run(cfg, sae, opt, last_fired, out_dir / cfg.run_name)


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


def _train_step(run: _Run, x: torch.Tensor, step: int, device: torch.device) -> dict:
    cfg = run.cfg
    for group in run.opt.param_groups:
        group["lr"] = cfg.learning_rate * cfg.lr_factor(step)
    use_aux = cfg.auxk and cfg.architecture in ("topk", "batchtopk")
    autocast = (torch.autocast(device.type, dtype=getattr(torch, cfg.autocast))
                if cfg.autocast != "none" and device.type == "cuda" else nullcontext())
    k = cfg.k_at(step) if cfg.k_anneal_from else None
    row_sparse = cfg.optimizer == "row_sparse_adam"
    dead, seen = run.dead, run.tokens_seen  # [F] bool: AuxK's latents, and the ones resampling replaces
    dead_list = None
    if use_aux:  # listed during the last step; listed now (one host sync) on the first step after a start
        dead_list = (run.next_dead or dead_latents_later(dead)).get()
    with autocast:  # row-sparse Adam reads sparse weight gradients: no [d_sae, d_in] buffers
        out = run.sae(x, dead_latents=dead_list, backend=cfg.backend, check=False, k=k,
                      sparse_grad=row_sparse, weight_copies=cfg.weight_copies)
        loss = out.loss + cfg.sparsity_coefficient * cfg.sparsity_factor(step) * out.sparsity
    # Device-side bookkeeping queued before the backward, read after it: the fired rows
    # (for row-sparse Adam) and the next step's dead latents. The host then never waits
    # for a drained GPU.
    fired = fired_rows(out.code, cfg.d_sae) if row_sparse else None
    run.tokens_seen += x.shape[0]
    mark_fired_(run.last_fired, out.code.indices, out.code.values, run.tokens_seen, backend=_optim_backend(cfg))
    run.next_dead = dead_latents_later(run.dead) if use_aux else None
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if row_sparse:  # the clipping, the projection and the gradient fix are fused in its step
        run.opt.step(fired.get(), max_grad_norm=cfg.clip_grad_norm)
    else:
        run.sae.remove_parallel_grad_()
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(run.sae.parameters(), cfg.clip_grad_norm)
        run.opt.step()
        run.sae.normalize_decoder_()
    every = cfg.resample_every_tokens
    if every and (step + 1) * x.shape[0] // every > step * x.shape[0] // every:
        with torch.no_grad():
            xn = run.sae.normalize(x.float())
            losses = (xn - run.sae.normalize(out.recon.float())).pow(2).sum(1)
            resample_dead_latents_(run.sae, run.opt, dead, xn, losses, seed=cfg.seed * 1_000_003 + step,
                                   backend=_optim_backend(cfg))
            # A fresh start for the resampled rows: as if they had fired when this step
            # began (the ones that did fire this step keep the later stamp).
            run.last_fired.copy_(torch.where(dead, run.last_fired.clamp_min(seen), run.last_fired))
            run.next_dead = None  # listed anew next step
    return {"fvu": out.fvu.detach(), "auxk": out.auxk_loss.detach(), "l0": out.l0.detach(),
            "sparsity": out.sparsity.detach(), "k": k or cfg.k}


def _read_metrics(runs: list[_Run], metrics: list[dict]) -> list[dict]:
    """Each run's step metrics and dead fraction as Python numbers, read in one host sync.
    The training steps themselves never sync, so this read is also where the host waits
    for the GPU: the tokens/s interval must end after it, not before."""
    names = [name for name, value in metrics[0].items() if isinstance(value, torch.Tensor)]
    table = torch.stack([torch.stack([m[name].float() for name in names] + [run.dead.float().mean()])
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
        run would (same device and backend).

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
        metrics = [_train_step(run, x, step, device) for run in runs]
        if step % first.log_every == 0 or step == steps - 1:
            read = _read_metrics(runs, metrics)  # the clock stops once the GPU has done this step
            now = time.perf_counter()
            tokens_per_s = (step + 1 - tick_step) * batch / max(now - tick, 1e-9)
            tick, tick_step = now, step + 1
            for run, m in zip(runs, read):
                run.log.write({"step": step, "tokens": (step + 1) * batch, "lr": run.opt.param_groups[0]["lr"],
                               **m, "tokens_per_s": tokens_per_s})
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
                                                "data": getattr(source, "content_hash", None)})
    saes = [run.sae for run in runs]
    return saes[0] if isinstance(config, TrainConfig) else saes
