"""SAE configuration: one frozen dataclass, stored in every checkpoint's config.json.

Every field is checked at construction (its type, then its range): a bad value raises
:class:`~saeengine.errors.ConfigError` naming the field, the value and what it may be.
Each architecture checks the fields only it constrains (``saeengine.architectures``,
``check_config``: e.g. Matryoshka's prefixes must end at d_sae), with the same error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .architectures import architecture_names, get_architecture
from .architectures.matryoshka import INNER as MATRYOSHKA_INNER
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
        # Each check may read fields checked before it (k's range reads d_sae), so the
        # table follows the field order; values come back normalized (numpy ints -> int,
        # JSON lists -> tuples) so configs compare equal and serialize.
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(self, name, getattr(self, name)))
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


# ----- field checks ---------------------------------------------------------------------
def _invalid(name: str, value: Any, rule: str) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ConfigError(f"SAEConfig.{name}={shown} is invalid: it must be {rule}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(low: int, high: Callable[[SAEConfig], tuple[int, str] | None] = lambda cfg: None):
    """A check for an int in [low, high(cfg)]; high gives (bound, its name) or None."""
    def check(cfg, name, value):
        bound = high(cfg)
        rule = f"an int in [{low}, {bound[1]}={bound[0]}]" if bound else f"an int >= {low}"
        if not _is_int(value):
            raise _invalid(name, value, f"{rule}, not a {type(value).__name__}")
        if value < low or (bound and value > bound[0]):
            raise _invalid(name, value, rule)
        return int(value)
    return check


def _k(cfg, name, value):
    if not _is_int(value) or value < 1:
        kind = "" if _is_int(value) else f", not a {type(value).__name__}"
        raise _invalid(name, value, f"a positive int (1 <= k <= d_sae={cfg.d_sae}){kind}")
    if get_architecture(cfg.architecture).selects_k and value > cfg.d_sae:
        raise ConfigError(f"SAEConfig.k={value} exceeds d_sae={cfg.d_sae}; it must satisfy 1 <= k <= d_sae")
    return int(value)


def _k_aux(cfg, name, value):
    return None if value is None else _int(1, lambda c: (c.d_sae, "d_sae"))(cfg, name, value)


def _choice(choices):
    def check(cfg, name, value):
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"SAEConfig.{name}={value!r}; choose one of {tuple(choices)}")
        return value
    return check


def _number(low: float, inclusive: bool):
    """A check for a finite real number > low (>= low when inclusive)."""
    rule = f"a finite number {'>=' if inclusive else '>'} {low:g}"
    if (low, inclusive) == (0, False):
        rule = "a positive number (finite, > 0)"

    def check(cfg, name, value):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise _invalid(name, value, f"{rule}, not a {type(value).__name__}")
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise _invalid(name, value, rule)
        return float(value)
    return check


def _prefixes(cfg, name, value):
    # The order and the end at d_sae are Matryoshka's to check (check_config); any
    # architecture needs the type, as config.json stores it.
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not all(_is_int(m) for m in value):
        raise _invalid(name, value, "a tuple of ints, ascending and ending at d_sae (e.g. "
                                    f"({max(1, cfg.d_sae // 8)}, {cfg.d_sae})), or () for random lengths")
    return tuple(int(m) for m in value)


def _metadata(cfg, name, value):
    if not isinstance(value, dict):
        raise _invalid(name, value, f"a dict, not a {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"SAEConfig.metadata is not JSON-serializable ({err}); config.json stores it: use str, "
                          "int, float, bool, None, lists and dicts with str keys") from None
    bad_keys = [key for key in value if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError(f"SAEConfig.metadata has non-str keys {bad_keys[:5]}; JSON would turn them into strings")
    return value


_CHECKS: dict[str, Callable[[SAEConfig, str, Any], Any]] = {
    "d_in": _int(1),
    "d_sae": _int(1),
    "architecture": _choice(ARCHITECTURES),
    "k": _k,
    "dtype": _choice(tuple(DTYPES)),
    "normalization": _choice(NORMALIZATIONS),
    "k_aux": _k_aux,
    "aux_alpha": _number(0.0, inclusive=True),
    "jumprelu_threshold": _number(0.0, inclusive=False),
    "jumprelu_bandwidth": _number(0.0, inclusive=False),
    "matryoshka_inner": _choice(MATRYOSHKA_INNER),
    "matryoshka_prefixes": _prefixes,
    "matryoshka_random_prefixes": _int(1, lambda c: (c.d_sae, "d_sae") if c.architecture == "matryoshka" else None),
    "metadata": _metadata,
}
# A field added without a check would be accepted unchecked: fail at import instead.
if list(_CHECKS) != [f.name for f in dataclasses.fields(SAEConfig)]:
    raise RuntimeError("every SAEConfig field needs an entry in saeengine.config._CHECKS, in field order")
