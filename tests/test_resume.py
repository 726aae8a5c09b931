"""Resume rules, with real SIGKILLs: a killed run resumed with other logging settings ends
bit for bit where the uninterrupted run does; total_tokens may grow; a change of the math
is refused with the field and both values, other data with both identities; checkpoints of the earlier
format (a TrainConfig with ``weight_copies``) still resume.

The killed runs are forked processes that SIGKILL themselves at a chosen point of the
checkpoint sequence (after a whole checkpoint, or inside the write of one: KILL_POINTS),
so the runs can be short and the kill never races the end of the run. Small shapes, the
torch backend on the CPU, one thread (the same numerics in every process).
tests/test_trainer.py kills a fresh CLI process from outside, at a moment it does not
choose."""

import dataclasses
import json
import logging
import multiprocessing
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import saeengine
from saeengine import TrainConfig
from saeengine.checkpoint import CheckpointError
from saeengine.errors import DataMismatchError
from saeengine.store import ActivationWriter
from saeengine.synthetic import planted_dictionary

STEPS, BATCH = 40, 64
EVERY = 10  # steps between checkpoints

KILL_POINTS = {
    "after_checkpoint": "a whole checkpoint is in place and LATEST names it",
    "writing_state": "the SAEs of the temporary checkpoint are written, state.pt is not",
    "before_rename": "the temporary checkpoint is whole but not renamed into place",
    "before_latest": "renamed into place, LATEST still names the one before",
}


def _train_and_die(data_path: str, run_settings: dict, kill: str, nth: int) -> None:
    """In the killed process: train, and SIGKILL this process the ``nth`` time the
    checkpoint writer reaches ``kill`` (one of KILL_POINTS)."""
    import os
    from types import SimpleNamespace

    from saeengine.trainer import checkpoints, loop

    reached = {"n": 0}

    def point(name):
        if name == kill:
            reached["n"] += 1
            if reached["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    def wrap(before=None, after=None, call=None):
        def wrapped(*args, **kwargs):
            point(before)
            out = call(*args, **kwargs)
            point(after)
            return out
        return wrapped

    loop.save_checkpoint = wrap(after="after_checkpoint", call=loop.save_checkpoint)
    checkpoints.torch = SimpleNamespace(**{**vars(torch), "save": wrap("writing_state", call=torch.save)})
    checkpoints.os = SimpleNamespace(**{**vars(os), "replace": wrap("before_rename", call=os.replace)})
    checkpoints.atomic_write_bytes = wrap("before_latest", call=checkpoints.atomic_write_bytes)
    saeengine.train(torch.load(data_path), TrainConfig(**run_settings))


# The child processes train on one thread: so does the test (the same reductions).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "acts.pt"
    torch.save(planted_dictionary(8_000, 16, 48, 3, seed=1).activations, path)
    return path


def settings(out_dir, **overrides) -> dict:
    """A short run with everything a checkpoint must carry: AuxK over latents that die
    (dead after 4 steps), and, with row_sparse_adam, a resampling after the kill."""
    base = dict(d_sae=128, k=3, total_tokens=STEPS * BATCH, batch_size=BATCH, lr=3e-3, warmup_steps=5,
                dead_after_tokens=4 * BATCH, k_aux=8, device="cpu", backend="torch", out_dir=str(out_dir),
                name="sae", progress=False, log_every=7, checkpoint_every_tokens=EVERY * BATCH)
    base.update(overrides)
    return base


def run_killed(data, out_dir, kill: str, nth: int = 2, **overrides) -> None:
    """Train in a forked process (no second import of torch) that SIGKILLs itself."""
    process = multiprocessing.get_context("fork").Process(
        target=_train_and_die, args=(str(data), settings(out_dir, **overrides), kill, nth))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == -signal.SIGKILL, f"the run was not killed at {kill} (exit code {process.exitcode})"


def latest(out_dir) -> str:
    return (out_dir / "checkpoints" / "LATEST").read_text()


def assert_same_run(a, b, name="sae"):
    """Two finished runs hold the same SAE, optimizer state, counters and step."""
    sa, sb = load_file(str(a / name / "sae.safetensors")), load_file(str(b / name / "sae.safetensors"))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ca, cb = (torch.load(d / "checkpoints" / latest(d) / "state.pt", weights_only=False) for d in (a, b))
    assert ca["step"] == cb["step"]
    _assert_equal_trees(ca["runs"][name]["optimizer"], cb["runs"][name]["optimizer"])
    assert torch.equal(ca["runs"][name]["last_fired"], cb["runs"][name]["last_fired"])


def _assert_equal_trees(a, b, where="optimizer"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal_trees(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_trees(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def metric_steps(out_dir, name="sae") -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_file):
    """The reference runs, trained without a kill (dense and row-sparse Adam)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    data = torch.load(data_file)
    for optimizer in ("adam", "row_sparse_adam"):
        extra = {"resample_every_tokens": 25 * BATCH} if optimizer == "row_sparse_adam" else {}
        saeengine.train(data, TrainConfig(**settings(root / optimizer, optimizer=optimizer, **extra)))
    torch.set_num_threads(before)
    return root


def test_killed_run_resumed_with_other_logging_ends_bit_for_bit(tmp_path, data_file, uninterrupted, monkeypatch):
    """Killed after its second checkpoint (step 20), resumed with every logging setting
    changed (log_every, progress, checkpoint_every_tokens, tensorboard, wandb_project):
    the same SAE, optimizer state and counters as the uninterrupted run, through a
    resampling (step 25) and AuxK over dead latents."""
    out = tmp_path / "run"
    row_sparse = dict(optimizer="row_sparse_adam", resample_every_tokens=25 * BATCH)
    run_killed(data_file, out, "after_checkpoint", **row_sparse)
    assert latest(out) == "step-000000020"
    logged = []
    fake_wandb = type(sys)("wandb")
    fake_wandb.init = lambda **kwargs: type("Run", (), {"log": lambda self, d, step: logged.append(step),
                                                         "finish": lambda self: None})()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    changed = settings(out, **row_sparse, log_every=3, progress=True, checkpoint_every_tokens=7 * BATCH,
                       tensorboard=True, wandb_project="resumed")
    saeengine.train(torch.load(data_file), TrainConfig(**changed))
    assert_same_run(uninterrupted / "row_sparse_adam", out)
    assert metric_steps(out) == [0, 7, 14] + list(range(21, STEPS, 3))  # 39, the last step, is one of them
    assert logged == list(range(21, STEPS, 3))
    assert (out / "sae" / "tensorboard").is_dir()
    lines = [json.loads(line) for line in (out / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert any(line["dead"] > 0 and line["auxk"] > 0 for line in lines if line["step"] > 20)  # AuxK had latents


@pytest.mark.parametrize("kill", ["writing_state", "before_rename", "before_latest"])
def test_kill_inside_a_checkpoint_write_resumes_from_the_one_before(tmp_path, data_file, uninterrupted, kill):
    out = tmp_path / "run"
    run_killed(data_file, out, kill, nth=3)  # in the write of step 30's checkpoint
    assert latest(out) == "step-000000020"
    saeengine.train(torch.load(data_file), TrainConfig(**settings(out)))
    assert_same_run(uninterrupted / "adam", out)
    assert metric_steps(out) == sorted(set(metric_steps(out)))  # each step logged once
    assert not list((out / "checkpoints").glob(".*.tmp")) and len(list((out / "checkpoints").glob("step-*"))) == 1


def test_interrupted_run_resumed_with_more_tokens_equals_the_longer_run(tmp_path, data_file):
    """Killed at step 20, before its decay began (step 32): with total_tokens raised to
    60 steps it continues as a run started with 60 steps does, bit for bit."""
    out, longer = tmp_path / "run", tmp_path / "longer"
    run_killed(data_file, out, "after_checkpoint")
    saeengine.train(torch.load(data_file), TrainConfig(**settings(out, total_tokens=60 * BATCH)))
    saeengine.train(torch.load(data_file), TrainConfig(**settings(longer, total_tokens=60 * BATCH)))
    assert_same_run(longer, out)
    assert latest(out) == "step-000000060"


def test_finished_run_extended_follows_the_new_schedule(tmp_path, data_file):
    """A finished 40-step run (decay from step 32 to 40) extended to 60 steps: the lr of
    step 40 is back at the peak (the new decay starts at int(0.8 * 60) = 48, warm-up is
    long over), then decays linearly to reach peak / 12 at step 59; steps 0..39 stay as
    they were."""
    out = tmp_path / "run"
    data = torch.load(data_file)
    first = saeengine.train(data, TrainConfig(**settings(out, log_every=1)))
    before = [json.loads(line) for line in (out / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert before[-1]["step"] == 39 and before[-1]["lr"] == pytest.approx(3e-3 / 8)
    extended = saeengine.train(data, TrainConfig(**settings(out, log_every=1, total_tokens=60 * BATCH)))
    lines = [json.loads(line) for line in (out / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(60))
    assert lines[:40] == before
    lr = {line["step"]: line["lr"] for line in lines}
    assert lr[40] == lr[47] == 3e-3
    assert lr[48] == pytest.approx(3e-3 * 12 / 12) and lr[54] == pytest.approx(3e-3 * 6 / 12)
    assert lr[59] == pytest.approx(3e-3 / 12)
    assert latest(out) == "step-000000060"
    assert not torch.equal(first.W_dec, extended.W_dec)
    again = saeengine.train(data, TrainConfig(**settings(out, log_every=1, total_tokens=60 * BATCH)))
    assert torch.equal(again.W_dec, extended.W_dec)  # finished at this total: nothing more to train


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_file):
    """A finished short run to resume from (its checkpoint is only read by the tests)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = TrainConfig(**{**settings(out, total_tokens=10 * BATCH), "name": ""})
    saeengine.train(torch.load(data_file), cfg)
    return cfg


@pytest.mark.parametrize("field, value", [("lr", 1e-2), ("k", 4), ("d_sae", 256), ("architecture", "batchtopk"),
                                          ("batch_size", 32), ("seed", 1), ("optimizer", "row_sparse_adam"),
                                          ("aux_alpha", 0.5)])
def test_a_change_of_the_math_is_refused_naming_the_field(finished, data_file, field, value):
    """The run is named after its settings (no name set): the lone saved SAE is still
    found, and the refusal names the field and both values."""
    before = latest(Path(finished.out_dir))
    with pytest.raises(CheckpointError, match=rf"TrainConfig\.{field} is {value!r} in this run but "
                                              rf"{getattr(finished, field)!r} in the checkpoint"):
        saeengine.train(torch.load(data_file), dataclasses.replace(finished, **{field: value}))
    assert latest(Path(finished.out_dir)) == before


def test_lower_total_tokens_than_trained_is_refused(finished, data_file):
    with pytest.raises(CheckpointError, match=r"total_tokens is 320 in this run but the checkpoint has trained 640"):
        saeengine.train(torch.load(data_file), dataclasses.replace(finished, total_tokens=5 * BATCH))


def test_other_data_is_refused_naming_both(finished, data_file):
    data = torch.load(data_file)
    changed = data.clone()
    changed[123, 4] += 1.0
    identity = saeengine.trainer.data.TensorBatches(data, BATCH, 0, torch.device("cpu")).identity()
    other = saeengine.trainer.data.TensorBatches(changed, BATCH, 0, torch.device("cpu")).identity()
    assert identity["sha256"] != other["sha256"]
    with pytest.raises(DataMismatchError, match=rf"the data differs: this run reads .*{other['sha256']}.* but the "
                                                rf"checkpoint was trained on .*{identity['sha256']}"):
        saeengine.train(changed, finished)


def _store(directory, data):
    with ActivationWriter(directory, d_in=data.shape[1], dtype="float32", shard_tokens=2048) as writer:
        writer.add(data, np.arange(len(data)) // 16, np.arange(len(data)) % 16)
    return saeengine.store.ActivationStore(directory)


def test_another_store_is_refused_naming_both_hashes(tmp_path, data_file):
    data = torch.load(data_file)[:4096]
    first, second = _store(tmp_path / "a", data), _store(tmp_path / "b", data.flip(0))
    cfg = TrainConfig(**settings(tmp_path / "run", total_tokens=4 * BATCH, checkpoint_every_tokens=0))
    saeengine.train(first, cfg)
    with pytest.raises(DataMismatchError, match=rf"{second.content_hash}.* but the checkpoint was trained on "
                                                rf".*{first.content_hash}"):
        saeengine.train(second, cfg)


def test_checkpoint_of_the_earlier_format_resumes(tmp_path, data_file, caplog):
    """Before this version a checkpoint kept no settings in state.pt, and its SAEs' TrainConfig
    (in the provenance and the config metadata) had ``weight_copies``. Such a checkpoint,
    made here from a new one, resumes with a note and ends as the new one does."""
    data = torch.load(data_file)
    new, old = tmp_path / "new", tmp_path / "old"
    saeengine.train(data, TrainConfig(**settings(new, total_tokens=20 * BATCH)))
    shutil.copytree(new, old)
    checkpoint = old / "checkpoints" / latest(old)
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    saved_cfg = {**state["runs"]["sae"].pop("train_config"), "weight_copies": True, "out_dir": str(old)}
    for key in ("version", "data"):
        del state[key]
    for key in ("tokens_seen", "step"):
        del state["runs"]["sae"][key]
    torch.save(state, checkpoint / "state.pt")
    config_path = checkpoint / "sae" / "config.json"
    config = json.loads(config_path.read_text())
    config["config"]["metadata"] = {"train_config": saved_cfg}
    config["provenance"]["train_config"] = saved_cfg
    config_path.write_text(json.dumps(config))
    shutil.copytree(old, tmp_path / "old-again")
    with caplog.at_level(logging.WARNING, logger="saeengine"):
        saeengine.train(data, TrainConfig(**settings(new, total_tokens=STEPS * BATCH)))
        with pytest.warns(UserWarning, match="records no data identity"):
            saeengine.train(data, TrainConfig(**settings(old, total_tokens=STEPS * BATCH)))
    assert any("weight_copies" in record.getMessage() for record in caplog.records)
    assert_same_run(new, old)
    # The settings of an old checkpoint are compared too (from its SAEs' provenance).
    with pytest.raises(CheckpointError, match="TrainConfig.k is 4 in this run but 3 in the checkpoint"):
        saeengine.train(data, TrainConfig(**settings(tmp_path / "old-again", total_tokens=STEPS * BATCH, k=4)))


def test_a_sharded_checkpoint_is_refused_naming_mesh(tmp_path):
    """The single-process trainer finding a --mesh run's sharded checkpoint in out_dir says
    to resume it with --mesh, instead of calling the folder changed by hand."""
    from saeengine.distributed import checkpoint as sharded

    cfg = TrainConfig(d_sae=16, k=2, batch_size=8, total_tokens=32, device="cpu", progress=False,
                      out_dir=str(tmp_path), name="m")
    sae = saeengine.SAE(cfg.sae_config(4), seed=0)
    shards = [sharded.shard_from_training(sae, lo=lo, hi=hi) for lo, hi in ((0, 8), (8, 16))]
    sharded.save_sharded_local(tmp_path / "checkpoints", 2, shards, run_id=sharded.new_run_id())
    with pytest.raises(CheckpointError, match="sharded checkpoint.*resume it with --mesh"):
        saeengine.train(torch.randn(64, 4), cfg)
