"""saeengine.cli: exit codes, one-line errors, --debug, Ctrl-C, sweeps, the end-of-run summary
and --help. In-process main() calls (one subprocess checks a real process's exit code)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import saeengine.trainer
from saeengine import SAE, cli
from saeengine.errors import DiskFullError, StoreCorruptError
from saeengine.store import ActivationWriter
from saeengine.trainer import TrainConfig
from saeengine.trainer.metrics import METRICS

D, BATCH, STEPS = 8, 32, 6


def write_store(directory: Path, n: int = 256) -> Path:
    """A small random float32 store [n, D]."""
    data = torch.randn(n, D, generator=torch.Generator().manual_seed(0))
    with ActivationWriter(directory, d_in=D, dtype="float32", shard_tokens=128) as writer:
        writer.add(data, np.arange(n) // 16, np.arange(n) % 16)
    return directory


def tiny_train(store: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(store), "--out-dir", str(out), "--d-sae", "16", "--k", "2",
            "--batch-size", str(BATCH), "--total-tokens", str(BATCH * STEPS), "--lr", "0.003", "--log-every", "2",
            "--warmup-steps", "1", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("cli") / "store")


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


# ---------------------------------------------------------------------------- end of a run
def test_train_prints_final_metrics_and_where_each_sae_is(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_train(store, out, "--name", "tiny")) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    match = re.fullmatch(r"tiny: 16 latents \| FVU (\S+) \| L0 (\S+) \| dead (\S+)% \| saved to (.+)", printed[0])
    assert match, printed
    last = json.loads((out / "tiny" / METRICS).read_text().splitlines()[-1])
    assert last["step"] == STEPS - 1  # the trainer's last line is the last step
    assert float(match[1]) == pytest.approx(last["fvu"], abs=1e-4)
    assert float(match[2]) == pytest.approx(last["l0"], abs=1e-2)
    assert float(match[3]) == pytest.approx(100 * last["dead"], abs=0.05)
    assert Path(match[4]) == out / "tiny"
    assert SAE.load(match[4]).cfg.d_sae == 16  # the folder printed holds the SAE


def test_a_boolean_sweep_trains_both_values_under_distinct_names(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_train(store, out, "--sweep", "auxk=False,true")) == 0
    printed = capsys.readouterr().out
    for value in (False, True):
        name = f"topk-F16-k2-lr0.003-auxk{value}"
        assert f"{name}: 16 latents | FVU" in printed
        saved = json.loads((out / name / "config.json").read_text())
        assert saved["provenance"]["train_config"]["auxk"] is value  # "False" no longer gives True


@pytest.mark.parametrize("content, phrase", [
    (None, "is missing"),
    ("", "is empty"),
    ('{"step": 5, "fvu": 0.5, "l0": 2.0}\n{"step": 6, "fv', "not JSON"),
    ('{"step": 5, "fvu": 0.5}\n', "lacks l0, dead"),
    ('[1, 2]\n', "not a JSON object"),
])
def test_final_metrics_says_why_there_are_none(tmp_path, content, phrase):
    if content is not None:
        (tmp_path / METRICS).write_text(content)
    text = cli.final_metrics(tmp_path, steps=6)
    assert text.startswith("no final metrics") and phrase in text and str(tmp_path / METRICS) in text


def test_final_metrics_flags_a_last_line_before_the_last_step(tmp_path):
    (tmp_path / METRICS).write_text('{"step": 3, "fvu": 0.25, "l0": 2.5, "dead": 0.125}\n')
    assert cli.final_metrics(tmp_path, steps=4) == "FVU 0.2500 | L0 2.50 | dead 12.5%"
    assert cli.final_metrics(tmp_path, steps=10).endswith("(at step 3, not the last step 9)")


# ---------------------------------------------------------------------------- errors
def _fail_with(monkeypatch, exc: BaseException) -> None:
    def train(data, configs):
        raise exc
    monkeypatch.setattr(saeengine.trainer, "train", train)


@pytest.mark.parametrize("exc, phrase", [
    (StoreCorruptError("shard 3 of /s fails its checksum;\nre-record it"),
     "shard 3 of /s fails its checksum; re-record it"),
    (DiskFullError("the disk is full writing /x"), "the disk is full writing /x"),
    (FileNotFoundError(2, "No such file or directory", "/nope"), "/nope: No such file or directory"),
    (ImportError("TrainConfig.wandb_project needs wandb"), "TrainConfig.wandb_project needs wandb"),
    (MemoryError(), "out of memory: MemoryError (a smaller --batch-size or --d-sae needs less)"),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory.\nTried to allocate 2 GiB"),
     "out of memory: CUDA out of memory. Tried to allocate 2 GiB (a smaller --batch-size or --d-sae needs less)"),
])
def test_a_failure_is_one_line_with_exit_code_1(store, tmp_path, monkeypatch, capsys, exc, phrase):
    _fail_with(monkeypatch, exc)
    assert cli.main(tiny_train(store, tmp_path)) == 1
    captured = capsys.readouterr()
    assert _error_line(captured.err) == f"saeengine train: error: {phrase}"
    assert "--debug" not in captured.err


def test_a_bug_says_so_and_points_at_debug(store, tmp_path, monkeypatch, capsys):
    _fail_with(monkeypatch, TypeError("unsupported operand"))
    assert cli.main(tiny_train(store, tmp_path)) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("saeengine train: error: TypeError: unsupported operand")
    assert "bug" in line and "--debug" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(store, tmp_path, monkeypatch, capsys, where):
    _fail_with(monkeypatch, TypeError("unsupported operand"))
    argv = tiny_train(store, tmp_path)
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "raise exc" in err
    assert err.strip().endswith("TypeError: unsupported operand")


def test_ctrl_c_before_a_checkpoint_says_nothing_was_kept(store, tmp_path, monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert cli.main(tiny_train(store, tmp_path / "run")) == 130
    line = _error_line(capsys.readouterr().err)
    assert "interrupted before the first checkpoint" in line and "nothing was kept" in line


def test_ctrl_c_with_debug_shows_the_traceback_then_the_note(store, tmp_path, monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert cli.main(["--debug", *tiny_train(store, tmp_path / "run", "--no-resume")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-2] == "KeyboardInterrupt"
    assert err[-1].startswith("saeengine train: interrupted before the first checkpoint")


def test_ctrl_c_after_a_checkpoint_names_it_and_the_command_resumes(store, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a run: exit 130 naming the checkpoint; the same command
    then resumes from it and finishes."""
    loop = importlib.import_module("saeengine.trainer.loop")
    save = loop.save_checkpoint

    def save_then_interrupt(out_dir, step, *args):
        path = save(out_dir, step, *args)
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "save_checkpoint", save_then_interrupt)
    argv = tiny_train(store, tmp_path / "run", "--checkpoint-every-tokens", str(2 * BATCH), "--name", "s")
    assert cli.main(argv) == 130
    line = _error_line(capsys.readouterr().err)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000000002"
    assert line == (f"saeengine train: interrupted; the checkpoint {checkpoint} is kept, and the same command "
                    f"resumes from it")
    monkeypatch.setattr(loop, "save_checkpoint", save)
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("s: 16 latents | FVU")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "s" / METRICS).read_text().splitlines()]
    assert steps[-1] == STEPS - 1


def test_a_real_process_prints_one_line_and_exits_1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saeengine.cli", "train", "--data", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert _error_line(proc.stderr).startswith(f"saeengine train: error: --data {tmp_path / 'none'}: no such")


# ---------------------------------------------------------------------------- sweeps
def _configs(*argv: str) -> list[TrainConfig]:
    args = cli.build_parser().parse_args(["train", "--data", "x", *argv])
    return cli.train_configs(args)


def test_a_grid_crosses_the_sweeps_in_order():
    configs = _configs("--sweep", "k=2,4", "--sweep", "aux_alpha=0.5,0.25", "--d-sae", "64")
    assert [(c.k, c.aux_alpha) for c in configs] == [(2, 0.5), (2, 0.25), (4, 0.5), (4, 0.25)]
    assert [c.name for c in configs] == [f"topk-F64-k{k}-lr0.0032-aux_alpha{a}" for k in (2, 4) for a in (0.5, 0.25)]


def test_a_sweep_with_name_prefixes_every_swept_value():
    configs = _configs("--name", "exp", "--sweep", "lr=0.001,0.00101")
    assert [c.name for c in configs] == ["exp-lr0.001", "exp-lr0.00101"]


def test_semicolons_separate_values_that_hold_commas():
    configs = _configs("--architecture", "matryoshka", "--d-sae", "64", "--sweep", "matryoshka_prefixes=8,64;16,64")
    assert [c.matryoshka_prefixes for c in configs] == ["8,64", "16,64"]
    assert len({c.name for c in configs}) == 2


def test_every_unsweepable_field_is_refused_and_listed_in_help(capsys):
    text = _help("train", capsys=capsys)
    assert set(cli.unsweepable()) >= {"out_dir", "device", "name", "resume", "batch_size", "total_tokens", "seed"}
    for field in cli.unsweepable():
        assert field in text
        with pytest.raises(cli.UsageError, match=f"{field} cannot be swept"):
            _configs("--sweep", f"{field}=1,2")


def test_no_sweep_keeps_the_default_name():
    assert [c.name for c in _configs("--k", "4")] == [""]


def test_the_run_name_shows_exactly_the_fields_cli_assumes():
    """The sweep adds no suffix for RUN_NAME_FIELDS because run_name shows them: if run_name
    stops showing one, sweeps of it would collide, and this fails."""
    base = TrainConfig(d_sae=64, k=4, lr=0.001)
    changed = dict(architecture="relu", d_sae=128, k=8, lr=0.002)
    assert set(changed) == set(cli.RUN_NAME_FIELDS)
    for field, value in changed.items():
        assert dataclasses.replace(base, **{field: value}).run_name != base.run_name, field


def test_an_invalid_sweep_point_is_named(capsys, store, tmp_path):
    assert cli.main(tiny_train(store, tmp_path, "--sweep", "k_anneal_from=4,1")) == 1
    line = _error_line(capsys.readouterr().err)
    assert "k_anneal_from=1" in line and "in the sweep point k_anneal_from=1" in line


# ---------------------------------------------------------------------------- --help
def _help(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_train_help_shows_every_field_with_its_real_default(capsys):
    text = _help("train", capsys=capsys)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            assert f"{flag}, --no-{flag[2:]}" in text, flag
        else:
            assert flag in text, flag
        shown = "empty" if f.default == "" else str(f.default)
        assert f"(default: {shown})" in text, f.name
    assert "--sweep FIELD=V1,V2" in text and "--debug" in text


def test_every_command_has_help(capsys):
    top = _help(capsys=capsys)
    for command in ("demo", "demo-synthetic", "train", "record", "encode", "eval", "ood", "ontology", "steer",
                    "attributes", "modality", "explore"):
        assert command in top
        text = _help(command, capsys=capsys)
        assert f"usage: saeengine {command}" in text and "--debug" in text


def test_record_is_wired_in(capsys):
    text = _help("record", capsys=capsys)
    assert "--layers LAYERS" in text and "--resume" in text


def test_ctrl_c_while_recording_says_how_to_continue(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib.import_module("saeengine.cli_record"), "run_record", interrupted)
    argv = ["record", str(tmp_path), "--layers", "blocks.5", "--out-dir", str(tmp_path / "acts")]
    assert cli.main(argv) == 130
    assert _error_line(capsys.readouterr().err) == (
        f"saeengine record: interrupted; the stores in {tmp_path / 'acts'} keep every finished shard, and the same "
        f"command with --resume continues them")
    assert cli.main([*argv, "--resume"]) == 130
    assert "and the same command continues them" in capsys.readouterr().err


def test_a_record_module_that_cannot_import_says_why(monkeypatch, capsys):
    real = importlib.import_module

    def import_module(name, *args):
        if name == "saeengine.cli_record":
            raise ModuleNotFoundError("No module named 'PIL'", name="PIL")
        return real(name, *args)
    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    assert cli.main(["record", "--images", "x"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("saeengine record: error: the record command cannot be loaded: No module named 'PIL'")


def test_warnings_print_as_one_line_naming_the_command(tmp_path, capsys):
    """A warning during a command is one line ``saeengine <cmd>: warning: ...``, not Python's
    two-line format with the warning's source line."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    argv = ["record", str(folder), "--backbone", "efficientnet-lite0", "--layers", "blocks.1",
            "--image-size", "32", "--no-progress"]
    assert cli.main([*argv, "--out-dir", str(tmp_path / "acts")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert lines and lines[0].startswith("saeengine record: warning: ") and ".txt (1)" in lines[0], err
    assert "UserWarning" not in err and "ImageSource(" not in err, err
