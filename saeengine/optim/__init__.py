"""Optimizers and dead-latent maintenance for SAE training."""

from .resample import resample_dead_latents_
from .row_sparse_adam import RowSparseAdam

__all__ = ["RowSparseAdam", "resample_dead_latents_"]
