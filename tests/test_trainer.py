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


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU; test_row_sparse_adam_with_resampling_recovers_atoms is the CPU counterpart")
def test_row_sparse_training_on_gpu_steps_on_sparse_gradients(tmp_path, planted, monkeypatch):
    from saeengine.optim import RowSparseAdam

    sparse_steps = []
    step = RowSparseAdam.step

    def spy(self, rows, **kwargs):
        sparse_steps.append(self.sae.W_enc.grad.is_sparse and self.sae.W_dec.grad.is_sparse)
        return step(self, rows, **kwargs)

    monkeypatch.setattr(RowSparseAdam, "step", spy)
    sae = saeengine.train(planted.activations, quick(tmp_path, optimizer="row_sparse_adam", device="cuda"))
    assert sparse_steps and all(sparse_steps)
    assert dictionary_recovery(planted.atoms, sae.W_dec.detach().cpu()) >= 0.9


@pytest.mark.parametrize("auxk", [True, False], ids=["auxk", "no_auxk"])
def test_row_sparse_step_has_no_host_sync(tmp_path, kernel_device, monkeypatch, auxk):
    """A training step on the sparse kernels (sparse weight gradients, row-sparse Adam,
    clipping on) has no syncing op: the fired rows, the gradients' row counts and the
    clipping norm stay on the device, and the dead latents come listed from the step
    before. (Only the first step after a start lists them for itself, and waits for that
    on a GPU.)"""
    from saeengine.optim import dead_latents_later
    from saeengine.syncs import count_host_syncs
    from saeengine.trainer import loop

    cfg = TrainConfig(d_sae=96, k=4, k_aux=8, auxk=auxk, batch_size=16, total_tokens=64, device=kernel_device.type,
                      backend="triton", optimizer="row_sparse_adam", out_dir=str(tmp_path), progress=False)
    run = loop._make_run(cfg, 24, kernel_device, tmp_path)
    run.tokens_seen = cfg.dead_after_tokens
    run.last_fired[12:] = cfg.dead_after_tokens  # latents 0..11 dead
    x = torch.randn(16, 24, device=kernel_device)
    listings = []
    monkeypatch.setattr(loop, "dead_latents_later", lambda mask: listings.append(mask.clone()) or
                        dead_latents_later(mask))
    with count_host_syncs() as syncs:
        loop._train_step(run, x, 0, kernel_device)
        loop._train_step(run, x, 1, kernel_device)
    assert run.sae.W_enc.grad.is_sparse and run.sae.W_dec.grad.is_sparse
    assert syncs.total == 0, dict(syncs.by_op)
    # Step 0 lists its own dead and the next step's, step 1 the next step's only.
    assert len(listings) == (3 if auxk else 0)
    assert run.sae(x, dead_mask=run.dead, check=False).code.aux is not None or not auxk  # the dead stay dead


def _metric_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_auxk_revives_dead_latents(tmp_path):
    """A setting built to have dead latents: an SAE with as many latents as planted atoms
    whose first half starts with encoder rows shrunk 20x, so those latents never win the
    top-k and the live half cannot cover every atom. Without AuxK they never receive a
    gradient and stay dead; AuxK trains them on the residual until they fire."""
    data = planted_dictionary(40_000, 32, 128, 4, seed=1)
    start = saeengine.SAE(saeengine.SAEConfig(d_in=32, d_sae=128, k=4), seed=0)
    saeengine.trainer.init_from_sample(start, data.activations[:4096], "geometric_median")
    with torch.no_grad():
        start.W_enc[:64] *= 0.05
    start.save(tmp_path / "start")
    dead, recovery = {}, {}
    for auxk in (False, True):
        cfg = TrainConfig(d_sae=128, k=4, k_aux=16, auxk=auxk, total_tokens=600 * 512, batch_size=512, lr=3e-3,
                          warmup_steps=10, dead_after_tokens=2048, init_from=str(tmp_path / "start"),
                          out_dir=str(tmp_path / f"auxk-{auxk}"), progress=False)
        sae = saeengine.train(data.activations, cfg)
        dead[auxk] = _metric_lines(tmp_path / f"auxk-{auxk}" / cfg.run_name)[-1]["dead"]
        recovery[auxk] = dictionary_recovery(data.atoms, sae.W_dec)
    print("dead fraction", dead, "recovery", recovery)
    assert dead[False] >= 0.4, dead          # the built setting does create dead latents
    assert dead[True] <= dead[False] / 4, dead
    assert recovery[True] > recovery[False], recovery


def test_k_annealing_schedule_and_training(tmp_path, planted):
    cfg = quick(tmp_path, k=3, k_anneal_from=12, k_anneal_fraction=0.5, total_tokens=100 * 256, log_every=10)
    assert [cfg.k_at(s) for s in (0, 25, 50, 99)] == [12, 8, 3, 3]  # linear over half of 100 steps
    saeengine.train(planted.activations, cfg)
    lines = _metric_lines(tmp_path / "run" / cfg.run_name)
    assert [line["k"] for line in lines] == [cfg.k_at(line["step"]) for line in lines]
    assert lines[0]["l0"] > 8 and lines[-1]["l0"] <= 3
    with pytest.raises(ValueError, match="k_anneal_from=2"):
        quick(tmp_path, k=3, k_anneal_from=2)
    with pytest.raises(ValueError, match="relu"):
        quick(tmp_path, architecture="relu", k_anneal_from=12)


def test_init_from_saved_sae(tmp_path, planted):
    first = saeengine.train(planted.activations[:20_000], quick(tmp_path / "a", total_tokens=20 * 256))
    # Continue on other data: the saved normalization is kept, not refitted.
    cfg = quick(tmp_path / "b", total_tokens=2 * 256, init_from=str(tmp_path / "a" / "run" / quick(tmp_path).run_name))
    second = saeengine.train(planted.activations[20_000:] * 3.0, cfg)
    assert torch.equal(second.norm_scale, first.norm_scale) and torch.equal(second.norm_mean, first.norm_mean)
    assert (second.W_dec - first.W_dec).abs().max() < 0.1  # two small steps from the saved weights
    with pytest.raises(saeengine.checkpoint.CheckpointError, match="d_sae=256 but this run has 512"):
        saeengine.train(planted.activations, quick(tmp_path / "c", d_sae=512, init_from=cfg.init_from))


def test_tensorboard_events_match_jsonl(tmp_path, planted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = quick(tmp_path, total_tokens=30 * 256, log_every=10, tensorboard=True)
    saeengine.train(planted.activations, cfg)
    run_dir = tmp_path / "run" / cfg.run_name
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    fvu = [(e.step, e.value) for e in events.Scalars("train/fvu")]
    lines = _metric_lines(run_dir)
    assert [s for s, _ in fvu] == [line["step"] for line in lines]
    np.testing.assert_allclose([v for _, v in fvu], [line["fvu"] for line in lines], rtol=1e-6)


def test_wandb_logging_and_missing_package(tmp_path, planted, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append((step, data))

        def finish(self):
            calls.append("finish")

    fake = type(sys)("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = quick(tmp_path, total_tokens=20 * 256, log_every=10, wandb_project="saes")
    saeengine.train(planted.activations, cfg)
    assert calls[0]["project"] == "saes" and calls[0]["name"] == cfg.run_name and calls[0]["resume"] == "allow"
    assert [step for step, _ in calls[1:-1]] == [0, 10, 19] and calls[-1] == "finish"
    assert {"fvu", "l0", "dead", "lr"} <= set(calls[1][1])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        saeengine.train(planted.activations, quick(tmp_path / "again", wandb_project="saes"))


def test_bf16_moments_train_with_row_sparse_adam(tmp_path, planted):
    cfg = quick(tmp_path, optimizer="row_sparse_adam", moment_dtype="bfloat16", total_tokens=30 * 256)
    sae = saeengine.train(planted.activations, cfg)
    assert torch.isfinite(sae.W_dec).all()
    with pytest.raises(ValueError, match="moment_dtype='bfloat16' needs optimizer='row_sparse_adam'"):
        quick(tmp_path, moment_dtype="bfloat16")
