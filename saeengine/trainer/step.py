"""``TrainStep``: one SAE's training step, in the one order that the trainer, the
benchmarks and the host-sync tests all run."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping

import torch

from ..optim import (DeferredLatents, DenseAdam, RowSparseAdam, SAEOptimizer, dead_latents_later, fired_rows,
                     mark_fired_, resample_dead_latents_)
from .config import TrainConfig

# Implementations of the optimizer-side ops (row-sparse Adam, mark_fired, resampling):
# a TrainConfig.backend that names none of them ("triton", say) means "auto" there.
_OPTIMIZER_SIDE = ("torch", "reference", "cuda")


def optimizer_backend(backend: str) -> str:
    """The backend of the optimizer-side ops for a TrainConfig.backend."""
    return backend if backend in _OPTIMIZER_SIDE else "auto"


def build_optimizer(sae, cfg: TrainConfig) -> SAEOptimizer:
    """The optimizer that ``cfg`` names, over ``sae``, with its clipping."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "row_sparse_adam":
        return RowSparseAdam(sae, lr=cfg.learning_rate, betas=betas, moment_dtype=getattr(torch, cfg.moment_dtype),
                             backend=optimizer_backend(cfg.backend), max_grad_norm=cfg.clip_grad_norm)
    return DenseAdam(sae, lr=cfg.learning_rate, betas=betas, max_grad_norm=cfg.clip_grad_norm)


class TrainStep:
    """One SAE's training step. ``step(x)`` runs, in this order:

    1. the learning rate: ``cfg.learning_rate * cfg.lr_factor(step)`` on the optimizer;
    2. the forward (``cfg.autocast`` on CUDA; k from ``cfg.k_at``), with AuxK over the
       dead latents listed during the step before (the first step after a start lists
       them itself, and on a GPU waits for that), and sparse weight gradients when the
       optimizer wants them (``optimizer.sparse_grad``);
    3. queued before the backward and read after it, so the host never waits for a
       drained GPU: the rows that fired (when ``optimizer.needs_rows``), the fired
       stamps (``mark_fired_``), and the next step's dead latents;
    4. the backward of ``loss + sparsity_coefficient * sparsity_factor(step) * sparsity``;
    5. the optimizer's step with its constraints (parallel-gradient removal, clipping,
       Adam, unit-norm decoder rows);
    6. every ``cfg.resample_every_tokens`` tokens, resampling of the latents dead when
       the step began, from this batch's losses; their fired stamps restart.

    No syncing op runs in a step (``saeengine.syncs.count_host_syncs`` counts none) but
    in the first one after a start or a resampling, which lists its dead latents itself.

    Args:
        sae: the SAE to train (its device is where the step runs).
        cfg: the run's settings (only the ones of the step are read).
        optimizer: an :class:`saeengine.optim.SAEOptimizer`; None builds the one ``cfg``
            names (:func:`build_optimizer`).
        forward_options: expert overrides given to every ``sae(...)`` call, e.g.
            ``{"weight_copies": False}``.

    Attributes:
        last_fired: [F] int64, the tokens seen when each latent last fired.
        tokens_seen: tokens trained on so far.
        steps_done: steps taken so far (the next step's index in the schedules).
    """

    def __init__(self, sae, cfg: TrainConfig, optimizer: SAEOptimizer | None = None, *,
                 forward_options: Mapping[str, Any] | None = None):
        mismatch = [f"{field}: the SAE has {getattr(sae.cfg, field)!r}, cfg {getattr(cfg, field)!r}"
                    for field in ("d_sae", "architecture") if getattr(sae.cfg, field) != getattr(cfg, field)]
        if mismatch:
            raise ValueError(f"TrainStep: the SAE and the TrainConfig disagree ({'; '.join(mismatch)}); build the SAE "
                             "from cfg.sae_config(d_in)")
        self.sae, self.cfg = sae, cfg
        self.optimizer = optimizer if optimizer is not None else build_optimizer(sae, cfg)
        if not isinstance(self.optimizer, SAEOptimizer):
            raise TypeError(f"optimizer must be a saeengine.optim.SAEOptimizer (DenseAdam, RowSparseAdam), got "
                            f"{type(self.optimizer).__name__}")
        reserved = {"dead_latents", "dead_mask", "backend", "check", "k", "sparse_grad"} & set(forward_options or ())
        if reserved:
            raise ValueError(f"forward_options may not set {sorted(reserved)}: TrainStep sets them from cfg "
                             "and the optimizer")
        self.forward_options = dict(forward_options or {})
        device = next(sae.parameters()).device
        self.last_fired = torch.zeros(cfg.d_sae, dtype=torch.int64, device=device)
        self.tokens_seen = 0
        self.steps_done = 0
        self._next_dead: DeferredLatents | None = None  # the next step's dead latents, listed ahead
        self._backend = optimizer_backend(cfg.backend)
        self._auxk = cfg.auxk and sae.architecture.uses_auxk

    @property
    def dead(self) -> torch.Tensor:
        """[F] bool: the latents that have not fired for ``cfg.dead_after_tokens`` tokens."""
        return self.tokens_seen - self.last_fired >= self.cfg.dead_after_tokens

    def _autocast(self, device: torch.device):
        if self.cfg.autocast == "none" or device.type != "cuda":
            return nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.cfg.autocast))

    def __call__(self, x: torch.Tensor) -> dict:
        """x [N, d_in] on the SAE's device -> this step's metrics: "fvu", "auxk", "l0",
        "sparsity" (0-d tensors, not read on the host), "k" (int) and "lr" (float)."""
        cfg, sae, opt, index = self.cfg, self.sae, self.optimizer, self.steps_done
        opt.lr = cfg.learning_rate * cfg.lr_factor(index)
        k = cfg.k_at(index) if cfg.k_anneal_from else None
        dead, seen = self.dead, self.tokens_seen  # AuxK's latents, and the ones resampling replaces
        dead_list = (self._next_dead or dead_latents_later(dead)).get() if self._auxk else None
        with self._autocast(x.device):
            out = sae(x, dead_latents=dead_list, backend=cfg.backend, check=False, k=k,
                      sparse_grad=opt.sparse_grad, **self.forward_options)
            loss = out.loss + cfg.sparsity_coefficient * cfg.sparsity_factor(index) * out.sparsity
        fired = fired_rows(out.code, cfg.d_sae) if opt.needs_rows else None
        self.tokens_seen += x.shape[0]
        mark_fired_(self.last_fired, *out.code.fired_pairs(), self.tokens_seen, backend=self._backend)
        self._next_dead = dead_latents_later(self.dead) if self._auxk else None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(fired.get() if fired is not None else None)
        every = cfg.resample_every_tokens
        if every and (index + 1) * x.shape[0] // every > index * x.shape[0] // every:
            self._resample(x, out.recon, dead, seen, index)
        self.steps_done += 1
        return {"fvu": out.fvu.detach(), "auxk": out.auxk_loss.detach(), "l0": out.l0.detach(),
                "sparsity": out.sparsity.detach(), "k": k or cfg.k, "lr": opt.lr}

    @torch.no_grad()
    def _resample(self, x: torch.Tensor, recon: torch.Tensor, dead: torch.Tensor, seen: int, index: int) -> None:
        sae = self.sae
        xn = sae.normalize(x.float())
        losses = (xn - sae.normalize(recon.float())).pow(2).sum(1)
        resample_dead_latents_(sae, self.optimizer, dead, xn, losses, seed=self.cfg.seed * 1_000_003 + index,
                               backend=self._backend)
        # A fresh start for the resampled rows: as if they had fired when this step began
        # (the ones that did fire this step keep the later stamp).
        self.last_fired.copy_(torch.where(dead, self.last_fired.clamp_min(seen), self.last_fired))
        self._next_dead = None  # listed anew next step

    def state_dict(self) -> dict:
        """What a resumed run needs to continue bit for bit (tensors on the CPU)."""
        return {"optimizer": self.optimizer.state_dict(), "last_fired": self.last_fired.cpu(),
                "tokens_seen": self.tokens_seen, "step": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.last_fired.copy_(state["last_fired"])
        self.tokens_seen, self.steps_done = int(state["tokens_seen"]), int(state["step"])
        self._next_dead = None
