"""Config dataclasses as command-line options: one ``--field`` per dataclass field, its
attribute docstring as the help, its value parsed strictly from the field's type.

Booleans are on/off options (``--x`` / ``--no-x``); ints are whole numbers (``1e6`` too,
not ``1.5``); floats are finite. An option not given stays out of the namespace, so the
dataclass supplies the default and a caller can tell a given value from the default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import decimal
import inspect
import math
from typing import Any, Callable

TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


def parse_value(kind: type, text: str) -> Any:
    """``text`` as a value of a config field of type ``kind`` (bool, int, float or str),
    strictly: booleans are true/false/1/0/yes/no, ints are whole numbers (``1e6`` too, not
    ``1.5``), floats are finite. Raises ValueError saying what was expected."""
    word = text.strip()
    if kind is bool:
        if word.lower() in TRUE_WORDS + FALSE_WORDS:
            return word.lower() in TRUE_WORDS
        raise ValueError(f"expected true or false (also 1/0, yes/no), got {text!r}")
    if kind is int:
        try:
            return int(word)
        except ValueError:
            pass
        try:  # exact scientific notation: 1e6, 2.5e3
            number = decimal.Decimal(word) if "e" in word.lower() else None
        except decimal.InvalidOperation:
            number = None
        if number is not None and number.is_finite() and number == number.to_integral_value():
            return int(number)
        raise ValueError(f"expected a whole number, got {text!r}")
    if kind is float:
        try:
            number = float(word)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {text!r}")
        return number
    return word


def _flag_type(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse_value(kind, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = kind.__name__
    return convert


def train_choices() -> dict[str, tuple[str, ...]]:
    """The string fields of TrainConfig that take one of a fixed set of values."""
    from .config import ARCHITECTURES, NORMALIZATIONS
    from .trainer.config import AUTOCAST, B_DEC_INITS, MOMENT_DTYPES, OPTIMIZERS

    return {"architecture": tuple(ARCHITECTURES), "normalization": NORMALIZATIONS, "b_dec_init": B_DEC_INITS,
            "autocast": AUTOCAST, "optimizer": OPTIMIZERS, "moment_dtype": MOMENT_DTYPES}


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (a string literal right after the field) of a dataclass."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def flag(field: str) -> str:
    """The option of a field: ``d_sae`` -> ``--d-sae``."""
    return f"--{field.replace('_', '-')}"


def _show_default(value: object) -> str:
    return "empty" if value == "" else str(value)


def add_dataclass_options(parser: argparse.ArgumentParser, cls, choices: dict[str, tuple] | None = None) -> None:
    """One option per field of ``cls`` (``--no-x`` too for booleans), its docstring as help.

    An option not given stays out of the namespace (default SUPPRESS), so that the caller
    can tell a given value from the default; the dataclass supplies the default."""
    docs, choices = _field_docs(cls), choices or {}
    for f in dataclasses.fields(cls):
        help_text = f"{docs.get(f.name, '')} (default: {_show_default(f.default)})".replace("%", "%%")
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag(f.name), dest=f.name, type=_flag_type(kind), choices=choices.get(f.name),
                                default=argparse.SUPPRESS, help=help_text)


def given(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def dataclass_from_args(cls, args: argparse.Namespace):
    """``cls`` built from the fields given on the command line (the rest take defaults)."""
    return cls(**given(cls, args))
