"""``saeengine encode`` over several ranks (issue 19): each rank encodes its rows, rank 0
merges into one output. The oracle is the single-process encode_store of the same SAE and
store: every file byte for byte (codes, sources, latent statistics, exemplars, summary.json
with its float64 metrics). Plus a part killed after a commit and resumed, a merge killed
half-way (the folder reads unfinished, a rerun finishes), ranks that disagree or fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from encode_helpers import folder_bytes, make_sae, make_store
from merge_helpers import cli_args, slow_merges

from saeengine.distributed import encode as denc
from saeengine.distributed._spawn import run
from saeengine.errors import ConfigError, InputError, StoreIncompleteError
from saeengine.eval import encode as enc
from saeengine.eval.encode import encode_store
from saeengine.eval.encoded import EncodedDataset
from saeengine.store import ActivationStore

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")

SETTINGS = {"batch_tokens": 12, "top_k": 3}
CASES = {  # name: (architecture, settings): fixed-width codes, CSR codes, one batch only (rank 1 idle)
    "topk": ("topk", SETTINGS),
    "relu": ("relu", SETTINGS),
    "one-batch": ("topk", {"batch_tokens": 10_000, "top_k": 3}),
}


def sae_of(architecture: str, seed: int = 0):
    return make_sae(architecture, d_sae=32, k=3, seed=seed)


def _ranks(rank, world, tmp):
    tmp = Path(tmp)
    out = {}
    for name, (arch, kw) in CASES.items():
        denc.encode_distributed(sae_of(arch), tmp / "store", tmp / f"dist-{name}", progress=False, **kw)
    # the merge killed in the test process before this spawn: the rerun finishes it
    denc.encode_distributed(sae_of("topk"), tmp / "store", tmp / "crashed", progress=False, **SETTINGS)
    try:  # rank 1 has another SAE
        denc.encode_distributed(sae_of("topk", seed=rank), tmp / "store", tmp / "disagree", progress=False,
                                **SETTINGS)
    except ConfigError as exc:
        out["disagree"] = str(exc)
    try:  # rank 1 cannot open its store: every rank raises, none waits
        denc.encode_distributed(sae_of("topk"), tmp / ("store" if rank == 0 else "missing"), tmp / "failed",
                                progress=False, **SETTINGS)
    except InputError as exc:
        out["failed"] = f"{type(exc).__name__}: {exc}"
    try:  # rank 1's settings are invalid (a ConfigError): every rank raises a ConfigError (same exit code)
        denc.encode_distributed(sae_of("topk"), tmp / "store", tmp / "bad", progress=False, batch_tokens=12,
                                top_k=3 if rank == 0 else 0)
    except Exception as exc:  # noqa: BLE001 - the class is what is checked
        out["bad"] = (type(exc).__name__, str(exc))
    return out


def assert_same_output(single: Path, merged: Path) -> None:
    """Every file byte for byte: codes, sources, latent statistics, exemplars, summary.json
    (metrics included: the float64 sums are added in the single pass's order)."""
    a, b = folder_bytes(single), folder_bytes(merged)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name
    assert not denc.parts_dir(merged).exists()


def test_two_ranks_equal_one_process_and_a_killed_merge_finishes(tmp_path, monkeypatch):
    store = make_store(tmp_path / "store", 13, paths=True)
    # A merge that dies after copying the first part's codes: the folder reads unfinished.
    job = denc._prepare(sae_of("topk"), store, tmp_path / "crashed", SETTINGS["batch_tokens"], SETTINGS["top_k"],
                        None, "auto", True, False, None, 2)
    # Rank 1's part is killed after its second batch (a commit after every batch), then resumed.
    monkeypatch.setattr(enc, "COMMIT_EVERY_S", 0.0)
    real_step, steps = denc._PartPass._step, []

    def dying_step(self, batch):
        steps.append(batch.row)
        if len(steps) == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self, batch)

    monkeypatch.setattr(denc._PartPass, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        denc._encode_part(job, 1, 2, False)
    monkeypatch.undo()
    part = denc.part_dir(tmp_path / "crashed", 1, 2)
    assert len(denc.read_terms(part)) == 2  # the terms of the 2 committed batches, appended (not rewritten)
    record = (part / denc._MetricIncrements.FILE).stat().st_size // 2
    assert record == (10 + 2 * ActivationStore(store).d_in) * 8  # what the doc promises a batch costs
    with open(part / denc._MetricIncrements.FILE, "ab") as fh:  # a batch appended, its commit killed
        fh.write(b"\xff" * record)
    for rank in range(2):
        denc._encode_part(job, rank, 2, False)
    real, calls = denc._copy_codes, []

    def dying(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # as a kill: no handler of the merge runs
        return real(*args)

    monkeypatch.setattr(denc, "_copy_codes", dying)
    with pytest.raises(KeyboardInterrupt):
        denc.merge_parts(job, 2)
    monkeypatch.undo()
    with pytest.raises(StoreIncompleteError):
        EncodedDataset(tmp_path / "crashed")

    answers = run(_ranks, 2, str(tmp_path), timeout=240)

    for name, (arch, kw) in CASES.items():
        single = tmp_path / f"single-{name}"
        encode_store(sae_of(arch), store, single, progress=False, **kw)
        assert_same_output(single, tmp_path / f"dist-{name}")
    assert_same_output(tmp_path / "single-topk", tmp_path / "crashed")
    for answer in answers:
        assert "sae_checksum" in answer["disagree"] and "rank 0" in answer["disagree"]
        assert "rank 1" in answer["disagree"]
    assert "failed on rank 1" in answers[0]["failed"] and "missing" in answers[0]["failed"]
    assert "failed on rank" not in answers[1]["failed"] and "missing is not a folder" in answers[1]["failed"]
    for answer in answers:
        assert answer["bad"][0] == "ConfigError" and "top_k must be an integer" in answer["bad"][1]
    assert "failed on rank 1" in answers[0]["bad"][1]


def test_row_ranges_split_at_the_single_pass_batches(tmp_path):
    from saeengine.store import ActivationStore

    store = ActivationStore(make_store(tmp_path / "store", 13))
    starts = denc.batch_starts(store, 12)
    assert starts[0] == 0 and starts[-1] == store.n_tokens and all(np.diff(starts) > 0)
    images = store.sources(np.arange(store.n_tokens))[0]
    assert all(images[s] != images[s - 1] for s in starts[1:-1])  # batches hold whole images
    for world in (2, 3, 5, 40):
        ranges = denc.row_ranges(starts, world)
        assert ranges[0][0] == 0 and ranges[-1][1] == store.n_tokens
        assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
        assert all(a in starts and b in starts for a, b in ranges)


def test_interrupted_parts_need_the_same_world(tmp_path):
    store = make_store(tmp_path / "store", 6)
    job = denc._prepare(sae_of("topk"), store, tmp_path / "out", 12, 3, None, "auto", True, False, None, 2)
    denc._encode_part(job, 1, 2, False)
    with pytest.raises(InputError, match="by 2 ranks, but this run has 3"):
        denc._prepare(sae_of("topk"), store, tmp_path / "out", 12, 3, None, "auto", True, False, None, 3)
    denc._prepare(sae_of("topk"), store, tmp_path / "out", 12, 3, None, "auto", False, False, None, 3)
    assert not denc.parts_dir(tmp_path / "out").exists()  # resume=False starts over


def test_a_parts_folder_this_code_did_not_make_is_refused_not_deleted(tmp_path):
    store = make_store(tmp_path / "store", 6)
    theirs = tmp_path / "out.parts"  # the user's own folder, by chance named like the parts folder
    (theirs / "rank-0-of-2").mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(InputError, match=r"out.parts exists but is not the parts folder of a distributed encode"):
            denc._prepare(sae_of("topk"), store, tmp_path / "out", 12, 3, None, "auto", resume, False, None, 2)
    assert (theirs / "notes.txt").read_text() == "mine" and (theirs / "rank-0-of-2").is_dir()
    # ours (marker) but holding a file of someone else: not deleted either, a warning says why
    job = denc._prepare(sae_of("topk"), store, tmp_path / "ours", 12, 3, None, "auto", True, False, None, 2)
    denc._encode_part(job, 0, 2, False)
    (denc.parts_dir(tmp_path / "ours") / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=r"keep.txt"):
        denc._prepare(sae_of("topk"), store, tmp_path / "ours", 12, 3, None, "auto", False, False, None, 2)
    with pytest.warns(UserWarning, match="not removing it"):
        assert not denc.remove_parts(denc.parts_dir(tmp_path / "ours"), denc.KIND)
    assert (denc.parts_dir(tmp_path / "ours") / "keep.txt").exists()
    # a record's parts folder is not an encode's
    (denc.parts_dir(tmp_path / "ours") / "keep.txt").unlink()
    with pytest.raises(InputError, match="not the parts folder of a distributed record"):
        from saeengine.distributed import record as drec
        drec.check_parts_folder(denc.parts_dir(tmp_path / "ours"), "record")
    assert denc.remove_parts(denc.parts_dir(tmp_path / "ours"), denc.KIND)
    assert not denc.parts_dir(tmp_path / "ours").exists()


def test_an_out_dir_without_a_name_is_an_input_error(tmp_path, monkeypatch):
    store = make_store(tmp_path / "store", 6)
    monkeypatch.chdir(tmp_path)
    for out in (".", "..", "/"):
        with pytest.raises(InputError, match="does not name a folder"):
            denc._prepare(sae_of("topk"), store, out, 12, 3, None, "auto", True, False, None, 2)


def _cli_ranks(rank, world, tmp):
    """`torchrun -m saeengine encode ...` as the CLI hook runs it: the process group from
    torchrun's environment (launch.distributed), every rank the same arguments, rank 0's
    merge slower than the collective timeout (merge_helpers)."""
    from saeengine.cli_encode import add_encode_parser

    slow_merges(denc)
    args = cli_args(add_encode_parser, ["encode", "--sae", f"{tmp}/sae", "--data", f"{tmp}/store", "--out",
                                        f"{tmp}/cli", "--batch-tokens", "12", "--top-k", "3", "--device", "cpu",
                                        "--no-progress"])
    return denc.run_encode_distributed(args)


def test_command_line_under_torchrun_environment(tmp_path):
    store = make_store(tmp_path / "store", 9, paths=True)
    sae_of("topk").save(tmp_path / "sae")
    assert run(_cli_ranks, 2, str(tmp_path), timeout=120, init=False) == [0, 0]
    encode_store(tmp_path / "sae", store, tmp_path / "single", progress=False, device="cpu", **SETTINGS)
    assert_same_output(tmp_path / "single", tmp_path / "cli")
