"""The on-disk layout of an SAE checkpoint: its file names, format version, config.json's
top-level fields by format version, and the values format-1 files imply for fields added
since. saeengine/checkpoint.py describes the format; this module only names its parts."""

from __future__ import annotations

FORMAT = "saeengine.sae"
FORMAT_VERSION = 2  # 2: the weights' size and SHA-256 in config.json, the config in the weights' header
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
NORM_BUFFERS = ("norm_mean", "norm_scale")

# The top-level fields of config.json by format version, with the JSON type each holds.
_FIELDS_V1: dict[str, type] = {"format": str, "format_version": int, "checkpoint_id": str, "library_version": str,
                               "config": dict, "normalization": dict, "tensors": dict, "provenance": dict}
_FIELDS = {1: _FIELDS_V1, 2: {**_FIELDS_V1, "weights": dict}}
# SAEConfig fields that saeengine gained after writing format-1 checkpoints, with the value
# its code behaved as before (Matryoshka did not exist; JumpReLU's bandwidth was this).
LEGACY_V1_FIELDS = {"jumprelu_bandwidth": 1e-3, "matryoshka_inner": "topk", "matryoshka_prefixes": [],
                    "matryoshka_random_prefixes": 10}
