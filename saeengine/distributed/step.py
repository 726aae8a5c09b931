"""``ShardedTrainStep``: the training step of one latent-sharded TopK SAE, the twin of
:class:`saeengine.trainer.step.TrainStep` on a data x latent :class:`Mesh`.

Every rank holds one latent slice ``[lo, hi)`` of the SAE (a :class:`LatentShardedSAE`)
and one data rank's part of the global batch. A step runs TrainStep's operations in
TrainStep's order, with the collectives that make the result the single-process step on
the global batch (up to the order of float sums):

1. the learning rate ``cfg.learning_rate * cfg.lr_factor(step)``; k from ``cfg.k_at``;
2. the sharded forward (AuxK over this slice's dead latents, the dead count global);
3. the backward; the data-axis gradient sum:

   - DenseAdam: every gradient in one flat bucket (``allreduce_data_grads_``), with the
     step's metrics and this slice's fired flags riding in the same bucket;
   - RowSparseAdam: first the fired flags (one all_reduce of [2, hi - lo] uint8: fired in
     the main code, fired in either code), then only the rows that fired anywhere in the
     global batch (identical on every data rank) of W_enc, b_enc, W_dec with b_dec's
     gradient and the metrics in one bucket of 4 (U (2 d + 1) + d + 3) bytes;

4. clipping (``cfg.clip_grad_norm`` > 0) by the global norm: the squared norm of this
   slice's rows (b_dec on latent rank 0 only: it is replicated) summed over the latent
   group, the norm each single-process optimizer clips by (DenseAdam's after removing the
   decoder's parallel gradient, RowSparseAdam's over the fired rows before it);
5. the optimizer's step on the slice (decoder constraints are per row: local);
6. the fired stamps: the latents fired anywhere in the global batch get the global
   ``tokens_seen``, so ``last_fired`` is identical on every data replica and equals the
   single-process ``TrainStep.last_fired[lo:hi]``;
7. every ``cfg.resample_every_tokens`` tokens, resampling of the latents dead when the
   step began, on each slice for its own rows: the draw of latent j is
   ``optim.resample_uniform(seed, j)`` of its GLOBAL id, the sampling cdf is over the
   global batch's losses (an all_gather of N_local fp32 over the data group), the chosen
   inputs come from whichever data rank holds them (an all_reduce of [R, d] fp32, R =
   the slice's dead latents), the mean live encoder norm is over every slice (an
   all_reduce of [2] fp64 over the latent group).

Every data rank must pass the same number of tokens (the data loaders of
:mod:`saeengine.distributed.data` do).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from ..optim import RowSparseAdam
from ..optim.base import ROW_ROLES
from ..optim.resample import sampling_cdf, resample_picks, write_resampled_rows_
from ..trainer.config import TrainConfig
from ..trainer.step import build_optimizer
from . import comm
from .latent_shard import LatentShardedSAE, allreduce_data_grads_
from .mesh import Mesh

_METRICS = 3  # fvu, auxk, l0: summed over the data group with the gradients


class ShardedTrainStep:
    """One latent slice's training step (module docstring).

    Args:
        module: this rank's :class:`LatentShardedSAE` (its ``cfg`` the full SAE's).
        cfg: the run's TrainConfig (the same on every rank; :meth:`check_config` first).
        mesh: the module's mesh (None: ``module.mesh``).

    Attributes:
        optimizer: DenseAdam or RowSparseAdam (``cfg.optimizer``) over the slice, built
            without clipping (the step clips by the global norm itself).
        last_fired: [hi - lo] int64, the global tokens seen when each latent of the slice
            last fired (identical on every data replica).
        tokens_seen: GLOBAL tokens trained on so far.
        steps_done: steps taken so far (the next step's index in the schedules).
    """

    def __init__(self, module: LatentShardedSAE, cfg: TrainConfig, mesh: Mesh | None = None):
        self.check_config(cfg)
        if not isinstance(module, LatentShardedSAE):
            raise TypeError(f"ShardedTrainStep trains a LatentShardedSAE (LatentShardedSAE.from_sae(sae, mesh)), got "
                            f"{type(module).__name__}; a full SAE trains with saeengine.trainer.TrainStep")
        mismatch = [f"{field}: the SAE has {getattr(module.cfg, field)!r}, cfg {getattr(cfg, field)!r}"
                    for field in ("d_sae", "architecture") if getattr(module.cfg, field) != getattr(cfg, field)]
        if mismatch:
            raise ConfigError(f"ShardedTrainStep: the SAE and the TrainConfig disagree ({'; '.join(mismatch)}); build "
                              "the SAE from cfg.sae_config(d_in)")
        mesh = mesh if mesh is not None else module.mesh
        if (mesh.spec, mesh.rank) != (module.mesh.spec, module.mesh.rank):
            raise ValueError(f"the mesh ({mesh}) is not the module's ({module.mesh}); pass the mesh the module was "
                             "built on")
        self.module, self.cfg, self.mesh = module, cfg, mesh
        # Clipping needs the norm over every slice, which the step computes; the optimizer
        # itself does not clip. The sharded forward gives dense slice gradients.
        self.optimizer = build_optimizer(module, dataclasses.replace(cfg, clip_grad_norm=0.0))
        self.optimizer.sparse_grad = False
        self._row_sparse = isinstance(self.optimizer, RowSparseAdam)
        self.last_fired = torch.zeros(module.d_slice, dtype=torch.int64, device=module.W_dec.device)
        self.tokens_seen = 0
        self.steps_done = 0

    @staticmethod
    def check_config(cfg: TrainConfig) -> None:
        """ConfigError for the settings a latent-sharded step does not run, naming the
        field and the fix."""
        if cfg.architecture != "topk":
            raise ConfigError(f"architecture={cfg.architecture!r}: latent sharding trains 'topk' SAEs only; train "
                              "other architectures with saeengine.train, or one SAE per rank (--per-rank), or set "
                              "architecture='topk'")
        if cfg.autocast != "none":
            raise ConfigError(f"autocast={cfg.autocast!r}: the latent-sharded step computes in the parameters' dtype; "
                              "set autocast='none'")

    # ----- counters ----------------------------------------------------------------------------
    @property
    def dead(self) -> torch.Tensor:
        """[hi - lo] bool: this slice's latents that have not fired for ``cfg.dead_after_tokens`` tokens."""
        return self.tokens_seen - self.last_fired >= self.cfg.dead_after_tokens

    def dead_fraction(self) -> torch.Tensor:
        """0-d float: the fraction of ALL F latents that are dead (one all_reduce of a
        count over the latent group; the same on every rank)."""
        count = self.dead.sum().reshape(1).to(torch.int64)
        comm.all_reduce(count, self.mesh.latent_group, axis="latent", what="dead_count")
        return (count[0].double() / self.cfg.d_sae).float()

    # ----- the step ----------------------------------------------------------------------------
    def step(self, x: torch.Tensor) -> dict:
        """x [N_local, d_in]: this data rank's part of the global batch (the same on every
        rank of its latent group) -> the step's metrics, global-batch values identical on
        every rank: "fvu", "auxk", "l0", "sparsity" (0-d tensors), "k" (int), "lr" (float)."""
        cfg, module, opt, mesh, index = self.cfg, self.module, self.optimizer, self.mesh, self.steps_done
        opt.lr = cfg.learning_rate * cfg.lr_factor(index)
        k = cfg.k_at(index) if cfg.k_anneal_from else None
        dead, seen = self.dead, self.tokens_seen  # AuxK's latents, and the ones resampling replaces
        out = module(x, dead if cfg.auxk else None, backend=cfg.backend, check=False, k=k)
        # Each data rank's share: their sum over the data group is the global batch's value.
        metrics = torch.stack([out.fvu.detach().float(), out.auxk_loss.detach().float(),
                               out.l0.detach().float() / mesh.data_size])
        fired = module.fired_counts(out.code) > 0  # [hi - lo], this data rank's tokens
        n_global = x.shape[0] * mesh.data_size
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if self._row_sparse:
            got_grad = fired | (module.fired_counts(out.code.aux) > 0) if out.code.aux is not None else fired
            flags = comm.all_reduce(torch.stack([fired, got_grad]).to(self._flag_dtype()), mesh.data_group,
                                    axis="data", what="fired_rows") > 0
            fired, rows = flags[0], torch.nonzero(flags[1]).squeeze(1)
            metrics = self._reduce_rows_(rows, metrics)
            self._clip_(rows)
            opt.step(rows)
        else:
            extra = allreduce_data_grads_(module, mesh, extra=torch.cat([metrics, fired.float()]))
            metrics, fired = extra[:_METRICS], extra[_METRICS:] > 0
            self._clip_(None)
            opt.step()
        self.tokens_seen += n_global
        self.last_fired.masked_fill_(fired, self.tokens_seen)
        every = cfg.resample_every_tokens
        if every and (index + 1) * n_global // every > index * n_global // every:
            self._resample(x, out.recon.detach(), dead, seen, index)
        self.steps_done += 1
        return {"fvu": metrics[0], "auxk": metrics[1], "l0": metrics[2], "sparsity": torch.zeros((), device=x.device),
                "k": k or cfg.k, "lr": opt.lr}

    __call__ = step

    def _flag_dtype(self) -> torch.dtype:
        # 0/1 flags summed over the data group: a byte each while the sum cannot wrap.
        return torch.uint8 if self.mesh.data_size < 256 else torch.int32

    @torch.no_grad()
    def _reduce_rows_(self, rows: torch.Tensor, metrics: torch.Tensor) -> torch.Tensor:
        """Sum over the data group only the rows ``rows`` [U] (fired anywhere in the global
        batch: every other row's gradient is zero on every data rank) of the latent-row
        gradients, with the dense gradients and ``metrics``, in one bucket; the sums go
        back into ``p.grad``. Returns the summed metrics."""
        mesh = self.mesh
        if mesh.data_size == 1:
            return metrics
        named = list(self.module.named_parameters())
        is_rows = [self.optimizer.roles[name] in ROW_ROLES for name, _ in named]
        for _, p in named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        parts = [(p.grad.index_select(0, rows) if row else p.grad).reshape(-1).float()
                 for (_, p), row in zip(named, is_rows)]
        flat = comm.all_reduce(torch.cat(parts + [metrics]), mesh.data_group, axis="data", what="row_grads")
        offset = 0
        for (_, p), row in zip(named, is_rows):
            shape = (rows.numel(), *p.shape[1:]) if row else p.shape
            n = int(torch.Size(shape).numel())
            piece = flat[offset:offset + n].view(shape).to(p.grad.dtype)
            if row:
                p.grad.index_copy_(0, rows, piece)
            else:
                p.grad.copy_(piece)
            offset += n
        return flat[offset:].clone()  # not a view: it would keep the bucket of row gradients alive

    @torch.no_grad()
    def _clip_(self, rows: torch.Tensor | None) -> None:
        """Scale the gradients so that the joint norm over every slice (b_dec once) is at
        most ``cfg.clip_grad_norm``, as the single-process optimizer would: DenseAdam
        (rows None) clips the decoder gradient after removing its component parallel to
        each row, RowSparseAdam the listed rows before it."""
        max_norm = self.cfg.clip_grad_norm
        if not max_norm:
            return
        module, mesh = self.module, self.mesh
        total = torch.zeros(1, dtype=torch.float64, device=module.W_dec.device)
        grads = []
        for name, p in module.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            role = self.optimizer.roles[name]
            if role not in ROW_ROLES:
                if mesh.latent_rank == 0:  # replicated over the latent group: counted once
                    total += torch.linalg.vector_norm(p.grad.float()).double().square()
                continue
            g = p.grad.float() if rows is None else p.grad.index_select(0, rows).float()
            total += torch.linalg.vector_norm(g).double().square()
            if role == "decoder_rows" and rows is None:
                # ||g - c w||^2 = ||g||^2 - c^2 (2 - ||w||^2) per row, c = g.w: no copy of the
                # removed gradient (DenseAdam removes it in its step).
                w = p.detach().float()
                c = (g * w).sum(1).double()
                total -= (c * c * (2 - w.square().sum(1).double())).sum()
        comm.all_reduce(total, mesh.latent_group, axis="latent", what="grad_norm")
        norm = total.clamp_min(0).sqrt().float()[0]
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))

    @torch.no_grad()
    def _resample(self, x: torch.Tensor, recon: torch.Tensor, dead: torch.Tensor, seen: int, index: int) -> None:
        """TrainStep._resample across slices (optim.resample_dead_latents_'s rule, each
        slice for its own rows; module docstring, item 7)."""
        module, mesh, opt = self.module, self.mesh, self.optimizer
        xn = module.normalize(x.float())
        losses = (xn - module.normalize(recon.float())).pow(2).sum(1)                       # [N_local]
        cdf = sampling_cdf(comm.all_gather(losses, mesh.data_group, axis="data",
                                            what="resample_losses").reshape(-1))           # [N_global]
        alive = ~dead
        stats = torch.stack([(module.W_enc.detach().float().norm(dim=1) * alive).sum().double(),
                             alive.sum().double()])
        comm.all_reduce(stats, mesh.latent_group, axis="latent", what="resample_encoder_norm")
        enc_norm = torch.where(stats[1] > 0, stats[0] / stats[1].clamp_min(1), 1.0).float()
        rows = torch.nonzero(dead).squeeze(1)
        if rows.numel():  # the same on every data replica (their last_fired are equal)
            picks = resample_picks(self.cfg.seed * 1_000_003 + index, rows + module.lo, cdf)
            # Row p of the global batch lives on data rank p // N_local; the others add zeros.
            first = mesh.data_rank * x.shape[0]
            own = (picks >= first) & (picks < first + x.shape[0])
            chosen = torch.zeros(rows.numel(), xn.shape[1], dtype=torch.float32, device=xn.device)
            chosen[own] = xn[picks[own] - first]
            comm.all_reduce(chosen, mesh.data_group, axis="data", what="resample_inputs")
            write_resampled_rows_(module, rows, chosen, enc_norm)
            opt.reset_rows_(dead)
        # A fresh start for the resampled rows, as TrainStep: as if they fired when this step began.
        self.last_fired.copy_(torch.where(dead, self.last_fired.clamp_min(seen), self.last_fired))

    # ----- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs to continue bit for bit (tensors on the CPU): this
        slice's optimizer state and last_fired, the global counters."""
        return {"optimizer": self.optimizer.state_dict(), "last_fired": self.last_fired.cpu(),
                "tokens_seen": self.tokens_seen, "step": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        last_fired = state["last_fired"]
        if tuple(last_fired.shape) != (self.module.d_slice,):
            raise ValueError(f"last_fired has shape {tuple(last_fired.shape)}, this slice [{self.module.lo}, "
                             f"{self.module.hi}) needs ({self.module.d_slice},); load the state saved for this slice "
                             "(distributed.checkpoint.load_sharded reshards)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.last_fired.copy_(last_fired)
        self.tokens_seen, self.steps_done = int(state["tokens_seen"]), int(state["step"])
