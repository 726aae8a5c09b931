"""Optimizers and dead-latent maintenance for SAE training.

Every optimizer implements :class:`SAEOptimizer` (its constraints, whether it wants
sparse gradients and the fired rows, resetting rows for resampling)."""

from .base import SAEOptimizer
from .dense_adam import DenseAdam
from .fired import DeferredLatents, dead_latents_later, fired_rows, mark_fired_
from .resample import resample_dead_latents_, resample_uniform
from .row_sparse_adam import RowSparseAdam, clip_grad_norm_, latent_grad_rows

__all__ = ["DeferredLatents", "DenseAdam", "RowSparseAdam", "SAEOptimizer", "clip_grad_norm_", "dead_latents_later",
           "fired_rows", "latent_grad_rows", "mark_fired_", "resample_dead_latents_", "resample_uniform"]
