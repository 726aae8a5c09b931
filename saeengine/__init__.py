"""saeengine: fast sparse autoencoders for vision models."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("saeengine")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

from . import ops
from ._native import load_extension as _load_extension
from .backends import BackendUnavailableError, available_backends
from .checkpoint import CheckpointError
from .config import SAEConfig
from .sae import SAE, ForwardOutput
from .trainer import TrainConfig, train

_load_extension()  # registers torch.ops.saeengine.* when the CUDA extension is built

__all__ = [
    "SAE",
    "BackendUnavailableError",
    "CheckpointError",
    "ForwardOutput",
    "SAEConfig",
    "TrainConfig",
    "available_backends",
    "ops",
    "train",
    "__version__",
]
