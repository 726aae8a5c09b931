"""Hostile-input tables: each case is (input, expected error type, a phrase its message must contain).

A table is a list of :class:`Case`. ``hostile_table(cases)`` turns it into one parametrized
pytest test per case, each under a timeout, so a hang fails instead of stalling CI.

A case either raises (``error`` is an exception type; the message must contain every
``phrase``, matched case-insensitively as plain text) or behaves in a documented way
(``error=None``: then ``check(result, workdir)`` must hold, and ``warns`` names a
warning that must be issued, if any).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

CASE_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path], Any]                  # gets a fresh working folder
    error: type[BaseException] | None           # None: documented behaviour, see check
    phrases: tuple[str, ...] = ()               # each must appear in str(error)
    check: Callable[[Any, Path], None] | None = None
    warns: type[Warning] | None = None
    timeout: float = CASE_TIMEOUT_S


def case(id: str, run: Callable[[Path], Any], error: type[BaseException] | None, *phrases: str,
         check: Callable[[Any, Path], None] | None = None, warns: type[Warning] | None = None,
         timeout: float = CASE_TIMEOUT_S) -> Case:
    return Case(id, run, error, tuple(phrases), check, warns, timeout)


def run_case(c: Case, workdir: Path) -> None:
    """Run one case and fail with a description of what went wrong."""
    if c.error is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = c.run(workdir)
        if c.warns is not None:
            assert any(issubclass(w.category, c.warns) for w in caught), \
                f"{c.id}: expected a {c.warns.__name__}, got {[str(w.message) for w in caught]}"
            for phrase in c.phrases:
                assert any(phrase.lower() in str(w.message).lower() for w in caught), \
                    f"{c.id}: no warning mentions {phrase!r}: {[str(w.message) for w in caught]}"
        assert c.check is not None or c.warns is not None, f"{c.id}: a no-error case needs a check or a warning"
        if c.check is not None:
            c.check(result, workdir)
        return
    try:
        c.run(workdir)
    except c.error as exc:
        message = str(exc).lower()
        missing = [p for p in c.phrases if p.lower() not in message]
        assert not missing, f"{c.id}: the {type(exc).__name__} message lacks {missing}: {exc}"
        return
    except BaseException as exc:  # the wrong kind of failure is a failure of the case
        raise AssertionError(f"{c.id}: expected {c.error.__name__}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{c.id}: expected {c.error.__name__}, but nothing was raised (a silent result)")


def hostile_table(cases: Sequence[Case]):
    """A pytest test function running every case of the table (one test id per case)."""
    ids = [c.id for c in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ValueError(f"hostile table has duplicate case ids {duplicated}")

    @pytest.mark.parametrize("hostile_case", [pytest.param(c, id=c.id, marks=pytest.mark.timeout(c.timeout))
                                              for c in cases])
    def test_hostile(hostile_case: Case, tmp_path: Path) -> None:
        run_case(hostile_case, tmp_path)

    return test_hostile
