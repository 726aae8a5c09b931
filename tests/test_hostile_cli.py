"""Hostile command lines: each gives its exit code (2 usage, 1 failure) and one line on stderr
naming the problem and the fix; none trains, none shows a traceback (tests/hostile.py)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from hostile import case, hostile_table

from saeengine import cli
from saeengine.store import ActivationWriter


def run_cli(*argv: str, tmp: Path | None = None) -> tuple[int, str]:
    """(exit code, stderr) of ``saeengine ARGV`` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def train(*argv: str):
    """A ``saeengine train`` case on a store that need not exist (the check fails first)."""
    return lambda tmp: run_cli("train", "--data", str(tmp / "store"), "--out-dir", str(tmp / "run"),
                               "--device", "cpu", "--no-progress", *argv)


def sweep(*specs: str, extra: tuple[str, ...] = ()):
    return train(*[a for spec in specs for a in ("--sweep", spec)], *extra)


def says(code: int, *phrases: str):
    """The check: exit ``code``, exactly one stderr line starting ``saeengine``, every phrase in it."""
    def check(result, tmp):
        got, err = result
        lines = err.strip().splitlines()
        assert got == code, f"exit code {got}, expected {code}: {err}"
        assert len(lines) == 1 and lines[0].startswith("saeengine"), f"not one line: {err}"
        missing = [p for p in phrases if p.lower() not in lines[0].lower()]
        assert not missing, f"the error lacks {missing}: {lines[0]}"
        assert "traceback" not in err.lower()
    return check


def usage(id: str, run, *phrases: str):
    return case(id, run, None, check=says(2, *phrases))


def failure(id: str, run, *phrases: str):
    return case(id, run, None, check=says(1, *phrases))


def _tiny_store(tmp: Path) -> Path:
    with ActivationWriter(tmp / "store", d_in=4, dtype="float32", shard_tokens=64) as writer:
        writer.add(torch.randn(64, 4), np.arange(64), np.zeros(64, dtype=np.int64))
    return tmp / "store"


def _with_store(*argv: str):
    def run(tmp):
        _tiny_store(tmp)
        return train(*argv)(tmp)
    return run


def _names(*argv: str) -> list[str]:
    return [c.name for c in cli.train_configs(cli.build_parser().parse_args(["train", "--data", "x", *argv]))]


def _equals(expected):
    def check(result, tmp):
        assert result == expected, f"got {result!r}, expected {expected!r}"
    return check


def _traceback_and_code_1(result, tmp):
    code, err = result
    assert code == 1 and err.startswith("Traceback (most recent call last):"), err
    assert "batch_size=-3" in err.strip().splitlines()[-1]


CASES = [
    # ---- --sweep values, parsed strictly by the field's type (usage errors, exit 2)
    usage("sweep-bool-typo", sweep("auxk=true,Flase"), "auxk", "'Flase'", "true or false"),
    usage("sweep-bool-off", sweep("auxk=off,on"), "auxk", "'off'", "true or false"),
    usage("sweep-int-fraction", sweep("k=16,1.5"), "k takes int", "'1.5'", "whole number"),
    usage("sweep-int-text", sweep("d_sae=big"), "d_sae", "'big'", "whole number"),
    usage("sweep-int-small-exponent", sweep("k=1e-1"), "k", "'1e-1'", "whole number"),
    usage("sweep-float-text", sweep("lr=fast"), "lr", "'fast'", "number"),
    usage("sweep-float-nan", sweep("aux_alpha=nan"), "aux_alpha", "'nan'", "finite"),
    usage("sweep-float-inf", sweep("lr=1e-3,inf"), "lr", "'inf'", "finite"),
    usage("sweep-bad-choice", sweep("architecture=topk,topK"), "architecture='topK'", "choose from", "batchtopk"),
    usage("sweep-no-equals", sweep("k16,32"), "'k16,32'", "FIELD=V1,V2"),
    usage("sweep-no-field", sweep("=16,32"), "FIELD=V1,V2"),
    usage("sweep-no-values", sweep("k="), "'k='", "value 1 is empty"),
    usage("sweep-empty-middle", sweep("k=16,,32"), "value 2 is empty"),
    usage("sweep-trailing-comma", sweep("k=16,32,"), "value 3 is empty"),
    usage("sweep-repeated-value", sweep("k=16,16"), "'16'", "given twice"),
    usage("sweep-equal-values", sweep("lr=0.001,1e-3"), "'1e-3'", "given twice"),
    # ---- which fields a sweep may vary
    usage("sweep-typo-closest", sweep("kk=1,2"), "no field 'kk'", "did you mean 'k'"),
    usage("sweep-typo-dsae", sweep("d_sea=64,128"), "no field 'd_sea'", "did you mean 'd_sae'"),
    usage("sweep-typo-dashes", sweep("auxk-alpha=0.1,0.2"), "no field 'auxk_alpha'", "did you mean 'aux_alpha'"),
    usage("sweep-nothing-close", sweep("zzzz=1"), "no field 'zzzz'", "the fields are", "d_sae"),
    usage("sweep-out-dir", sweep("out_dir=a,b"), "out_dir cannot be swept", "--out-dir"),
    usage("sweep-device", sweep("device=cpu,cuda"), "device cannot be swept", "--device"),
    usage("sweep-name", sweep("name=a,b"), "name cannot be swept", "--name"),
    usage("sweep-resume", sweep("resume=true,false"), "resume cannot be swept", "--resume"),
    usage("sweep-batch-size", sweep("batch_size=32,64"), "batch_size cannot be swept", "same batches"),
    usage("sweep-total-tokens", sweep("total_tokens=1000,2000"), "total_tokens cannot be swept"),
    usage("sweep-seed", sweep("seed=0,1"), "seed cannot be swept"),
    usage("sweep-log-every", sweep("log_every=1,2"), "log_every cannot be swept", "--log-every"),
    usage("sweep-twice", sweep("k=16,32", "k=64"), "k is swept twice", "one --sweep"),
    usage("sweep-twice-dashes", sweep("d_sae=64", "d-sae=128"), "d_sae is swept twice"),
    usage("sweep-and-flag", sweep("k=16,32", extra=("--k", "8")), "both set k", "--k 8"),
    usage("sweep-and-no-flag", sweep("auxk=true,false", extra=("--no-auxk",)), "both set auxk", "--auxk"),
    usage("sweep-name-collision", sweep("lr=0.001,0.00101"), "'topk-F16384-k32-lr0.001'", "lr=0.00101",
          "--name"),
    usage("sweep-name-collision-sanitized", sweep("init_from=a/b,a_b", extra=("--name", "x")),
          "'x-init_froma_b'", "init_from=a/b", "init_from=a_b"),
    # ---- flags
    usage("flag-int-fraction", train("--k", "1.5"), "--k", "'1.5'", "whole number"),
    usage("flag-float-nan", train("--lr", "nan"), "--lr", "finite"),
    usage("flag-bad-choice", train("--optimizer", "sgd"), "--optimizer", "'sgd'", "row_sparse_adam"),
    usage("flag-typo", train("--d-sea", "64"), "--d-sea", "did you mean --d-sae"),
    usage("flag-bool-with-value", train("--auxk", "false"), "unrecognized arguments: false", "takes no value",
          "--no-x"),
    usage("no-command", lambda tmp: run_cli(), "COMMAND", "saeengine --help"),
    usage("unknown-command", lambda tmp: run_cli("trian"), "invalid choice: 'trian'", "train"),
    usage("train-without-data", lambda tmp: run_cli("train", "--k", "4"), "--data", "required"),
    # ---- saeengine record's arguments (its own checks, through this CLI's one-line errors)
    usage("record-batch-size-zero", lambda tmp: run_cli("record", str(tmp), "--layers", "blocks.5", "--out-dir",
                                                         str(tmp / "acts"), "--batch-size", "0"),
          "saeengine record", "--batch-size must be >= 1", "got 0"),
    usage("record-without-layers", lambda tmp: run_cli("record", str(tmp), "--out-dir", str(tmp / "acts")),
          "saeengine record", "--layers", "required"),
    usage("record-flag-typo", lambda tmp: run_cli("record", str(tmp), "--layers", "blocks.5", "--out-dir", "a",
                                                   "--batchsize", "4"), "--batchsize", "did you mean --batch-size"),
    # ---- failures (exit 1): the config's and the data's own errors, as one line
    failure("no-such-store", train(), "--data", "store", "no such activation store", "ActivationWriter"),
    failure("store-is-a-file", lambda tmp: ((tmp / "store").write_text("x"), train()(tmp))[1], "store",
            "not an activation store", "meta.json"),
    failure("batch-size-negative", train("--batch-size", "-3"), "batch_size=-3", ">= 2"),
    failure("total-tokens-below-a-batch", train("--batch-size", "64", "--total-tokens", "32"),
            "total_tokens=32", "less than one batch"),
    failure("sweep-point-invalid", sweep("k_anneal_from=8,64", extra=("--k", "16")), "k_anneal_from=8",
            "in the sweep point k_anneal_from=8"),
    failure("k-above-d-sae", train("--d-sae", "4", "--k", "8"), "k=8", "d_sae=4"),
    failure("init-from-missing", _with_store("--d-sae", "4", "--k", "2", "--batch-size", "16", "--total-tokens", "32",
                                           "--init-from", "nowhere"), "nowhere"),
    # ---- documented behaviour
    case("debug-shows-the-traceback", train("--batch-size", "-3", "--debug"), None, check=_traceback_and_code_1),
    case("int-scientific-is-exact", lambda tmp: [cli.parse_value(int, t) for t in ("1e6", "2.5e3", " 7 ", "1_000")],
         None, check=_equals([1_000_000, 2500, 7, 1000])),
    case("bool-words", lambda tmp: [cli.parse_value(bool, t) for t in ("False", "no", "0", "TRUE", "yes", "1")],
         None, check=_equals([False, False, False, True, True, True])),
    case("sweep-with-name-uses-exact-values", lambda tmp: _names("--name", "e", "--sweep", "lr=0.001,0.00101"),
         None, check=_equals(["e-lr0.001", "e-lr0.00101"])),
    case("sweep-of-k-keeps-default-names", lambda tmp: _names("--d-sae", "64", "--lr", "0.01", "--sweep", "k=4,8"),
         None, check=_equals(["topk-F64-k4-lr0.01", "topk-F64-k8-lr0.01"])),
]

test_hostile = hostile_table(CASES)
