"""Activation store: sharded, memory-mapped recorded activations with their image/patch
sources, a crash-safe writer, and a fast shuffled loader. See metadata.py for the format."""

from .loader import ActivationLoader, batch_positions, epoch_batches
from .metadata import StoreError, StoreIncompleteError, StoreMetadata
from .reader import ActivationStore
from .writer import ActivationWriter

__all__ = [
    "ActivationLoader",
    "ActivationStore",
    "ActivationWriter",
    "StoreError",
    "StoreIncompleteError",
    "StoreMetadata",
    "batch_positions",
    "epoch_batches",
]
