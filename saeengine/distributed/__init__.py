"""Training past one device on torch.distributed (gloo on CPUs, NCCL on GPUs).

- :mod:`.mesh`: the 2-D mesh (data axis x latent axis), ``--mesh data=2,latent=2``
  strings, the latent slices, the start-up config check.
- :mod:`.latent_shard`: the latent-sharded TopK SAE (local top-k, one all_gather of the
  N x k candidate keys, the exact global top-k, partial decodes summed by one all_reduce),
  and the data-axis gradient sum.
- :mod:`.comm`: the collectives, counted, and the closed-form communication and memory
  arithmetic of each layout.
- :mod:`.step` and :mod:`.train`: the training step on a slice and the sharded trainer
  (``saeengine train --mesh``, :mod:`.launch` and :mod:`.cli_train` for torchrun).
- :mod:`.checkpoint` and :mod:`.data`: sharded checkpoints that reshard; the data axis's
  part of every batch.
- :mod:`.per_rank`: one SAE per rank (``--per-rank``); :mod:`.record` and :mod:`.encode`:
  recording and encoding over ranks, merged on rank 0.

docs/distributed.md describes the layouts and what was measured.
"""

from .comm import CollectiveRecord, CommLog, counting, ddp_bytes, latent_axis_bytes, memory_per_rank, widest_fitting
from .latent_shard import (LatentShardedSAE, ShardedCode, ShardedForwardOutput, allreduce_data_grads_,
                           global_total_variance, pack_keys, sharded_topk_decode, train_step, unpack_keys)
from .mesh import (Mesh, MeshSpec, check_same_config, config_fields, init_mesh, latent_slice, latent_slices,
                   parse_mesh)
from .step import ShardedTrainStep
from .train import train_sharded

__all__ = ["CollectiveRecord", "CommLog", "LatentShardedSAE", "Mesh", "MeshSpec", "ShardedCode",
           "ShardedForwardOutput", "ShardedTrainStep", "allreduce_data_grads_", "check_same_config", "config_fields", "counting",
           "ddp_bytes", "global_total_variance", "init_mesh", "latent_axis_bytes", "latent_slice", "latent_slices",
           "memory_per_rank", "pack_keys", "parse_mesh", "sharded_topk_decode", "train_sharded", "train_step", "unpack_keys",
           "widest_fitting"]
