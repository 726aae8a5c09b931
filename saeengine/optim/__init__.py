"""Optimizers and dead-latent maintenance for SAE training."""

from .fired import mark_fired_
from .resample import resample_dead_latents_, resample_uniform
from .row_sparse_adam import RowSparseAdam

__all__ = ["RowSparseAdam", "mark_fired_", "resample_dead_latents_", "resample_uniform"]
