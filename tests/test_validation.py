"""The GPU validation record: hashes come from the sources, auto takes only implementations
whose current hash passed, and the pytest plugin records only keys whose GPU tests all
passed. No GPU needed: a fake CUDA device, copied sources and synthetic test outcomes."""

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import saeengine.backends as backends
from saeengine import validation

import validation_plugin
from validation_plugin import Tally

TESTS = Path(__file__).resolve().parent
CUDA = torch.device("cuda")
VALIDATED = [impl for impls in backends.IMPLEMENTATIONS.values() for impl in impls if impl.needs_validation]
STAMP = dict(gpu="Test GPU", commit="abc1234", date="2026-01-01T00:00:00+00:00")


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Every declared source copied under tmp_path (a placeholder where this checkout lacks
    it yet), and validation reading them from there. Returns the copy's root."""
    root = tmp_path / "src"
    for relative in sorted({s for impl in VALIDATED for s in impl.sources}):
        real = validation._source_path(relative)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(real.read_bytes() if real else f"# {relative}\n".encode())
    monkeypatch.setattr(validation, "_source_path", lambda rel: root / rel if (root / rel).is_file() else None)
    return root


@pytest.fixture
def record(tmp_path, monkeypatch):
    """An empty record file that auto reads instead of the package's."""
    path = tmp_path / "gpu_validation.json"
    monkeypatch.setattr(validation, "RECORD_FILE", path)
    validation.refresh()
    yield path
    validation.refresh()


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device on which the extension and triton count as present."""
    monkeypatch.delenv("SAEENGINE_BACKEND", raising=False)
    monkeypatch.setattr(backends, "load_extension", lambda: (True, ""))
    monkeypatch.setattr(backends, "_triton_import_problem", lambda: "")
    backends._log_once.cache_clear()
    yield CUDA
    backends._log_once.cache_clear()


def test_each_source_file_keys_exactly_the_implementations_listing_it(sources, record):
    validation.write_record([impl.key for impl in VALIDATED], tests={}, path=record, **STAMP)
    assert all(validation.validation_problem(impl) == "" for impl in VALIDATED)
    before = {impl.key: validation.source_hash(impl) for impl in VALIDATED}
    assert None not in before.values()
    for a in VALIDATED:  # equal hashes exactly where the declared sources are the same
        assert [b.key for b in VALIDATED if before[b.key] == before[a.key]] == \
               [b.key for b in VALIDATED if b.sources == a.sources]
    for relative in sorted({s for impl in VALIDATED for s in impl.sources}):
        original = (sources / relative).read_bytes()
        (sources / relative).write_bytes(original + b"\n# one edit\n")
        for impl in VALIDATED:
            listed = relative in impl.sources
            assert (validation.source_hash(impl) != before[impl.key]) == listed, (relative, impl.key)
            problem = validation.validation_problem(impl)
            assert bool(problem) == listed, (relative, impl.key, problem)
            if listed:
                assert "changed since its GPU tests passed" in problem and "Test GPU" in problem
        (sources / relative).write_bytes(original)
    assert {impl.key: validation.source_hash(impl) for impl in VALIDATED} == before


def test_the_hash_reads_this_checkouts_files():
    """Where the checkout has a declared source, the installed path found is that file
    (kernels/ is installed as saeengine.kernels)."""
    checkout = TESTS.parent
    found = 0
    for relative in sorted({s for impl in VALIDATED for s in impl.sources}):
        if (checkout / relative).is_file():
            path = validation._source_path(relative)
            assert path is not None and path.read_bytes() == (checkout / relative).read_bytes(), relative
            found += 1
    assert found >= 10  # csrc/ and kernels/ at least


def test_pure_torch_code_needs_no_record(record):
    for impls in backends.IMPLEMENTATIONS.values():
        reference = [impl for impl in impls if impl.name == "reference"]
        assert reference and not reference[0].needs_validation and reference[0].sources == ()
        assert validation.source_hash(reference[0]) is None and validation.validation_problem(reference[0]) == ""


def test_a_missing_source_gives_no_hash_and_cannot_be_recorded(sources, record):
    radix = backends.implementation("topk_select", "radix")
    (sources / "csrc/topk_select.cu").unlink()
    assert validation.source_hash(radix) is None
    assert "not in this installation" in validation.validation_problem(radix)
    with pytest.raises(ValueError, match=r"csrc/topk_select.cu.*not in this installation"):
        validation.write_record([radix.key], tests={}, path=record, **STAMP)
    for key in ("topk_select/reference", "topk_select/bogus"):
        with pytest.raises(ValueError, match="not an implementation that needs GPU validation"):
            validation.write_record([key], tests={}, path=record, **STAMP)
    assert not record.exists()


def test_writing_keeps_the_other_entries_and_updates_the_hash(sources, record):
    validation.write_record(["topk_select/radix"], tests={"topk_select/radix": 3}, path=record, **STAMP)
    validation.write_record(["mark_fired/cuda"], tests={}, path=record, **{**STAMP, "commit": "def5678"})
    (sources / "csrc/topk_select.cu").write_bytes(b"// rewritten\n")
    validation.write_record(["topk_select/radix"], tests={"topk_select/radix": 4}, path=record, **STAMP)
    entries = json.loads(record.read_text())["implementations"]
    assert sorted(entries) == ["mark_fired/cuda", "topk_select/radix"]
    assert entries["topk_select/radix"]["tests"] == 4
    assert entries["topk_select/radix"]["source_hash"] == validation.source_hash(
        backends.implementation("topk_select", "radix"))
    assert entries["mark_fired/cuda"]["commit"] == "def5678"
    assert validation.load_record(record) == entries


def test_a_record_for_the_current_hash_makes_auto_choose_it(sources, record, fake_gpu, caplog):
    with caplog.at_level(logging.INFO, logger="saeengine"):
        assert backends.choose("auto", "topk_select", fake_gpu).name == "reference"
    assert any("passes over 'radix'" in r.getMessage() and "never passed" in r.getMessage() for r in caplog.records)
    assert backends.choose("radix", "topk_select", fake_gpu).name == "radix"  # naming it skips the gate

    validation.write_record(["topk_select/radix", "topk_encode/fused"], tests={}, path=record, **STAMP)
    assert backends.choose("auto", "topk_select", fake_gpu).name == "radix"
    assert backends.choose("auto", "topk_encode", fake_gpu).name == "fused"
    assert backends.choose("auto", "mark_fired", fake_gpu).name == "reference"  # not recorded

    (sources / "csrc/topk_select.cu").write_bytes(b"// an edit after the GPU run\n")
    # auto checks the sources once per process; a new process (here: a refresh) sees the edit
    assert backends.choose("auto", "topk_select", fake_gpu).name == "radix"
    validation.refresh()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saeengine"):
        assert backends.choose("auto", "topk_select", fake_gpu).name == "reference"
    assert any("sources changed" in r.getMessage() for r in caplog.records)
    assert backends.choose("auto", "topk_encode", fake_gpu).name == "fused"  # its sources did not change


# ----- the plugin's decision: only keys whose marked tests all ran and passed ------------
def run(tally: Tally, test: str, call: str = "passed", setup: str = "passed", teardown: str = "passed",
        wasxfail: bool = False) -> list[str]:
    """Feed one test's three phase reports; returns the keys that completed with it."""
    done = tally.report(test, "setup", setup)
    if setup == "passed":
        done += tally.report(test, "call", call, wasxfail)
    return done + tally.report(test, "teardown", teardown)


def test_a_key_is_recorded_only_when_all_its_tests_passed():
    tally = Tally({"a1": ("A",), "ab": ("A", "B"), "b_fails": ("B",), "c_skips": ("C",), "d_teardown": ("D",),
                   "e_setup": ("E",), "f_xfail": ("F",), "g_unfinished": ("G",), "h": ("H",)})
    assert run(tally, "a1") == []  # A still waits for "ab"
    assert run(tally, "ab") == ["A"]  # B waits for its other test
    assert run(tally, "b_fails", call="failed") == []
    assert run(tally, "c_skips", call="skipped") == []
    assert run(tally, "d_teardown", teardown="failed") == []
    assert run(tally, "e_setup", setup="failed") == []
    assert run(tally, "f_xfail", call="skipped", wasxfail=True) == []
    tally.report("g_unfinished", "setup", "passed")
    tally.report("g_unfinished", "call", "passed")  # stopped before its teardown (a time limit)
    tally.deselect("h", ("H",))
    assert tally.passed() == {"A": 2}
    assert "failed" in tally.why_not("B") and "skipped" in tally.why_not("C")
    assert "failed" in tally.why_not("D") and "failed" in tally.why_not("E") and "skipped" in tally.why_not("F")
    assert "did not finish" in tally.why_not("G") and "deselected" in tally.why_not("H")


def test_a_surprise_pass_and_a_skip_in_setup_are_no_validation():
    tally = Tally({"xpass": ("A",), "setup_skip": ("B",), "ok": ("C",)})
    assert run(tally, "xpass", wasxfail=True) == []
    assert run(tally, "setup_skip", setup="skipped") == []
    assert run(tally, "ok") == ["C"]
    assert run(tally, "ok") == []  # a repeated report changes nothing
    assert tally.passed() == {"C": 1}


class FakeMark:
    def __init__(self, *args):
        self.args = args


class FakeItem:
    def __init__(self, nodeid, *marks):
        self.nodeid, self.marks = nodeid, marks

    def iter_markers(self, name):
        assert name == "validates"
        return iter(self.marks)


def test_markers_must_name_implementations_that_need_validation():
    validation_plugin.check_keys([FakeItem("t::ok", FakeMark("topk_select/radix", "topk_encode/fused"))])
    for marks in [(FakeMark("topk_select/reference"),), (FakeMark("topk_encode/tiled"),), (FakeMark(),)]:
        with pytest.raises(pytest.UsageError, match=r"t::bad.*choose from .*topk_select/radix"):
            validation_plugin.check_keys([FakeItem("t::bad", *marks)])
    item = FakeItem("t::two", FakeMark("topk_select/radix"), FakeMark("mark_fired/cuda", "topk_select/radix"))
    assert validation_plugin.marked_keys(item) == ("topk_select/radix", "mark_fired/cuda")


def test_every_implementation_that_needs_validation_has_a_marked_gpu_test():
    named = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "validates":
                named |= {arg.value for arg in node.args if isinstance(arg, ast.Constant)}
    assert named == {impl.key for impl in VALIDATED}


INNER_TESTS = '''
import pytest

@pytest.mark.validates("topk_select/radix")
def test_select():
    pass

@pytest.mark.validates("topk_select/radix", "mark_fired/cuda")
def test_shared():
    pass

@pytest.mark.validates("mark_fired/cuda")
def test_fired_fails():
    assert False

@pytest.mark.validates("row_sparse_adam/cuda")
def test_adam_skips():
    pytest.skip("no extension")

@pytest.mark.validates("resample_dead/cuda")
@pytest.mark.parametrize("n", [1, 2])
def test_resample(n):
    pass
'''


def test_the_plugin_records_what_a_gpu_session_passed(tmp_path):
    """A pytest run with CUDA faked: the passing key is written with its hash, test count,
    GPU and commit; the failing key keeps its old entry; skipped and deselected keys stay
    out; the summary says why."""
    (tmp_path / "conftest.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n"
                                          "torch.cuda.get_device_name = lambda *a: 'Fake GPU'\n")
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    path = tmp_path / "record.json"
    old = {"source_hash": "old", "gpu": "H100", "commit": "0000000", "date": "2025-01-01", "tests": 1}
    path.write_text(json.dumps({"version": 1, "implementations": {"mark_fired/cuda": old, "sparse_decode/cuda": old}}))
    env = {**os.environ, "SAEENGINE_RECORD_VALIDATION": str(path), "SAEENGINE_COMMIT": "abc1234",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "validation_plugin",
                             "--deselect", "test_inner.py::test_resample[2]", "test_inner.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr  # the failing test
    entries = json.loads(path.read_text())["implementations"]
    assert sorted(entries) == ["mark_fired/cuda", "sparse_decode/cuda", "topk_select/radix"]
    assert entries["mark_fired/cuda"] == old and entries["sparse_decode/cuda"] == old
    radix = entries["topk_select/radix"]
    assert radix["source_hash"] == validation.source_hash(backends.implementation("topk_select", "radix"))
    assert (radix["tests"], radix["gpu"], radix["commit"]) == (2, "Fake GPU", "abc1234")
    assert "not recorded: mark_fired/cuda: 1 test(s) failed" in result.stdout
    assert "not recorded: row_sparse_adam/cuda: 1 test(s) skipped" in result.stdout
    assert "not recorded: resample_dead/cuda: 1 test(s) deselected" in result.stdout
