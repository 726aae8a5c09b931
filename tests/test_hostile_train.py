"""Hostile inputs to the trainer (issue 14): every TrainConfig field's bad values, data too
small for one batch (a hang would fail the case's timeout), NaN and inf in a tensor or a
store, runs that diverge, a rerun or resume on other data, names that leave out_dir,
sweeps that collide, a run folder in use, a full disk. Each case is (input, error type,
the phrases a user needs); the tests below the table check what a case cannot: the step
named is the first bad one, nothing poisoned is saved, the GPU policy checks without a
per-step host sync. Tiny shapes (d_in 8, d_sae 16, a few steps) on the CPU."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import saeengine
from hostile import case, hostile_table
from saeengine import TrainConfig
from saeengine._lock import exclusive_lock
from saeengine.errors import (CheckpointError, ConfigError, DataMismatchError, DiskFullError, LockedError,
                              NonFiniteError, StoreError)
from saeengine.store import ActivationWriter, batch_positions
from saeengine.store.reader import ActivationStore
from saeengine.trainer import checkpoints, data as data_module, finite

D_IN, BATCH = 8, 32
POISONED_ROW = 300  # image 18, position 12 in the stores below (16 tokens per image)


def tiny(tmp: Path | None = None, **overrides) -> TrainConfig:
    settings = dict(d_sae=16, k=2, total_tokens=8 * BATCH, batch_size=BATCH, lr=3e-3, warmup_steps=2,
                    device="cpu", backend="torch", progress=False, log_every=1, name="sae")
    if tmp is not None:
        settings["out_dir"] = str(tmp / "run")
    settings.update(overrides)
    return TrainConfig(**settings)


def acts(n: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def write_store(directory: Path, data: torch.Tensor) -> Path:
    with ActivationWriter(directory, d_in=data.shape[1], dtype="float32") as writer:
        writer.add(data, np.arange(len(data)) // 16, np.arange(len(data)) % 16)
    return directory


def with_nan(data: torch.Tensor, row: int, column: int, value: float = float("nan")) -> torch.Tensor:
    data = data.clone()
    data[row, column] = value
    return data


@contextlib.contextmanager
def poisoned_store_row(row: int = POISONED_ROW):
    """Reads of the store return NaN for ``row``: a poisoned row that got past the
    writer's checks and the checksums (damage in memory, or a store of an older writer)."""
    gather = ActivationStore.gather_into

    def poisoned(self, rows, out):
        gather(self, rows, out)
        out[rows == row] = np.nan

    with mock.patch.object(ActivationStore, "gather_into", poisoned):
        yield


def train_twice(tmp: Path, first, second, cfg: TrainConfig, **again):
    saeengine.train(first, cfg)
    return saeengine.train(second, TrainConfig(**{**cfg.to_dict(), **again}))


def config_case(id: str, phrases: tuple[str, ...], **fields):
    return case(f"config-{id}", lambda tmp: tiny(tmp, **fields), ConfigError, *phrases)


# ----- every TrainConfig field ---------------------------------------------------------
CONFIG_CASES = [
    config_case("d_sae-zero", ("d_sae=0", ">= 1"), d_sae=0),
    config_case("d_sae-str", ("d_sae='16'", "not a str"), d_sae="16"),
    config_case("architecture-unknown", ("architecture='mlp'", "topk"), architecture="mlp"),
    config_case("k-zero", ("k=0", ">= 1"), k=0),
    config_case("k-bool", ("k=True", "not a bool"), k=True),
    config_case("k-above-d_sae", ("k=40", "d_sae=16"), k=40),
    config_case("k_anneal_from-negative", ("k_anneal_from=-1", "(k, d_sae]"), k_anneal_from=-1),
    config_case("k_anneal_from-below-k", ("k_anneal_from=1", "(k=2"), k_anneal_from=1),
    config_case("k_anneal_fraction-zero", ("k_anneal_fraction=0.0", "(0, 1]"), k_anneal_fraction=0.0),
    config_case("k_anneal_fraction-nan", ("k_anneal_fraction=nan", "(0, 1]"), k_anneal_fraction=float("nan")),
    config_case("total_tokens-below-batch", ("total_tokens=10", "less than one batch", "batch_size=32"),
                total_tokens=10),
    config_case("total_tokens-negative", ("total_tokens=-5",), total_tokens=-5),
    config_case("batch_size-one", ("batch_size=1", ">= 2"), batch_size=1, total_tokens=64),
    config_case("batch_size-float", ("batch_size=32.0", "not a float"), batch_size=32.0),
    config_case("lr-negative", ("lr=-0.001", "> 0"), lr=-1e-3),
    config_case("lr-inf", ("lr=inf", "finite"), lr=float("inf")),
    config_case("lr-nan", ("lr=nan", "finite"), lr=float("nan")),
    config_case("warmup_steps-negative", ("warmup_steps=-10", ">= 0"), warmup_steps=-10),
    config_case("decay_start-negative", ("decay_start=-0.1", "[0, 1]"), decay_start=-0.1),
    config_case("decay_start-above-one", ("decay_start=1.5", "[0, 1]"), decay_start=1.5),
    config_case("adam_beta1-one", ("adam_beta1=1.0", "[0, 1)"), adam_beta1=1.0),
    config_case("adam_beta2-negative", ("adam_beta2=-0.1", "[0, 1)"), adam_beta2=-0.1),
    config_case("clip_grad_norm-negative", ("clip_grad_norm=-1.0", ">= 0"), clip_grad_norm=-1),
    config_case("optimizer-unknown", ("optimizer='sgd'", "row_sparse_adam"), optimizer="sgd"),
    config_case("moment_dtype-unknown", ("moment_dtype='float16'", "bfloat16"), moment_dtype="float16"),
    config_case("moment_dtype-bf16-dense", ("moment_dtype='bfloat16' needs optimizer='row_sparse_adam'",),
                moment_dtype="bfloat16"),
    config_case("resample_every_tokens-negative", ("resample_every_tokens=-1", ">= 0"), resample_every_tokens=-1),
    config_case("auxk-string", ("auxk='False'", "True or False"), auxk="False"),
    config_case("auxk-int", ("auxk=1", "True or False"), auxk=1),
    config_case("k_aux-negative", ("k_aux=-1", ">= 0"), k_aux=-1),
    config_case("aux_alpha-negative", ("aux_alpha=-0.5", ">= 0"), aux_alpha=-0.5),
    config_case("dead_after_tokens-zero", ("dead_after_tokens=0", ">= 1"), dead_after_tokens=0),
    config_case("dead_after_tokens-negative", ("dead_after_tokens=-100", ">= 1"), dead_after_tokens=-100),
    config_case("sparsity_coefficient-negative", ("sparsity_coefficient=-0.001", ">= 0"),
                architecture="relu", sparsity_coefficient=-1e-3),
    config_case("sparsity_warmup_steps-negative", ("sparsity_warmup_steps=-1", ">= 0"), sparsity_warmup_steps=-1),
    config_case("jumprelu_threshold-zero", ("jumprelu_threshold=0.0", "> 0"), architecture="jumprelu",
                jumprelu_threshold=0),
    config_case("matryoshka_inner-unknown", ("matryoshka_inner='relu'", "batchtopk"), architecture="matryoshka",
                matryoshka_inner="relu"),
    config_case("matryoshka_prefixes-not-ints", ("matryoshka_prefixes='a,b'", "comma-separated ints"),
                architecture="matryoshka", matryoshka_prefixes="a,b"),
    config_case("matryoshka_prefixes-descending", ("matryoshka_prefixes", "ascending"), architecture="matryoshka",
                matryoshka_prefixes="8,4"),
    config_case("matryoshka_random_prefixes-zero", ("matryoshka_random_prefixes=0", ">= 1"),
                matryoshka_random_prefixes=0),
    config_case("b_dec_init-unknown", ("b_dec_init='median'", "geometric_median"), b_dec_init="median"),
    config_case("init_from-not-a-path", ("init_from=3", "a string"), init_from=3),
    config_case("normalization-unknown", ("normalization='zscore'", "mean_norm"), normalization="zscore"),
    config_case("autocast-unknown", ("autocast='fp8'", "bfloat16"), autocast="fp8"),
    config_case("seed-negative", ("seed=-1", "[0, 2^32)"), seed=-1),
    config_case("seed-float", ("seed=1.5", "not a float"), seed=1.5),
    config_case("device-unknown", ("device='gpu'", "'cpu'", "'cuda:N'"), device="gpu"),
    config_case("backend-unknown", ("backend='fast'", "'torch'", "'triton'"), backend="fast"),
    config_case("out_dir-empty", ("out_dir=''", "non-empty"), out_dir=""),
    config_case("out_dir-blank", ("out_dir='   '", "non-empty"), out_dir="   "),
    config_case("name-parent", ("name='../x'", "must not leave out_dir"), name="../x"),
    config_case("name-absolute", ("name='/abs'", "must not leave out_dir"), name="/abs"),
    config_case("name-nested", ("name='a/b'", "one folder name"), name="a/b"),
    config_case("name-dotdot", ("name='..'", "must not leave out_dir"), name=".."),
    config_case("name-backslash", ("name='a\\\\b'", "one folder name"), name="a\\b"),
    config_case("name-blank", ("name='  '", "leading or trailing spaces"), name="  "),
    config_case("name-hidden", ("name='.x'", "start with '.'"), name=".x"),
    config_case("name-checkpoints", ("name='checkpoints'", "holds the checkpoints"), name="checkpoints"),
    config_case("checkpoint_every_tokens-negative", ("checkpoint_every_tokens=-64", ">= 0"),
                checkpoint_every_tokens=-64),
    config_case("resume-string", ("resume='yes'", "True or False"), resume="yes"),
    config_case("log_every-zero", ("log_every=0", ">= 1"), log_every=0),
    config_case("log_every-negative", ("log_every=-5", ">= 1"), log_every=-5),
    config_case("tensorboard-int", ("tensorboard=1", "True or False"), tensorboard=1),
    config_case("wandb_project-none", ("wandb_project=None", "a string"), wandb_project=None),
    config_case("progress-string", ("progress='no'", "True or False"), progress="no"),
    case("config-unknown-field", lambda tmp: tiny(tmp, warmup=3), TypeError, "warmup"),
    case("config-device-absent-gpu", lambda tmp: saeengine.train(acts(), tiny(tmp, device="cuda:99")), ConfigError,
         "device='cuda:99'", "use device='cpu'"),
]

# ----- data too small: each would spin forever at step 0 without its check --------------
DATA_CASES = [
    case("data-tensor-below-one-batch", lambda tmp: saeengine.train(acts(10), tiny(tmp)), ConfigError,
         "holds 10 tokens", "batch_size=32", "lower batch_size to at most 10", "more data", timeout=20),
    case("data-store-below-one-batch", lambda tmp: saeengine.train(str(write_store(tmp / "s", acts(10))), tiny(tmp)),
         ConfigError, "activation store", "holds 10 tokens", "batch_size=32", "more data", timeout=20),
    case("data-store-one-token", lambda tmp: saeengine.train(write_store(tmp / "s", acts(1)), tiny(tmp)),
         ConfigError, "holds 1 tokens", "at least 2 tokens", timeout=20),
    case("data-store-empty", lambda tmp: saeengine.train(write_store(tmp / "s", acts(0)), tiny(tmp)), ConfigError,
         "holds 0 tokens", "give more data", timeout=20),
    case("data-tensor-empty", lambda tmp: saeengine.train(torch.empty(0, D_IN), tiny(tmp)), ConfigError,
         "holds 0 tokens", timeout=20),
    case("data-tensor-1d", lambda tmp: saeengine.train(torch.randn(512), tiny(tmp)), ConfigError,
         "[tokens, d_in]", "(512,)"),
    case("data-tensor-no-columns", lambda tmp: saeengine.train(torch.empty(512, 0), tiny(tmp)), ConfigError,
         "d_in >= 1"),
    case("data-tensor-integers", lambda tmp: saeengine.train(torch.ones(512, D_IN, dtype=torch.int64), tiny(tmp)),
         ConfigError, "floating-point", "torch.int64"),
    case("data-not-data", lambda tmp: saeengine.train([1, 2, 3], tiny(tmp)), TypeError,
         "activation store directory or a tensor"),
    case("data-store-missing", lambda tmp: saeengine.train(str(tmp / "nowhere"), tiny(tmp)), StoreError, "nowhere"),
]

# ----- non-finite values ----------------------------------------------------------------
NONFINITE_CASES = [
    case("nonfinite-tensor-nan", lambda tmp: saeengine.train(with_nan(acts(), 77, 3), tiny(tmp)), NonFiniteError,
         "row 77", "column 3", "nan", "drop or repair"),
    case("nonfinite-tensor-inf", lambda tmp: saeengine.train(with_nan(acts(), 5, 0, float("-inf")), tiny(tmp)),
         NonFiniteError, "row 5", "-inf"),
    case("nonfinite-bf16-tensor", lambda tmp: saeengine.train(with_nan(acts(), 400, 7, float("inf")).bfloat16(),
                                                              tiny(tmp)), NonFiniteError, "row 400", "column 7"),
    case("nonfinite-huge-lr", lambda tmp: saeengine.train(acts(), tiny(tmp, lr=1e30)), NonFiniteError,
         "became nan or inf at step", "'sae'", "tensor rows", "diverged", "lower the learning rate"),
    case("nonfinite-store-row-in-init-sample",
         lambda tmp: _poisoned_run(tmp, sample_tokens=data_module.INIT_SAMPLE_TOKENS), NonFiniteError,
         f"rows {POISONED_ROW} (image 18, position 12)", "initializes the sae", "re-record"),
    case("nonfinite-store-row-in-a-batch", lambda tmp: _poisoned_run(tmp, sample_tokens=16), NonFiniteError,
         "became nan or inf at step", f"rows {POISONED_ROW} (image 18, position 12)", "hold nan or inf activations"),
]


def _poisoned_run(tmp: Path, sample_tokens: int):
    store = write_store(tmp / "store", acts())
    with poisoned_store_row(), mock.patch.object(data_module, "INIT_SAMPLE_TOKENS", sample_tokens):
        return saeengine.train(store, tiny(tmp, total_tokens=64 * BATCH))


# ----- stale results: a rerun or resume on other data -----------------------------------
def _rerun_default_out_dir(tmp: Path):
    """The README's call twice, on new data, with the default out_dir and resume=True."""
    with contextlib.chdir(tmp):
        cfg = TrainConfig(d_sae=16, k=2, total_tokens=4 * BATCH, batch_size=BATCH, device="cpu", progress=False)
        saeengine.train(acts(seed=0), cfg)
        return saeengine.train(acts(seed=1), cfg)


def _rerun_without_checkpoints(tmp: Path):
    """A finished run whose checkpoints were deleted: its saved SAE still names its data."""
    cfg = tiny(tmp)
    saeengine.train(acts(seed=0), cfg)
    for path in sorted((tmp / "run" / "checkpoints").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    return saeengine.train(acts(seed=1), cfg)


def _start_over(tmp: Path):
    cfg = tiny(tmp)
    saeengine.train(acts(seed=0), cfg)
    return saeengine.train(acts(seed=1), tiny(tmp, resume=False))


def _check_started_over(sae, tmp: Path) -> None:
    saved = json.loads((tmp / "run" / "sae" / "config.json").read_text())["provenance"]["data"]
    mine = data_module.TensorBatches(acts(seed=1), BATCH, 0, torch.device("cpu")).identity()
    assert saved == mine, "resume=False must train on, and record, the new data"
    loaded = saeengine.SAE.load(tmp / "run" / "sae")
    assert torch.equal(loaded.W_dec, sae.W_dec.detach())


def _sha(seed: int) -> str:
    return data_module.tensor_sha256(acts(seed=seed))


STALE_CASES = [
    case("stale-resume-other-tensor", lambda tmp: train_twice(tmp, acts(seed=0), acts(seed=1), tiny(tmp)),
         DataMismatchError, "the data differs", _sha(1), _sha(0), "another out_dir", "resume=False"),
    case("stale-default-out-dir-rerun", _rerun_default_out_dir, DataMismatchError, "runs/sae", _sha(1), _sha(0)),
    case("stale-finished-sae-without-checkpoint", _rerun_without_checkpoints, DataMismatchError,
         "the sae saved there", _sha(1), _sha(0)),
    case("stale-store-then-tensor",
         lambda tmp: train_twice(tmp, write_store(tmp / "s", acts()), acts(), tiny(tmp)), DataMismatchError,
         "activation store with content hash", "tensor of shape [512, 8]"),
    case("stale-resume-false-replaces-with-a-warning", _start_over, None, "resume=False", "replaces",
         "saved sae", warns=UserWarning, check=_check_started_over),
    case("stale-changed-math-on-rerun", lambda tmp: train_twice(tmp, acts(), acts(), tiny(tmp), k=3),
         CheckpointError, "TrainConfig.k is 3 in this run but 2", "resume=False"),
]

# ----- sweeps ---------------------------------------------------------------------------
SWEEP_CASES = [
    case("sweep-same-explicit-name", lambda tmp: saeengine.train(acts(), [tiny(tmp), tiny(tmp, k=3)]), ConfigError,
         "same name", "'sae'", "set TrainConfig.name"),
    case("sweep-same-built-name", lambda tmp: saeengine.train(acts(), [tiny(tmp, name=""), tiny(tmp, name="")]),
         ConfigError, "same name", "topk-F16-k2"),
    case("sweep-different-batch", lambda tmp: saeengine.train(acts(), [tiny(tmp), tiny(tmp, name="b", batch_size=64)]),
         ConfigError, "TrainConfig.batch_size must be equal across the sweep"),
    case("sweep-empty", lambda tmp: saeengine.train(acts(), []), ConfigError, "at least one TrainConfig"),
    case("sweep-not-configs", lambda tmp: saeengine.train(acts(), [tiny(tmp), {"k": 3}]), TypeError,
         "TrainConfig", "dict"),
    case("config-a-dict", lambda tmp: saeengine.train(acts(), {"k": 3}), TypeError, "TrainConfig", "dict"),
]


# ----- the run folder: in use, a full disk, a killed write --------------------------------
def _while_locked(tmp: Path):
    with exclusive_lock(tmp / "run", "training run folder"):
        return saeengine.train(acts(), tiny(tmp))


def _enospc_on(target, nth: int):
    """A patch of ``target`` (a function) that raises ENOSPC on its ``nth`` call."""
    calls = {"n": 0}

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return target(*args, **kwargs)
    return full


def _disk_full_in_state(tmp: Path):
    with mock.patch.object(checkpoints.torch, "save", _enospc_on(torch.save, 2)):
        return saeengine.train(acts(), tiny(tmp, checkpoint_every_tokens=2 * BATCH))


def _disk_full_at_latest(tmp: Path):
    with mock.patch.object(checkpoints, "atomic_write_bytes", _enospc_on(checkpoints.atomic_write_bytes, 2)):
        return saeengine.train(acts(), tiny(tmp, checkpoint_every_tokens=2 * BATCH))


def _disk_full_in_metrics(tmp: Path):
    real_open = open

    def opener(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    with mock.patch("builtins.open", opener):
        return saeengine.train(acts(), tiny(tmp))


def _damaged_metrics_tail(tmp: Path):
    """A run killed inside a metrics line write leaves half a line; the rerun drops it."""
    saeengine.train(acts(), tiny(tmp, checkpoint_every_tokens=4 * BATCH, total_tokens=4 * BATCH))
    metrics = tmp / "run" / "sae" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "fv')
    with mock.patch.object(logging.getLogger("saeengine"), "warning") as warned:
        saeengine.train(acts(), tiny(tmp, checkpoint_every_tokens=4 * BATCH))
    return warned, metrics


def _check_damaged_tail_dropped(result, tmp: Path) -> None:
    warned, metrics = result
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(8)), steps
    assert any("damaged line" in str(call) for call in warned.call_args_list)


FOLDER_CASES = [
    case("folder-locked", _while_locked, LockedError, "training run folder", "in use by pid", "wait for it"),
    case("disk-full-in-checkpoint-state", _disk_full_in_state, DiskFullError, "the disk is full", "step-000000004",
         "nothing half-written"),
    case("disk-full-at-latest-pointer", _disk_full_at_latest, DiskFullError, "the disk is full", "LATEST"),
    case("disk-full-in-metrics", _disk_full_in_metrics, DiskFullError, "the disk is full", "metrics.jsonl"),
    case("metrics-killed-mid-line", _damaged_metrics_tail, None, check=_check_damaged_tail_dropped),
    case("init_from-missing", lambda tmp: saeengine.train(acts(), tiny(tmp, init_from=str(tmp / "none"))),
         CheckpointError, "none"),
]

# ----- a run folder that resuming cannot check ---------------------------------------------
def _unverifiable_sae_folder(tmp: Path, damage) -> None:
    """A finished run, its checkpoints removed, its SAE's config.json damaged by
    ``damage(path)``; then the same run again with resume=True."""
    saeengine.train(acts(), tiny(tmp))
    shutil.rmtree(tmp / "run" / "checkpoints")
    damage(tmp / "run" / "sae" / "config.json")
    return saeengine.train(acts(), tiny(tmp))


def _edit_provenance(path: Path, edit) -> None:
    config = json.loads(path.read_text())
    edit(config["provenance"])
    path.write_text(json.dumps(config))


def _hand_saved_sae(tmp: Path):
    """An SAE saved by hand (no provenance) where the run saves its SAE."""
    saeengine.SAE(tiny().sae_config(D_IN)).save(tmp / "run" / "sae")
    return saeengine.train(acts(), tiny(tmp))


def _strip_checkpoint_data(tmp: Path) -> Path:
    """A run's checkpoint as an earlier version wrote it: no data identity in state.pt."""
    saeengine.train(acts(seed=0), tiny(tmp, checkpoint_every_tokens=4 * BATCH, total_tokens=4 * BATCH))
    latest = checkpoints.latest_checkpoint(tmp / "run")
    state = torch.load(latest / checkpoints.STATE, weights_only=True)
    del state["data"]
    torch.save(state, latest / checkpoints.STATE)
    return latest


def _resume_unidentified_checkpoint(tmp: Path):
    _strip_checkpoint_data(tmp)
    return saeengine.train(acts(seed=1), tiny(tmp, checkpoint_every_tokens=4 * BATCH))


def _check_resumed_to_the_end(sae, tmp: Path) -> None:
    assert checkpoints.latest_checkpoint(tmp / "run").name == "step-000000008"
    steps = [json.loads(line)["step"] for line in (tmp / "run" / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8)), steps  # steps 0..3 from the first run, 4..7 resumed


UNVERIFIABLE = ("run/sae holds a saved sae that this run cannot check", "another name (trainconfig.name) or out_dir",
                "resume=false to replace it")
RESUME_CASES = [
    case("resume-sae-config-unreadable", lambda tmp: _unverifiable_sae_folder(tmp, lambda p: p.write_text("{trunc")),
         CheckpointError, *UNVERIFIABLE, "config.json is unreadable"),
    case("resume-sae-config-deleted", lambda tmp: _unverifiable_sae_folder(tmp, lambda p: p.unlink()),
         CheckpointError, *UNVERIFIABLE, "config.json is unreadable"),
    case("resume-sae-without-data",
         lambda tmp: _unverifiable_sae_folder(tmp, lambda p: _edit_provenance(p, lambda v: v.pop("data"))),
         CheckpointError, *UNVERIFIABLE, "lacks provenance.data"),
    case("resume-sae-without-train-config",
         lambda tmp: _unverifiable_sae_folder(tmp, lambda p: _edit_provenance(p, lambda v: v.pop("train_config"))),
         CheckpointError, *UNVERIFIABLE, "lacks provenance.train_config"),
    case("resume-sae-steps-not-int",
         lambda tmp: _unverifiable_sae_folder(tmp, lambda p: _edit_provenance(p, lambda v: v.update(steps="8"))),
         CheckpointError, *UNVERIFIABLE, "provenance.steps"),
    case("resume-hand-saved-sae", _hand_saved_sae, CheckpointError, *UNVERIFIABLE,
         "lacks provenance.data, provenance.train_config, provenance.steps"),
    case("resume-checkpoint-without-data-identity", _resume_unidentified_checkpoint, None, "step-000000004",
         "records no data identity", "cannot be verified", "resume=False", warns=UserWarning,
         check=_check_resumed_to_the_end),
]

CASES = CONFIG_CASES + DATA_CASES + NONFINITE_CASES + STALE_CASES + SWEEP_CASES + FOLDER_CASES + RESUME_CASES
test_hostile = hostile_table(CASES)


# ----- what the table cannot check ------------------------------------------------------
def test_the_table_has_a_bad_value_for_every_train_config_field():
    ids = " ".join(c.id for c in CONFIG_CASES) + " "
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"config-{f.name}-" not in ids]
    assert not missing, f"add hostile cases for the TrainConfig fields {missing}"


def _first_step_with(row: int, n_tokens: int, steps: int) -> int:
    for step, (_, _, rows) in zip(range(steps), batch_positions(n_tokens, BATCH, 0)):
        if row in rows:
            return step
    raise AssertionError(f"row {row} is in no batch of the first {steps} steps")


def test_poisoned_store_row_names_the_first_step_that_reads_it(tmp_path):
    """The step named is the first whose batch holds the poisoned row (from the store's
    own batch order), its rows are that batch's, and nothing after it was logged or saved."""
    with pytest.raises(NonFiniteError) as caught:
        _poisoned_run(tmp_path, sample_tokens=16)
    expected = _first_step_with(POISONED_ROW, 512, 64)
    err = caught.value
    assert err.step == expected and err.saes == ["sae"] and POISONED_ROW in err.rows and len(err.rows) == BATCH
    assert f"at step {expected} " in str(err)
    lines = (tmp_path / "run" / "sae" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(expected))
    assert not (tmp_path / "run" / "sae" / "sae.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoints" / "LATEST").exists()


def test_divergence_keeps_the_checkpoints_before_it_finite_and_saves_nothing_after(tmp_path):
    """A run that diverges after some checkpoints (here its parameters go NaN while the
    losses are still finite: a gradient overflows): every checkpoint left is finite and
    older than the bad step, no SAE is saved, and the same run resumed from it fails at
    the same step (the check is not a fluke of the first attempt)."""
    cfg = tiny(tmp_path, lr=1e8, warmup_steps=1, total_tokens=30 * BATCH, checkpoint_every_tokens=BATCH,
               clip_grad_norm=0.0)
    with pytest.raises(NonFiniteError) as first:
        saeengine.train(acts(), cfg)
    step = first.value.step
    assert step >= 2, "the run must diverge after a few checkpoints for this test to mean anything"
    latest = checkpoints.latest_checkpoint(tmp_path / "run")
    saved = torch.load(latest / "state.pt", weights_only=True)
    assert saved["step"] <= step
    sae = saeengine.SAE.load(latest / "sae")
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values() if t.is_floating_point())
    assert not (tmp_path / "run" / "sae" / "sae.safetensors").exists()
    with pytest.raises(NonFiniteError) as again:
        saeengine.train(acts(), cfg)
    assert again.value.step == step


def test_disk_full_at_the_latest_pointer_keeps_the_checkpoint_before(tmp_path):
    """A full disk when LATEST is replaced: the checkpoint just renamed into place is
    dropped (LATEST never named it), the one before stays, and a resume ends as a run
    that never failed."""
    with pytest.raises(DiskFullError):
        _disk_full_at_latest(tmp_path)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-000000002"]
    assert (root / "LATEST").read_text() == "step-000000002"
    resumed = saeengine.train(acts(), tiny(tmp_path, checkpoint_every_tokens=2 * BATCH))
    fresh = saeengine.train(acts(), tiny(tmp_path / "fresh", checkpoint_every_tokens=2 * BATCH))
    assert torch.equal(resumed.W_dec, fresh.W_dec) and torch.equal(resumed.W_enc, fresh.W_enc)


@contextlib.contextmanager
def watch_policy(every_step: bool):
    """The watch reads on the host after every step (the CPU policy), or, as on a GPU, only
    at log lines, checkpoints and the end."""
    init = finite.NonFiniteWatch.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.every_step = every_step

    with mock.patch.object(finite.NonFiniteWatch, "__init__", patched):
        yield


def test_gpu_policy_names_the_same_first_bad_step_between_log_lines(tmp_path):
    """With no log line or checkpoint before the end, the watch still names the step at
    which the loss first went non-finite: the same step as the per-step CPU check."""
    caught = {}
    for every_step in (True, False):
        with watch_policy(every_step), pytest.raises(NonFiniteError) as err:
            saeengine.train(acts(), tiny(tmp_path / str(every_step), lr=1e30, total_tokens=20 * BATCH,
                                         log_every=1000))
        caught[every_step] = err.value.step
        assert not (tmp_path / str(every_step) / "run" / "sae" / "sae.safetensors").exists()
    assert caught[True] == caught[False] < 19, caught


def test_gpu_policy_adds_no_host_sync_per_step(tmp_path):
    """Counted as on a GPU (saeengine.syncs): a run of 30 steps syncs as often as one of
    10 (row-sparse Adam on the torch backend has no per-step sync of its own)."""
    from saeengine.syncs import count_host_syncs

    totals = []
    for steps in (10, 30):
        cfg = tiny(tmp_path / str(steps), total_tokens=steps * BATCH, log_every=1000, optimizer="row_sparse_adam")
        with watch_policy(False), count_host_syncs() as syncs:
            saeengine.train(acts(), cfg)
        totals.append(syncs.total)
    assert totals[0] == totals[1], totals


# ----- issue 14 review: BatchTopK's unset threshold, the watch's kernels, unverifiable folders, the hash
def _never_firing_init(tmp: Path, cfg: TrainConfig) -> Path:
    """A saved SAE whose latents cannot fire (b_enc far below any pre-activation), so a
    BatchTopK threshold stays NaN ("not set yet") through the first steps of training."""
    sae = saeengine.SAE(cfg.sae_config(D_IN))
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
    return sae.save(tmp / "init")


@pytest.mark.parametrize("architecture", [dict(architecture="batchtopk"),
                                          dict(architecture="matryoshka", matryoshka_inner="batchtopk")],
                         ids=["batchtopk", "matryoshka-batchtopk"])
def test_batchtopk_checkpoints_before_its_threshold_is_set(tmp_path, architecture):
    """A checkpoint at the very first steps, while the threshold is still NaN, is saved (as
    save_sae would save it), not refused as a diverged run; and the run resumes from it."""
    cfg = tiny(tmp_path, total_tokens=2 * BATCH, checkpoint_every_tokens=BATCH, **architecture)
    cfg = TrainConfig(**{**cfg.to_dict(), "init_from": str(_never_firing_init(tmp_path, cfg))})
    sae = saeengine.train(acts(), cfg)
    assert torch.isnan(sae.threshold), "the threshold must still be unset for this test to mean anything"
    latest = checkpoints.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-000000002"
    assert torch.isnan(saeengine.SAE.load(latest / "sae").threshold)
    resumed = saeengine.train(acts(), TrainConfig(**{**cfg.to_dict(), "total_tokens": 3 * BATCH}))
    assert torch.isfinite(resumed.W_dec).all()
    assert checkpoints.latest_checkpoint(tmp_path / "run").name == "step-000000003"


def test_an_inf_threshold_is_still_refused_before_saving(tmp_path):
    """NaN is allowed in the threshold, inf is not: the error names the SAE and the tensor."""
    cfg = tiny(tmp_path, architecture="batchtopk", total_tokens=2 * BATCH, checkpoint_every_tokens=BATCH)
    real = finite.NonFiniteWatch.check_before_save

    def poisoned(self, runs, step, source, cfg):
        runs[0].sae.threshold.fill_(float("inf"))
        return real(self, runs, step, source, cfg)

    with mock.patch.object(finite.NonFiniteWatch, "check_before_save", poisoned), \
            pytest.raises(NonFiniteError) as caught:
        saeengine.train(acts(), cfg)
    assert "'sae': 'threshold' (1 of 1 values)" in str(caught.value)
    assert caught.value.step == 0 and not (tmp_path / "run" / "checkpoints" / "LATEST").exists()


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators that compute (views excluded): on a GPU, one kernel each."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def _losses(fvu: float, auxk: float = 0.0, sparsity: float = 0.0, dtype=torch.float32) -> dict:
    return {"fvu": torch.tensor(fvu, dtype=dtype), "auxk": torch.tensor(auxk, dtype=dtype),
            "sparsity": torch.tensor(sparsity, dtype=dtype), "k": 2, "lr": 1e-3}


@pytest.mark.parametrize("n_saes", [1, 4])
def test_the_watch_takes_a_few_kernels_per_step_whatever_the_sweep(n_saes):
    watch = finite.NonFiniteWatch([f"s{i}" for i in range(n_saes)], torch.device("cpu"))
    metrics = [_losses(0.5, 0.1, 0.2) for _ in range(n_saes)]
    with _CountOps() as ops:
        watch.update(0, metrics)
    assert ops.count <= 6, ops.count  # stack, sum, mul, eq, clamp, where (it was 6 per SAE + 5)


def test_the_watch_keeps_the_first_bad_step_of_each_sae():
    """Per SAE, the first step whose loss (any term) was NaN or inf, kept through later bad
    steps; finite fp16 terms whose fp16 sum would overflow are not bad."""
    watch = finite.NonFiniteWatch(["a", "b", "c", "d"], torch.device("cpu"))
    for step in range(5):
        watch.update(step, [
            _losses(0.5, auxk=float("inf") if step >= 1 else 0.0),  # bad from step 1 on
            _losses(0.5, sparsity=float("nan") if step == 3 else 0.0),  # bad at step 3 only
            _losses(6e4, 6e4, 6e4, dtype=torch.float16),  # finite, 1.8e5 in all
            _losses(float("nan") if step in (2, 4) else 0.5),  # bad at steps 2 and 4
        ])
    assert watch.first_bad.tolist() == [1, 3, finite.NO_BAD_STEP, 2]


def test_the_watch_adds_no_host_sync():
    from saeengine.syncs import count_host_syncs

    watch = finite.NonFiniteWatch(["a", "b"], torch.device("cpu"))
    metrics = [_losses(0.5), _losses(float("nan"))]
    with count_host_syncs() as syncs:
        for step in range(3):
            watch.update(step, metrics)
    assert syncs.total == 0


def test_an_unverifiable_saved_sae_is_left_as_it_was(tmp_path):
    """The refusal comes before anything is written: the hand-saved SAE's files keep
    their bytes, and no metrics or checkpoints appear."""
    directory = tmp_path / "run" / "sae"
    saeengine.SAE(tiny().sae_config(D_IN)).save(directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(CheckpointError):
        saeengine.train(acts(), tiny(tmp_path))
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert not (tmp_path / "run" / "checkpoints").exists()
    # resume=False replaces it, with the documented warning
    with pytest.warns(UserWarning, match="resume=False"):
        saeengine.train(acts(), tiny(tmp_path, resume=False))
    assert json.loads((directory / "config.json").read_text())["provenance"]["steps"] == 8


def test_a_tensor_is_hashed_once_before_the_first_step(tmp_path):
    """The SHA-256 of a tensor (a full host copy) is taken at the start, not at the first
    checkpoint in the middle of the run."""
    events = []
    real_hash, real_step = data_module.tensor_sha256, saeengine.trainer.step.TrainStep.__call__

    def hashing(t):
        events.append("hash")
        return real_hash(t)

    def stepping(self, x):
        events.append("step")
        return real_step(self, x)

    with mock.patch.object(data_module, "tensor_sha256", hashing), \
            mock.patch.object(saeengine.trainer.step.TrainStep, "__call__", stepping):
        saeengine.train(acts(), tiny(tmp_path, checkpoint_every_tokens=2 * BATCH))
    assert events[0] == "hash" and events.count("hash") == 1, events
