"""The training engine: atom recovery, bit-exact kill-and-resume (a real SIGKILL), sweeps
sharing batches, initialization, schedules, config errors, the CLI."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import saeengine
from saeengine import TrainConfig
from saeengine.store import ActivationWriter
from saeengine.synthetic import dictionary_recovery, planted_dictionary
from saeengine.trainer import geometric_median


def quick(tmp_path, **overrides) -> TrainConfig:
    settings = dict(d_sae=256, k=3, total_tokens=400 * 256, batch_size=256, lr=3e-3, warmup_steps=20,
                    dead_after_tokens=20_000, out_dir=str(tmp_path / "run"), progress=False, log_every=50)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def planted():
    return planted_dictionary(60_000, 32, 128, 3, seed=0)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_recovers_planted_atoms(tmp_path, planted, architecture):
    start = time.perf_counter()
    sae = saeengine.train(planted.activations, quick(tmp_path, architecture=architecture))
    assert time.perf_counter() - start < 60
    assert dictionary_recovery(planted.atoms, sae.W_dec) >= 0.9
    run_dir = tmp_path / "run" / f"{architecture}-F256-k3-lr0.003"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(0, 400, 50)) + [399]
    assert {"fvu", "l0", "dead", "auxk", "lr", "tokens_per_s"} <= set(lines[-1])
    assert lines[-1]["fvu"] < lines[0]["fvu"]
    loaded = saeengine.SAE.load(run_dir)
    assert torch.equal(loaded.W_dec, sae.W_dec.detach())


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_penalized_architectures_train(tmp_path, planted, architecture):
    cfg = quick(tmp_path, architecture=architecture, total_tokens=60 * 256, sparsity_warmup_steps=30)
    sae = saeengine.train(planted.activations, cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["sparsity"] > 0 and lines[-1]["fvu"] < lines[0]["fvu"]
    if architecture == "jumprelu":  # the straight-through estimator moved the thresholds
        assert not torch.allclose(sae.log_threshold, torch.full_like(sae.log_threshold, np.log(1e-3)))


def test_sweep_equals_separate_runs(tmp_path, planted):
    configs = [quick(tmp_path / "sweep", k=k, total_tokens=50 * 256) for k in (2, 4)]
    sweep = saeengine.train(planted.activations, configs)
    for cfg, sae in zip(configs, sweep):
        alone = saeengine.train(planted.activations, quick(tmp_path / f"alone{cfg.k}", k=cfg.k, total_tokens=50 * 256))
        for name, tensor in sae.state_dict().items():
            assert torch.equal(tensor, alone.state_dict()[name]), (cfg.k, name)


def test_sweep_must_share_data_settings(tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.batch_size must be equal across the sweep"):
        saeengine.train(torch.randn(1000, 8), [quick(tmp_path), quick(tmp_path, batch_size=128, k=2)])
    with pytest.raises(ValueError, match="same name"):
        saeengine.train(torch.randn(1000, 8), [quick(tmp_path), quick(tmp_path)])
    with pytest.raises(ValueError, match="architecture='mlp'"):
        quick(tmp_path, architecture="mlp")
    with pytest.raises(TypeError, match="activation store directory or a tensor"):
        saeengine.train([1, 2, 3], quick(tmp_path))


def test_learning_rate_schedule():
    cfg = TrainConfig(total_tokens=1000 * 10, batch_size=10, warmup_steps=100, decay_start=0.8)
    factors = [cfg.lr_factor(s) for s in range(cfg.steps)]
    assert factors[0] == pytest.approx(0.01) and factors[99] == 1.0 and factors[500] == 1.0
    assert factors[800] == 1.0 and factors[900] == pytest.approx(0.5) and factors[-1] == pytest.approx(0.005)
    assert TrainConfig(d_sae=2**16).learning_rate == pytest.approx(1e-4)


def test_geometric_median_resists_outliers():
    gen = torch.Generator().manual_seed(0)
    inliers = torch.randn(200, 5, generator=gen) * 0.1 + 3.0
    points = torch.cat([inliers, torch.full((40, 5), 100.0)])
    median = geometric_median(points)

    def objective(y):
        return (points.double() - y.double()).norm(dim=1).sum()

    assert (median - 3.0).abs().max() < 0.2  # the mean is pulled to ~19
    assert objective(median) < objective(points.mean(0))
    for direction in torch.eye(5):  # a minimum: no small step improves it
        assert objective(median) <= objective(median + 1e-3 * direction)


def _write_store(directory, n=20_000, d=16):
    data = planted_dictionary(n, d, 48, 3, seed=1).activations
    with ActivationWriter(directory, d_in=d, dtype="float32", shard_tokens=4096) as writer:
        writer.add(data, np.arange(n) // 16, np.arange(n) % 16)


def _train_cmd(store, out, *extra):
    return [sys.executable, "-m", "saeengine.cli", "train", "--data", str(store), "--out-dir", str(out),
            "--d-sae", "64", "--k", "3", "--batch-size", "64", "--total-tokens", str(64 * 1500), "--lr", "0.003",
            "--checkpoint-every-tokens", str(64 * 40), "--no-progress", "--device", "cpu", *extra]


def test_kill_and_resume_is_bit_exact(tmp_path):
    store = tmp_path / "store"
    _write_store(store)
    uninterrupted = subprocess.run(_train_cmd(store, tmp_path / "a"), capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    proc = subprocess.Popen(_train_cmd(store, tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "b" / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step-000000200"):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = latest.read_text()
    assert killed_at < "step-000001500"

    resumed = subprocess.run(_train_cmd(store, tmp_path / "b"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    name = "topk-F64-k3-lr0.003"
    a = load_file(str(tmp_path / "a" / name / "sae.safetensors"))
    b = load_file(str(tmp_path / "b" / name / "sae.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / name / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the resumed run rewrote the lines after its checkpoint


def test_train_cli_help_lists_every_field():
    out = subprocess.run([sys.executable, "-m", "saeengine.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for field in ("--d-sae", "--checkpoint-every-tokens", "--no-auxk", "--sweep", "Number of latents F."):
        assert field in out.stdout


def test_row_sparse_adam_with_resampling_recovers_atoms(tmp_path, planted):
    cfg = quick(tmp_path, optimizer="row_sparse_adam", resample_every_tokens=100 * 256, name="rs")
    sae = saeengine.train(planted.activations, cfg)
    assert dictionary_recovery(planted.atoms, sae.W_dec) >= 0.9
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)
