"""pytest plugin: record which implementations passed their GPU tests.

Each GPU test of a kernel implementation carries ``@pytest.mark.validates("op/name", ...)``
(keys of :data:`saeengine.backends.IMPLEMENTATIONS` that need validation; a key that names
none stops the run at collection). With ``SAEENGINE_RECORD_VALIDATION=PATH`` set and a
CUDA GPU visible, a key is written to the record at PATH
(:func:`saeengine.validation.write_record`) once every test marked with it in this session
has run and passed: no failure or error in any phase, no skip or xfail, at least one pass.
A key with a failed, skipped, deselected or unfinished test is not written, so its entry
already in PATH (with its old source hash) stays, and "auto" keeps passing over it.
Writing each key as soon as its tests are done keeps what passed when a time limit stops
the run. Loaded by tests/conftest.py.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from pathlib import Path

import pytest

MARKER = "validates"
ENV = "SAEENGINE_RECORD_VALIDATION"


class Tally:
    """Outcomes of the marked tests of one session, and the keys they decide.

    ``keys_of``: {test id: the keys its markers name}. Feed each phase's report to
    :meth:`report` (setup, call, teardown; a test is finished at its teardown) and each
    deselected test to :meth:`deselect`."""

    def __init__(self, keys_of: dict[str, tuple[str, ...]]):
        self.keys_of = dict(keys_of)
        self.tests_of: dict[str, list[str]] = defaultdict(list)
        for test, keys in self.keys_of.items():
            for key in keys:
                self.tests_of[key].append(test)
        self.state: dict[str, str] = {}  # test -> "passed" / "failed" / "skipped" so far
        self.final: dict[str, str] = {}  # finished tests: the above, or "deselected"

    def deselect(self, test: str, keys: tuple[str, ...]) -> None:
        if test not in self.keys_of:
            self.keys_of[test] = keys
            for key in keys:
                self.tests_of[key].append(test)
        self.final[test] = "deselected"

    def report(self, test: str, when: str, outcome: str, wasxfail: bool = False) -> list[str]:
        """Take one phase's outcome ("passed", "failed", "skipped"); returns the keys that
        this report completes with every test passed (each returned once)."""
        if test not in self.keys_of or test in self.final:
            return []
        if outcome == "failed":
            self.state[test] = "failed"
        elif outcome == "skipped" or wasxfail:  # an xfail or a surprise pass is no validation
            self.state.setdefault(test, "skipped")
        elif when == "call":
            self.state.setdefault(test, "passed")
        if when != "teardown":
            return []
        self.final[test] = self.state.get(test, "skipped")  # no call phase ran: not a pass
        return [key for key in self.keys_of[test] if self.key_passed(key)]

    def key_passed(self, key: str) -> bool:
        tests = self.tests_of.get(key, [])
        return bool(tests) and all(self.final.get(test) == "passed" for test in tests)

    def passed(self) -> dict[str, int]:
        """{key: number of its tests} for every key whose tests all finished and passed."""
        return {key: len(tests) for key, tests in sorted(self.tests_of.items()) if self.key_passed(key)}

    def why_not(self, key: str) -> str:
        """Why ``key`` is not recorded ("" when it passed)."""
        if self.key_passed(key):
            return ""
        for word in ("failed", "skipped", "deselected"):
            tests = [t for t in self.tests_of[key] if self.final.get(t, self.state.get(t)) == word]
            if tests:
                return f"{len(tests)} test(s) {word}, e.g. {tests[0]}"
        unfinished = [t for t in self.tests_of[key] if t not in self.final]
        return f"{len(unfinished)} test(s) did not finish, e.g. {unfinished[0]}"


def marked_keys(item: pytest.Item) -> tuple[str, ...]:
    """The keys of every ``validates`` marker on ``item`` (function, class, module, param)."""
    keys: list[str] = []
    for mark in item.iter_markers(MARKER):
        keys += [key for key in mark.args if key not in keys]
    return tuple(keys)


def check_keys(items: list[pytest.Item]) -> None:
    """Every marker names at least one implementation that needs GPU validation."""
    from saeengine.validation import implementations_by_key

    valid = sorted(key for key, impl in implementations_by_key().items() if impl.needs_validation)
    for item in items:
        for mark in item.iter_markers(MARKER):
            bad = [key for key in mark.args if key not in valid]
            if not mark.args or bad:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.validates{mark.args!r} must name "
                                        f"implementations that need GPU validation ({bad or 'none given'} "
                                        f"is not one); choose from {', '.join(valid)}")


class Recorder:
    """Writes the keys a GPU session validates to ``path`` as they complete."""

    def __init__(self, path: Path, gpu: str, commit: str):
        self.path, self.gpu, self.commit = path, gpu, commit
        self.date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.tally = Tally({})
        self.deselected: list[pytest.Item] = []
        self.written: list[str] = []
        self.unwritable: dict[str, str] = {}

    def pytest_deselected(self, items):
        self.deselected += [item for item in items if marked_keys(item)]

    def pytest_collection_finish(self, session):
        self.tally = Tally({item.nodeid: marked_keys(item) for item in session.items if marked_keys(item)})
        for item in self.deselected:
            self.tally.deselect(item.nodeid, marked_keys(item))

    def pytest_runtest_logreport(self, report):
        done = self.tally.report(report.nodeid, report.when, report.outcome, bool(getattr(report, "wasxfail", "")))
        self._write([key for key in done if key not in self.written and key not in self.unwritable])

    def _write(self, keys: list[str]) -> None:
        from saeengine.validation import write_record

        counts = self.tally.passed()
        for key in keys:
            try:
                write_record([key], gpu=self.gpu, commit=self.commit, date=self.date, tests=counts, path=self.path)
                self.written.append(key)
            except ValueError as err:  # e.g. sources missing from this installation
                self.unwritable[key] = str(err)

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        tr.section("GPU validation record")
        tr.write_line(f"{self.path}: recorded {', '.join(self.written) or 'nothing'} ({self.gpu}, {self.commit})")
        for key in sorted(self.tally.tests_of):
            reason = self.unwritable.get(key) or self.tally.why_not(key)
            if reason:
                tr.write_line(f"not recorded: {key}: {reason}")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}(*keys): a GPU test of the implementations 'op/name'; with "
                                       f"{ENV}=PATH a GPU run records the keys whose tests all passed")
    path = os.environ.get(ENV, "").strip()
    if not path:
        return
    import torch

    if not torch.cuda.is_available():
        config.issue_config_time_warning(
            pytest.PytestConfigWarning(f"{ENV} is set but no CUDA GPU is visible: nothing is recorded"), stacklevel=2)
        return
    from saeengine.validation import current_commit, load_record

    if not Path(path).parent.is_dir():
        raise pytest.UsageError(f"{ENV}={path}: its folder does not exist; create it or name another path")
    try:
        load_record(path)  # an unreadable record stops the run here, not after the tests
    except ValueError as err:
        raise pytest.UsageError(f"{ENV}={path}: {err}") from err
    config.pluginmanager.register(Recorder(Path(path), torch.cuda.get_device_name(0), current_commit()),
                                  "saeengine-validation-recorder")


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection: every marker is checked
def pytest_collection_modifyitems(config, items):
    check_keys(items)
