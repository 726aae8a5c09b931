"""Field checks of the demo configs (saeengine.demo.DemoConfig and
saeengine.demo_synthetic.SyntheticDemoConfig).

A config's ``__post_init__`` calls :func:`check_fields` with one check per field, in field
order (the value's type, then its fixed range), and the rules that tie fields together
(``k <= d_sae``). A bad value raises :class:`~saeengine.errors.ConfigError`
``<Config>.<field>=<value> is invalid: it must be <the allowed range>``. Checks return the
value normalized (numpy ints -> int, an int given for a float -> float), so configs
compare equal and print plainly.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from typing import Any, Callable, NamedTuple, Sequence

from .errors import ConfigError

# A field's check: value -> the value normalized; raises ValueError(the allowed range).
Check = Callable[[Any], Any]
SEED_LIMIT = 2**32  # TrainConfig.seed's bound: the demos hand their seed to the trainer


class Rule(NamedTuple):
    """A constraint between fields, reported on ``field``: ``holds(cfg)`` must be true, and
    ``allowed(cfg)`` says what the field may be."""
    field: str
    holds: Callable[[Any], bool]
    allowed: Callable[[Any], str]


def integer(low: int, high: int | None = None, why: str = "") -> Check:
    """An int in [low, high] (>= low when high is None); a bool is refused (True is no count)."""
    rule = (f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}") + (f" ({why})" if why else "")

    def check(value):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{rule}, not a {type(value).__name__}")
        if value < low or (high is not None and value > high):
            raise ValueError(rule)
        return int(value)
    return check


def real(low: float, *, low_open: bool = False, why: str = "") -> Check:
    """A finite real number > low (low_open) or >= low."""
    rule = f"a finite number {'>' if low_open else '>='} {low:g}" + (f" ({why})" if why else "")

    def check(value):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValueError(f"{rule}, not a {type(value).__name__}")
        if not math.isfinite(value) or value < low or (low_open and value == low):
            raise ValueError(rule)
        return float(value)
    return check


def matching(pattern: str, rule: str) -> Check:
    """A string that matches ``pattern`` in full."""
    def check(value):
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            raise ValueError(rule)
        return value
    return check


def device(value):
    from .trainer.config import DEVICE_PATTERN

    return matching(DEVICE_PATTERN, "'auto' (cuda when present), 'cpu', 'cuda' or 'cuda:N'")(value)


def backend(value):
    from . import backends

    known = ("auto", *backends.FAMILIES, *[n for n in backends._all_names() if n not in backends.FAMILIES])
    if not isinstance(value, str) or value not in known:
        raise ValueError(f"one of {known}")
    return value


def folder(value):
    """A non-empty path (a str, or a pathlib.Path given from Python: stored as its str)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError("a non-empty folder path")
    return value


def require_every_field(cls, checks: dict[str, Check]) -> None:
    """RuntimeError unless ``checks`` has one entry per field of ``cls``, in field order
    (a field added without a check would be accepted unchecked)."""
    names = [f.name for f in dataclasses.fields(cls)]
    if list(checks) != names:
        raise RuntimeError(f"{cls.__name__} needs one check per field, in field order: {names}; got {list(checks)}")


def invalid(cfg, name: str, value: Any, allowed: str) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ConfigError(f"{type(cfg).__name__}.{name}={shown} is invalid: it must be {allowed}")


def check_fields(cfg, checks: dict[str, Check], rules: Sequence[Rule] = ()) -> None:
    """Check and normalize every field of the frozen dataclass ``cfg``, then its ``rules``;
    raises ConfigError naming the config, the field, the value and the allowed range."""
    for name, check in checks.items():
        value = getattr(cfg, name)
        try:
            object.__setattr__(cfg, name, check(value))
        except ValueError as err:
            raise invalid(cfg, name, value, str(err)) from None
    for rule in rules:
        if not rule.holds(cfg):
            raise invalid(cfg, rule.field, getattr(cfg, rule.field), rule.allowed(cfg))
