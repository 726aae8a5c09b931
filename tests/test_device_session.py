"""benchmarks/device_session.sh: its stages fit one 9-minute device call by their own
limits, and its CPU dry run runs every stage and leaves what a device call brings back."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_session.sh"
CALL_S, GPU_TESTS_S = 540, 180  # one call of at most 9 minutes; the GPU tests at most 3 of them
FILES_BACK = 8  # what a device call returns from $OUT at most
STAGES = ["build", "gputests", "synctest", "bench", "cudaops", "trainer", "tune", "encode"]


def session(*args, out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})


def plan(tmp_path, **env) -> dict[str, int]:
    result = session("--plan", out=tmp_path / "unused", **env)
    assert result.returncode == 0, result.stderr
    rows = [line.split()[:2] for line in result.stdout.splitlines() if not line.startswith("total")]
    return {name: int(limit) for name, limit in rows}


def test_the_stage_limits_fit_one_call(tmp_path):
    limits = plan(tmp_path)
    assert list(limits) == STAGES
    assert sum(limits.values()) <= CALL_S
    assert limits["gputests"] + limits["synctest"] <= GPU_TESTS_S
    assert not (tmp_path / "unused").exists()  # --plan writes nothing


def test_the_dry_run_runs_every_stage_and_writes_what_comes_back(tmp_path):
    out = tmp_path / "out"
    result = session("--dry-run", out=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.json", "cuda_ops.json", "encode.json", "gpu_validation.json", "session.log", "timings.json",
                     "trainer.json", "tune.json"]
    assert len(files) <= FILES_BACK and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    timings = json.loads((out / "timings.json").read_text())
    assert timings["dry_run"] is True and timings["plan"] == plan(tmp_path)
    assert list(timings["stages"]) == STAGES
    for name, stage in timings["stages"].items():
        assert stage["rc"] == 0, (name, stage)
        assert 0 < stage["seconds"] <= stage["limit_s"] == timings["plan"][name]
    log = (out / "session.log").read_text()
    for name in STAGES:
        assert f"=== {name} (limit" in log and f"--- {name}: rc 0" in log
    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] is True and bench["meta"]["commit"] == timings["commit"]
    assert len(bench["encode"][0]["gemm_ms_q"]) == 3
    for name in ("cuda_ops", "tune"):
        assert json.loads((out / f"{name}.json").read_text())["complete"] is True, name
    assert json.loads((out / "trainer.json").read_text())["trainer_tokens_per_s"] > 0
    # The record starts as the committed one; a CPU run adds nothing to it.
    committed = SCRIPT.parents[1] / "saeengine" / "gpu_validation.json"
    assert (out / "gpu_validation.json").read_text() == committed.read_text()
    assert "timings" in result.stdout.splitlines()[-len(STAGES) - 1]  # the summary ends the output


def test_a_stage_past_its_limit_is_stopped_and_the_next_still_runs(tmp_path):
    out = tmp_path / "out"
    result = session("--dry-run", "trainer", "build", out=out, LIMIT_trainer="3")
    assert result.returncode == 0, result.stderr
    timings = json.loads((out / "timings.json").read_text())
    assert timings["plan"] == {"trainer": 3, "build": plan(tmp_path)["build"]}
    trainer, build = timings["stages"]["trainer"], timings["stages"]["build"]
    assert trainer["rc"] in (124, 137) and trainer["seconds"] <= 3.5
    assert build["rc"] == 0
    assert "stopped at its limit" in result.stdout


@pytest.mark.parametrize("args,env,message", [
    (["nosuch"], {}, "unknown stage nosuch; stages: build gputests"),
    (["--fast"], {}, "unknown option --fast"),
    (["--plan"], {"LIMIT_tune": "soon"}, "LIMIT_tune=soon: a stage limit is a whole number of seconds"),
])
def test_bad_arguments_are_refused_with_the_choices(tmp_path, args, env, message):
    result = session(*args, out=tmp_path / "out", **env)
    assert result.returncode == 2 and message in result.stdout + result.stderr
