"""Field checks of the frozen config dataclasses (SAEConfig, TrainConfig, DemoConfig,
SyntheticDemoConfig): one set of checks and one error format for all of them.

A config's ``__post_init__`` calls :func:`check_fields` with one check per field, in field
order (the value's type, then its range), and the :class:`Rule` s that tie fields
together (``k <= d_sae``). A bad value raises :class:`~saeengine.errors.ConfigError`
``<Config>.<field>=<value> is invalid: it must be <the allowed range>``. Checks return the
value normalized (numpy ints -> int, an int given for a float -> float), so configs
compare equal, serialize and print plainly.

A check is ``value -> the value normalized`` and raises ValueError (the allowed range) or
:class:`Invalid`. A check that depends on fields before it in field order (k_aux's range
reads d_sae) is :func:`using_config`; a constraint on a later field is a :class:`Rule`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from typing import Any, Callable, NamedTuple, Sequence

from . import backends
from .errors import ConfigError

Check = Callable[[Any], Any]
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"


class Invalid(ValueError):
    """Raised by a check: the allowed range, and the value as normalized when the message
    should show that (``-1`` given for a float shows as ``-1.0``)."""

    def __init__(self, rule: str, *shown: Any):
        super().__init__(rule)
        self.rule, self.shown = rule, shown


class ConfigCheck(NamedTuple):
    """A field's check built from the config's fields before it (already checked)."""
    make: Callable[[Any], Check]


def using_config(make: Callable[[Any], Check]) -> ConfigCheck:
    """A check that depends on earlier fields: ``make(cfg)`` returns the field's check."""
    return ConfigCheck(make)


class Rule(NamedTuple):
    """A constraint between fields, checked after every field's own check and reported on
    ``field``: ``holds(cfg)`` must be true, ``allowed(cfg)`` says what the field may be,
    and ``problem(cfg)`` (default "is invalid") what is wrong."""
    field: str
    holds: Callable[[Any], bool]
    allowed: Callable[[Any], str]
    problem: Callable[[Any], str] | None = None


def _type_error(rule: str, value: Any) -> Invalid:
    return Invalid(f"{rule}, not a {type(value).__name__}")


def integer(low: int, high: int | None = None, why: str = "", *, high_name: str = "", rule: str = "") -> Check:
    """An int in [low, high] (>= low when high is None); a bool is refused (True is no
    count). ``high_name`` names the field the bound comes from ("[1, d_sae=16]"); ``rule``
    replaces the generated description."""
    bound = f"{high_name}={high}" if high_name else f"{high}"
    rule = rule or (f"an int in [{low}, {bound}]" if high is not None else f"an int >= {low}")
    rule += f" ({why})" if why else ""

    def check(value):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise _type_error(rule, value)
        if value < low or (high is not None and value > high):
            raise Invalid(rule)
        return int(value)
    return check


def real(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
         why: str = "") -> Check:
    """A finite real number in the interval from low to high, each end open or closed."""
    if math.isfinite(high):
        rule = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif (low, low_open) == (0, True):
        rule = "a positive number (finite, > 0)"
    else:
        rule = f"a finite number {'>' if low_open else '>='} {low:g}"
    rule += f" ({why})" if why else ""

    def check(value):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise _type_error(rule, value)
        value = float(value)
        inside = (math.isfinite(value) and (value > low if low_open else value >= low)
                  and (value < high if high_open else value <= high))
        if not inside:
            raise Invalid(rule, value)
        return value
    return check


def _instance(kind: type, rule: str) -> Check:
    def check(value):
        if not isinstance(value, kind):
            raise _type_error(rule, value)
        return value
    return check


boolean = _instance(bool, "True or False")
text = _instance(str, "a string")


def optional(check: Check) -> Check:
    """None, or a value that passes ``check``."""
    return lambda value: None if value is None else check(value)


def choice(choices: Sequence[str]) -> Check:
    """One of the names ``choices``."""
    choices = tuple(choices)
    rule = f"a known name; choose one of {choices}"

    def check(value):
        if not isinstance(value, str) or value not in choices:
            raise Invalid(rule)
        return value
    return check


def matching(pattern: str, rule: str) -> Check:
    """A string that matches ``pattern`` in full."""
    def check(value):
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            raise Invalid(rule)
        return value
    return check


device = matching(DEVICE_PATTERN, "'auto' (cuda when present), 'cpu', 'cuda' or 'cuda:N'")


def backend(value):
    """"auto", a family ("torch", "triton", "cuda") or an implementation name."""
    families = backends.FAMILIES
    known = ("auto", *families, *[n for n in backends.implementation_names() if n not in families])
    return choice(known)(value)


def folder(value):
    """A non-empty path (a str, or a pathlib.Path given from Python: stored as its str)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise Invalid("a non-empty folder path")
    return value


def at_most(field: str, bound: str, low: int = 1, when: Callable[[Any], bool] = lambda cfg: True) -> Rule:
    """The Rule ``low <= cfg.<field> <= cfg.<bound>`` (where ``when(cfg)``), reported as
    ``<field>=<value> exceeds <bound>=<its value>``; ``low`` is the field's own check's."""
    return Rule(field, lambda cfg: not when(cfg) or getattr(cfg, field) <= getattr(cfg, bound),
                lambda cfg: f"an int in [{low}, {bound}={getattr(cfg, bound)}]",
                lambda cfg: f"exceeds {bound}={getattr(cfg, bound)}")


def require_every_field(cls, checks: dict[str, Check | ConfigCheck]) -> None:
    """RuntimeError unless ``checks`` has one entry per field of ``cls``, in field order
    (a field added without a check would be accepted unchecked)."""
    names = [f.name for f in dataclasses.fields(cls)]
    if list(checks) != names:
        raise RuntimeError(f"{cls.__name__} needs one check per field, in field order: {names}; got {list(checks)}")


def invalid(cfg, name: str, value: Any, allowed: str, problem: str = "is invalid") -> ConfigError:
    """The one error format: ``<Config>.<field>=<value> is invalid: it must be <allowed>``."""
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ConfigError(f"{type(cfg).__name__}.{name}={shown} {problem}: it must be {allowed}")


def check_fields(cfg, checks: dict[str, Check | ConfigCheck], rules: Sequence[Rule] = ()) -> None:
    """Check and normalize every field of the frozen dataclass ``cfg`` in order, then its
    ``rules``; raises ConfigError naming the config, the field, the value and the allowed
    range (a check's own ConfigError passes through as it is)."""
    for name, check in checks.items():
        value = getattr(cfg, name)
        if isinstance(check, ConfigCheck):
            check = check.make(cfg)
        try:
            object.__setattr__(cfg, name, check(value))
        except ConfigError:
            raise
        except Invalid as err:
            raise invalid(cfg, name, *(err.shown or (value,)), err.rule) from None
        except ValueError as err:
            raise invalid(cfg, name, value, str(err)) from None
    for rule in rules:
        if not rule.holds(cfg):
            problem = rule.problem(cfg) if rule.problem else "is invalid"
            raise invalid(cfg, rule.field, getattr(cfg, rule.field), rule.allowed(cfg), problem)
