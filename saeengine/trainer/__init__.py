"""The training engine: ``train(data, TrainConfig)`` for one SAE or a sweep."""

from .config import TrainConfig, default_lr
from .init import geometric_median, init_from_sample
from .loop import train

__all__ = ["TrainConfig", "default_lr", "geometric_median", "init_from_sample", "train"]
