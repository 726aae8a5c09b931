"""The training engine: ``train(data, TrainConfig)`` for one SAE or a sweep, and the
:class:`TrainStep` it runs (also what the benchmarks time)."""

from .config import TrainConfig, default_lr
from .init import geometric_median, init_from_sample
from .loop import initial_sae, train
from .step import TrainStep, build_optimizer

__all__ = ["TrainConfig", "TrainStep", "build_optimizer", "default_lr", "geometric_median", "init_from_sample",
           "initial_sae", "train"]
