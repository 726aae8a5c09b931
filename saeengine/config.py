"""SAE configuration: one frozen dataclass, stored in every checkpoint's config.json.

Every field is checked at construction (its type, then its range): a bad value raises
:class:`~saeengine.errors.ConfigError` naming the field, the value and what it may be.
Each architecture checks the fields only it constrains (``saeengine.architectures``,
``check_config``: e.g. Matryoshka's prefixes must end at d_sae), with the same error.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import architecture_names, get_architecture
from .architectures.matryoshka import INNER as MATRYOSHKA_INNER
from . import field_checks as checks
from .errors import ConfigError

ARCHITECTURES = architecture_names()  # "topk", "batchtopk", "relu", "jumprelu", "matryoshka"
NORMALIZATIONS = ("none", "mean_norm")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SAEConfig:
    """Shape, architecture and preprocessing of one sparse autoencoder."""

    d_in: int
    """Width of the activations the SAE reads (the backbone's hidden size), >= 1."""
    d_sae: int
    """Number of latents F (the dictionary size), >= 1."""
    architecture: str = "topk"
    """"topk" (k per token), "batchtopk" (k * N per batch; a threshold for inference),
    "relu" (ReLU + L1 penalty), "jumprelu" (learned per-latent thresholds) or
    "matryoshka" (nested prefixes of the dictionary each reconstruct; TopK or BatchTopK
    selection)."""
    k: int = 32
    """Active latents per token for "topk", "batchtopk" (average) and "matryoshka", in
    [1, d_sae] (unused by "relu" and "jumprelu", but still an int >= 1)."""
    dtype: str = "float32"
    """Parameter dtype: "float32", "float16" or "bfloat16". Use torch.autocast for
    bf16 compute over fp32 parameters."""
    normalization: str = "none"
    """Input normalization: "none", or "mean_norm" (subtract the data mean, then scale so
    the mean L2 norm is sqrt(d_in)); the statistics are stored in the checkpoint."""
    k_aux: int | None = None
    """Latents in the AuxK code over dead latents, in [1, d_sae]; None means d_in // 2
    (capped at d_sae)."""
    aux_alpha: float = 1.0 / 32.0
    """Weight of the AuxK loss in the total loss, finite and >= 0."""
    jumprelu_threshold: float = 1e-3
    """Initial threshold of every latent for "jumprelu", finite and > 0."""
    jumprelu_bandwidth: float = 1e-3
    """Width of the rectangle kernel of the threshold's straight-through gradient
    ("jumprelu"), finite and > 0."""
    matryoshka_inner: str = "topk"
    """Selection of "matryoshka": "topk" (k per token) or "batchtopk" (k * N per batch)."""
    matryoshka_prefixes: tuple[int, ...] = ()
    """Fixed prefix lengths of "matryoshka", ascending and ending at d_sae (e.g. (64, 512,
    4096)); empty: lengths drawn at random each training step (matryoshka_random_prefixes)."""
    matryoshka_random_prefixes: int = 10
    """Prefixes per training step of "matryoshka" when matryoshka_prefixes is empty: the
    full dictionary and this many minus one lengths drawn with P(length <= m) =
    (m / d_sae) ^ 0.5 (short prefixes are common). An int >= 1 (<= d_sae for "matryoshka")."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: backbone, layer, token kind, dataset, ... (a JSON-serializable
    dict with str keys; it is written to config.json)."""

    def __post_init__(self) -> None:
        # Values come back normalized (numpy ints -> int, JSON lists -> tuples) so that
        # configs compare equal and serialize.
        checks.check_fields(self, _CHECKS, _RULES)
        try:
            get_architecture(self.architecture).check_config(self)
        except ConfigError:
            raise
        except ValueError as err:  # the architecture's own message names the field
            raise ConfigError(str(err)) from err

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
        """The inverse of :meth:`to_dict`: ``data`` must hold every field, no more, so that
        nothing saved takes a default (a checkpoint missing ``k`` must not load with
        k=32). Raises ConfigError naming the missing or unknown fields."""
        if not isinstance(data, dict):
            raise ConfigError(f"SAEConfig fields must be a dict of field -> value, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"unknown SAEConfig fields {unknown}; it may come from a newer saeengine "
                              f"(the fields are {names})")
        missing = [name for name in names if name not in data]
        if missing:
            raise ConfigError(f"SAEConfig fields missing: {missing}; every field must be given, none takes a default")
        return cls(**data)


# ----- field checks (saeengine.field_checks) ---------------------------------------------
def _prefixes(cfg):
    # The order and the end at d_sae are Matryoshka's to check (check_config); any
    # architecture needs the type, as config.json stores it.
    def check(value):
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple) or not all(isinstance(m, numbers.Integral) and not isinstance(m, bool)
                                                   for m in value):
            raise ValueError(f"a tuple of ints, ascending and ending at d_sae (e.g. ({max(1, cfg.d_sae // 8)}, "
                             f"{cfg.d_sae})), or () for random lengths")
        return tuple(int(m) for m in value)
    return check


def _metadata(value):
    if not isinstance(value, dict):
        raise ValueError(f"a dict, not a {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"SAEConfig.metadata is not JSON-serializable ({err}); config.json stores it: use str, "
                          "int, float, bool, None, lists and dicts with str keys") from None
    bad_keys = [key for key in value if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError(f"SAEConfig.metadata has non-str keys {bad_keys[:5]}; JSON would turn them into strings")
    return value


def _selects_k(cfg) -> bool:
    return get_architecture(cfg.architecture).selects_k


_CHECKS = {
    "d_in": checks.integer(1),
    "d_sae": checks.integer(1),
    "architecture": checks.choice(ARCHITECTURES),
    # k <= d_sae only where k selects (the _RULES): relu and jumprelu do not read it.
    "k": checks.using_config(lambda cfg: checks.integer(1, rule=f"a positive int (1 <= k <= d_sae={cfg.d_sae})")),
    "dtype": checks.choice(tuple(DTYPES)),
    "normalization": checks.choice(NORMALIZATIONS),
    "k_aux": checks.using_config(lambda cfg: checks.optional(checks.integer(1, cfg.d_sae, high_name="d_sae"))),
    "aux_alpha": checks.real(0.0),
    "jumprelu_threshold": checks.real(0.0, low_open=True),
    "jumprelu_bandwidth": checks.real(0.0, low_open=True),
    "matryoshka_inner": checks.choice(MATRYOSHKA_INNER),
    "matryoshka_prefixes": checks.using_config(_prefixes),
    "matryoshka_random_prefixes": checks.using_config(
        lambda cfg: checks.integer(1, cfg.d_sae if cfg.architecture == "matryoshka" else None, high_name="d_sae")),
    "metadata": _metadata,
}
checks.require_every_field(SAEConfig, _CHECKS)
_RULES = (checks.at_most("k", "d_sae", when=_selects_k),)
