"""The GPU validation record: which implementations' current sources passed the GPU tests.

``saeengine/gpu_validation.json`` holds, per implementation key ("op/name"), the hash of
the sources it was validated with, the GPU, the commit and the date. A GPU test run writes
it (``tests/conftest.py`` with ``SAEENGINE_RECORD_VALIDATION=PATH``, which
``benchmarks/device_session.sh`` sets). ``backend="auto"`` takes a kernel implementation
only while its current source hash equals the recorded one, so changing a kernel file
takes it out of "auto" until a GPU has passed its tests again; naming it still runs it.

The hash is over the implementation's declared sources (``Implementation.sources`` in
:mod:`saeengine.backends`), as found in this installation: the kernels/ directory
installed as ``saeengine.kernels``, the package itself, and csrc/ beside the package in a
source checkout. An installation without some source (a wheel has no csrc/) has no hash,
and those implementations run only when named.

Marking a GPU test: ``@pytest.mark.validates("op/name", ...)`` (``tests/validation_plugin.py``
records a key only when every test marked with it ran and passed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

from saeengine.backends import IMPLEMENTATIONS, Implementation

RECORD_FILE = Path(__file__).with_name("gpu_validation.json")
RECORD_VERSION = 1


def _source_path(relative: str) -> Path | None:
    package = Path(__file__).resolve().parent
    top, _, rest = relative.partition("/")
    if top == "kernels":
        import saeengine.kernels

        path = Path(saeengine.kernels.__file__).resolve().parent / rest
    elif top == "saeengine":
        path = package / rest
    else:  # csrc/, CMake files: only in a source checkout, beside the package
        path = package.parent / relative
    return path if path.is_file() else None


def source_hash(impl: Implementation) -> str | None:
    """sha256 over the implementation's sources (path and bytes, in declared order), or
    None when a source is not in this installation (or it has none)."""
    if not impl.sources:
        return None
    digest = hashlib.sha256()
    for relative in impl.sources:
        path = _source_path(relative)
        if path is None:
            return None
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_record(path: Path | str = RECORD_FILE) -> dict[str, dict]:
    """{"op/name": {"source_hash", "gpu", "commit", "date", "tests"}} (empty when absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") != RECORD_VERSION:
        raise ValueError(f"{path}: GPU validation record version {data.get('version')!r}, expected "
                         f"{RECORD_VERSION}; regenerate it with a GPU test run")
    return data["implementations"]


@functools.lru_cache(maxsize=None)
def _cached_record() -> dict[str, dict]:
    return load_record(RECORD_FILE)  # looked up at call time, so tests can point it elsewhere


@functools.lru_cache(maxsize=None)
def cached_validation_problem(impl: Implementation) -> str:
    """:func:`validation_problem`, computed once per implementation and process: what
    ``backend="auto"`` reads on every call, so no op call hashes files. A process that
    edits kernel sources (tests) calls :func:`refresh`."""
    return validation_problem(impl)


def refresh() -> None:
    """Forget the cached record and validation results (after writing or editing them)."""
    _cached_record.cache_clear()
    cached_validation_problem.cache_clear()


def validation_problem(impl: Implementation) -> str:
    """"" when ``impl`` needs no GPU validation or its current sources passed; else why not."""
    if not impl.needs_validation:
        return ""
    current = source_hash(impl)
    if current is None:
        return "its sources are not in this installation, so its GPU validation cannot be checked; name it to use it"
    entry = _cached_record().get(impl.key)
    if entry is None:
        return "its GPU tests have never passed on a GPU; name it to use it"
    if entry.get("source_hash") != current:
        return (f"its sources changed since its GPU tests passed ({entry.get('gpu', '?')}, "
                f"commit {entry.get('commit', '?')}); name it to use it")
    return ""


def implementations_by_key() -> dict[str, Implementation]:
    """{"op/name": Implementation} over every op."""
    return {impl.key: impl for impls in IMPLEMENTATIONS.values() for impl in impls}


def write_record(passed: list[str], *, gpu: str, commit: str, date: str, tests: dict[str, int],
                 path: Path | str = RECORD_FILE) -> dict[str, dict]:
    """Record the implementation keys in ``passed`` (every GPU test of each passed) with
    their current source hashes, keeping the other entries. Written atomically.

    Raises ValueError for a key that names no implementation needing validation, or one
    whose sources are not all in this installation (no hash to record)."""
    from saeengine._atomic import atomic_write_bytes

    by_key = implementations_by_key()
    hashes = {}
    for key in passed:
        impl = by_key.get(key)
        if impl is None or not impl.needs_validation:
            raise ValueError(f"{key!r} is not an implementation that needs GPU validation; "
                             f"choose from {sorted(k for k, i in by_key.items() if i.needs_validation)}")
        hashes[key] = source_hash(impl)
        if hashes[key] is None:
            missing = [s for s in impl.sources if _source_path(s) is None]
            raise ValueError(f"{key}: its sources {missing} are not in this installation, so there is no "
                             f"hash to record; run the GPU tests from a source checkout")
    record = load_record(path)
    for key in passed:
        record[key] = {"source_hash": hashes[key], "gpu": gpu, "commit": commit, "date": date,
                       "tests": tests.get(key, 0)}
    payload = {"version": RECORD_VERSION, "implementations": dict(sorted(record.items()))}
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2) + "\n").encode())
    refresh()
    return record


def current_commit() -> str:
    """The commit of the code under test, for records and benchmark stamps:
    ``SAEENGINE_COMMIT`` when set (a copied tree without .git, e.g. on a lent GPU machine),
    else ``git rev-parse --short HEAD`` of the checkout holding this package, with "+dirty"
    when tracked files differ from it; "unknown" when neither is there."""
    named = os.environ.get("SAEENGINE_COMMIT", "").strip()
    if named:
        return named
    checkout = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def run_stamp() -> dict:
    """What every benchmark and result file records of its run: the UTC date, the commit
    (:func:`current_commit`), the torch and saeengine versions, and the machine (host, CPU,
    cores, load average, Python, OS, the GPU's name or None)."""
    import datetime as dt
    import platform

    import torch

    from saeengine import __version__

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": current_commit(),
            "torch": torch.__version__, "saeengine": __version__,
            "machine": {"node": platform.node(), "cpu": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                        "python": platform.python_version(), "system": platform.system(),
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
