"""``saeengine train --sweep FIELD=V1,V2``: the grid of TrainConfig values a sweep spans, and
one named TrainConfig per point of it.

A bad spec (no ``=``, an unknown or unsweepable field, a field swept twice or also set by
a flag, an empty, unparsable or repeated value) and two points that would share a folder
are usage errors (exit code 2), each naming the spec and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from typing import Any, Sequence

from .cli_failures import UsageError, one_line
from .cli_options import flag, parse_value, train_choices

# The fields TrainConfig.run_name shows: a sweep of these keeps the default names.
RUN_NAME_FIELDS = ("architecture", "d_sae", "k", "lr")
_RUN_WIDE = "it is one setting of the whole run"


def unsweepable() -> dict[str, str]:
    """Fields a sweep may not vary, with the reason."""
    from .trainer.config import SHARED_FIELDS

    reasons = {field: "every SAE of a sweep reads the same batches, so they share it" for field in SHARED_FIELDS}
    reasons.update(name="each SAE of a sweep is named after its swept values (--name sets their common prefix)",
                   log_every=_RUN_WIDE, progress=_RUN_WIDE, tensorboard=_RUN_WIDE, wandb_project=_RUN_WIDE)
    return reasons


def parse_sweeps(specs: Sequence[str], given: dict[str, Any]) -> list[dict[str, Any]]:
    """``--sweep FIELD=V1,V2`` specs -> the grid: one {TrainConfig field: value} per
    combination, in the order of the specs (the last varies fastest). ``given`` holds the
    fields set by flags.

    Values are split on commas, or on semicolons where the spec has one (for values that
    hold commas: ``matryoshka_prefixes=8,64;16,64``). Raises UsageError naming the spec for
    a missing ``=``, an unknown field (with the closest name), a field that cannot be
    swept, swept twice or also set by a flag, an empty, unparsable or repeated value."""
    from .trainer import TrainConfig

    fields = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    refused, choices = unsweepable(), train_choices()
    grid: list[dict[str, Any]] = [{}]
    swept: set[str] = set()
    for spec in specs:
        key, equals, values = spec.partition("=")
        field = key.strip().lstrip("-").replace("-", "_")
        if not equals or not field:
            raise UsageError(f"--sweep {spec!r}: expected FIELD=V1,V2,..., e.g. --sweep k=16,32")
        if field not in fields:
            close = difflib.get_close_matches(field, list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(fields)}"
            raise UsageError(f"--sweep {spec!r}: TrainConfig has no field {field!r}; {hint}")
        if field in refused:
            raise UsageError(f"--sweep {spec!r}: {field} cannot be swept: {refused[field]}; "
                             f"set it once with {flag(field)}")
        if field in swept:
            raise UsageError(f"--sweep {spec!r}: {field} is swept twice; give all its values in one --sweep")
        if field in given:
            raise UsageError(f"--sweep {spec!r} and {flag(field)} {given[field]} both set {field}; drop one")
        swept.add(field)
        parsed: list[Any] = []
        for number, text in enumerate(values.split(";" if ";" in values else ","), 1):
            if not text.strip():
                raise UsageError(f"--sweep {spec!r}: value {number} is empty; give FIELD=V1,V2,... without "
                                 f"empty values")
            try:
                value = parse_value(fields[field], text)
            except ValueError as err:
                raise UsageError(f"--sweep {spec!r}: {field} takes {fields[field].__name__} values: {err}") from None
            if field in choices and value not in choices[field]:
                raise UsageError(f"--sweep {spec!r}: {field}={value!r}; choose from {', '.join(choices[field])}")
            if value in parsed:
                raise UsageError(f"--sweep {spec!r}: the value {text.strip()!r} is given twice")
            parsed.append(value)
        grid = [{**point, field: value} for point, value in itertools.product(grid, parsed)]
    return grid


def _name_part(field: str, value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._]", "_", f"{field}{value}")


def sweep_configs(given: dict[str, Any], grid: list[dict[str, Any]]) -> list:
    """One TrainConfig per grid point (``parse_sweeps``), each named after its swept values.

    Without ``--name`` a config keeps its default name (TrainConfig.run_name) plus
    ``-<field><value>`` for each swept field that name does not show; with ``--name P`` it
    is ``P-<field><value>...`` over every swept field. Raises UsageError when two points get
    the same name, and the config's own error (naming the point) for an invalid one."""
    from .errors import ConfigError
    from .trainer import TrainConfig

    base = TrainConfig(**given)  # the flags' own errors first, without a sweep in the message
    if grid == [{}]:
        return [base]
    configs, names = [], {}
    for point in grid:
        described = ", ".join(f"{field}={value}" for field, value in point.items())
        try:
            cfg = dataclasses.replace(base, **point)
        except ValueError as err:
            raise ConfigError(f"{one_line(err)} (in the sweep point {described})") from err
        shown = () if base.name else RUN_NAME_FIELDS
        parts = [_name_part(field, value) for field, value in point.items() if field not in shown]
        name = "-".join([base.name or cfg.run_name, *parts])
        if name in names:
            fix = ("the values differ only in characters that a folder name replaces with '_'" if base.name else
                   "the default names show lr to 2 significant digits; pass --name PREFIX to name the SAEs "
                   "after the exact values")
            raise UsageError(f"--sweep: the points {names[name]} and {described} would both be saved as {name!r} "
                             f"({fix})")
        names[name] = described
        configs.append(dataclasses.replace(cfg, name=name))
    return configs
