"""Activation store: sharded, memory-mapped recorded activations with their image/patch
sources and image paths, a crash-safe and resumable writer, and a fast shuffled loader.
See metadata.py for the format and reader.py for what is checked when."""

from .loader import ActivationLoader, batch_positions, epoch_batches
from .metadata import StoreCorruptError, StoreError, StoreIncompleteError, StoreMetadata
from .reader import ActivationStore
from .writer import ActivationWriter

__all__ = [
    "ActivationLoader",
    "ActivationStore",
    "ActivationWriter",
    "StoreCorruptError",
    "StoreError",
    "StoreIncompleteError",
    "StoreMetadata",
    "batch_positions",
    "epoch_batches",
]
