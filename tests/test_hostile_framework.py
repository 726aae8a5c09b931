"""The hostile-table runner itself fails where it must (a case it passed wrongly would hide bugs)."""

import warnings

import pytest

from hostile import case, run_case


def _raise(exc):
    def run(_):
        raise exc
    return run


@pytest.mark.parametrize("c, why", [
    (case("silent", lambda d: 1, ValueError, "x"), "nothing was raised"),
    (case("wrong-type", _raise(KeyError("x")), ValueError, "x"), "expected ValueError, got KeyError"),
    (case("wrong-phrase", _raise(ValueError("bad k")), ValueError, "d_in"), "lacks ['d_in']"),
    (case("no-warning", lambda d: 1, None, "careful", warns=UserWarning), "expected a UserWarning"),
    (case("bad-check", lambda d: 1, None, check=lambda r, d: (_ for _ in ()).throw(AssertionError("r=1"))), "r=1"),
])
def test_runner_rejects(c, why, tmp_path):
    with pytest.raises(AssertionError, match=pytest.importorskip("re").escape(why)):
        run_case(c, tmp_path)


def test_runner_accepts(tmp_path):
    run_case(case("ok", _raise(ValueError("Bad K: use 1 <= k")), ValueError, "bad k", "1 <= K"), tmp_path)
    run_case(case("warned", lambda d: warnings.warn("careful now"), None, "careful", warns=UserWarning), tmp_path)
