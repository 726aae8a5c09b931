"""SAE configuration: one frozen dataclass, stored in every checkpoint's config.json.

The fields every SAE has are checked here; each architecture checks its own fields
(``saeengine.architectures``, ``check_config``), so an error names the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import architecture_names, get_architecture

ARCHITECTURES = architecture_names()  # "topk", "batchtopk", "relu", "jumprelu", "matryoshka"
NORMALIZATIONS = ("none", "mean_norm")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SAEConfig:
    """Shape, architecture and preprocessing of one sparse autoencoder."""

    d_in: int
    """Width of the activations the SAE reads (the backbone's hidden size)."""
    d_sae: int
    """Number of latents F (the dictionary size)."""
    architecture: str = "topk"
    """"topk" (k per token), "batchtopk" (k * N per batch; a threshold for inference),
    "relu" (ReLU + L1 penalty), "jumprelu" (learned per-latent thresholds) or
    "matryoshka" (nested prefixes of the dictionary each reconstruct; TopK or BatchTopK
    selection)."""
    k: int = 32
    """Active latents per token for "topk", "batchtopk" (average) and "matryoshka"."""
    dtype: str = "float32"
    """Parameter dtype: "float32", "float16" or "bfloat16". Use torch.autocast for
    bf16 compute over fp32 parameters."""
    normalization: str = "none"
    """Input normalization: "none", or "mean_norm" (subtract the data mean, then scale so
    the mean L2 norm is sqrt(d_in)); the statistics are stored in the checkpoint."""
    k_aux: int | None = None
    """Latents in the AuxK code over dead latents; None means d_in // 2 (capped at d_sae)."""
    aux_alpha: float = 1.0 / 32.0
    """Weight of the AuxK loss in the total loss."""
    jumprelu_threshold: float = 1e-3
    """Initial threshold of every latent for "jumprelu"."""
    jumprelu_bandwidth: float = 1e-3
    """Width of the rectangle kernel of the threshold's straight-through gradient ("jumprelu")."""
    matryoshka_inner: str = "topk"
    """Selection of "matryoshka": "topk" (k per token) or "batchtopk" (k * N per batch)."""
    matryoshka_prefixes: tuple[int, ...] = ()
    """Fixed prefix lengths of "matryoshka", ascending and ending at d_sae (e.g. (64, 512,
    4096)); empty: lengths drawn at random each training step (matryoshka_random_prefixes)."""
    matryoshka_random_prefixes: int = 10
    """Prefixes per training step of "matryoshka" when matryoshka_prefixes is empty: the
    full dictionary and this many minus one lengths drawn with P(length <= m) =
    (m / d_sae) ^ 0.5 (short prefixes are common)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: backbone, layer, token kind, dataset, ..."""

    def __post_init__(self) -> None:
        # JSON gives lists: store a tuple, so configs compare equal and hash.
        if isinstance(self.matryoshka_prefixes, list):
            object.__setattr__(self, "matryoshka_prefixes", tuple(self.matryoshka_prefixes))
        for name in ("d_in", "d_sae", "k"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"SAEConfig.{name}={value!r} is invalid: it must be a positive int")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAEConfig.architecture={self.architecture!r}; choose one of {ARCHITECTURES}")
        if get_architecture(self.architecture).selects_k and self.k > self.d_sae:
            raise ValueError(f"SAEConfig.k={self.k} exceeds d_sae={self.d_sae}; it must satisfy 1 <= k <= d_sae")
        if self.dtype not in DTYPES:
            raise ValueError(f"SAEConfig.dtype={self.dtype!r}; choose one of {tuple(DTYPES)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"SAEConfig.normalization={self.normalization!r}; choose one of {NORMALIZATIONS}")
        if self.k_aux is not None and not 1 <= self.k_aux <= self.d_sae:
            raise ValueError(f"SAEConfig.k_aux={self.k_aux} must satisfy 1 <= k_aux <= d_sae={self.d_sae}")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"SAEConfig.metadata must be a dict, got {type(self.metadata).__name__}")
        get_architecture(self.architecture).check_config(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def effective_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, min(self.d_in // 2, self.d_sae))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {unknown}; this checkpoint may come from a newer saeengine")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"SAEConfig fields missing: {missing}")
        return cls(**data)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
