"""The training engine: atom recovery, bit-exact kill-and-resume (a real SIGKILL), sweeps
sharing batches, initialization, schedules, config errors, the CLI."""

import json
import os
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
from saeengine.trainer import geometric_median, initial_sae


def quick(tmp_path, **overrides) -> TrainConfig:
    settings = dict(d_sae=256, k=3, total_tokens=400 * 256, batch_size=256, lr=3e-3, warmup_steps=20,
                    dead_after_tokens=20_000, out_dir=str(tmp_path / "run"), progress=False, log_every=50)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def planted():
    """64 atoms in R^32, 3 per token: from a start far from them (recovery 0.48), 400 steps
    reach 0.992 (topk) and 0.970 (batchtopk). (With 128 atoms batchtopk stalls near 0.92.)"""
    return planted_dictionary(60_000, 32, 64, 3, seed=0)


START_BAR = 0.6  # recovery of the decoder a run starts from, far below the 0.9 training must reach


def recovery_at_start(planted, cfg: TrainConfig) -> float:
    """Recovery of the decoder a fresh run of cfg starts from (the data are drawn apart from
    the SAE's seed: were they not, its first rows would be the atoms, recovery 1.0)."""
    return dictionary_recovery(planted.atoms, initial_sae(cfg, planted.atoms.shape[1]).W_dec)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_recovers_planted_atoms(tmp_path, planted, architecture):
    cfg = quick(tmp_path, architecture=architecture)
    assert recovery_at_start(planted, cfg) < START_BAR
    start = time.perf_counter()
    sae = saeengine.train(planted.activations, cfg)
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


KILL_STEPS = 400  # a run long enough to be killed mid-way from outside, short enough to run twice


def _train_cmd(store, out, *extra):
    return [sys.executable, "-m", "saeengine.cli", "train", "--data", str(store), "--out-dir", str(out),
            "--d-sae", "64", "--k", "3", "--batch-size", "64", "--total-tokens", str(64 * KILL_STEPS), "--lr", "0.003",
            "--checkpoint-every-tokens", str(64 * 20), "--no-progress", "--device", "cpu", *extra]


def test_kill_and_resume_is_bit_exact(tmp_path, monkeypatch):
    """A fresh CLI process killed from outside at a moment it does not choose (mid-step,
    mid-write or between), then the same command again: it ends bit for bit as the
    uninterrupted run. Those two run in this process (saeengine.cli.main, no second
    import), on one thread as the killed one. (tests/test_resume.py kills at each point
    of the checkpoint write in turn.)"""
    from saeengine.cli import main

    store = tmp_path / "store"
    _write_store(store)
    proc = subprocess.Popen(_train_cmd(store, tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = tmp_path / "b" / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step-000000100"):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()}"
    killed_at = latest.read_text()
    assert killed_at < f"step-{KILL_STEPS:09d}"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_train_cmd(store, tmp_path / "a")[3:]) == 0
        assert main(_train_cmd(store, tmp_path / "b")[3:]) == 0
    finally:
        torch.set_num_threads(threads)
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
    assert recovery_at_start(planted, cfg) < START_BAR
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
    cfg = quick(tmp_path, optimizer="row_sparse_adam", device="cuda")
    assert recovery_at_start(planted, cfg) < START_BAR
    sae = saeengine.train(planted.activations, cfg)
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
    from saeengine.trainer import TrainStep, step as step_module

    cfg = TrainConfig(d_sae=96, k=4, k_aux=8, auxk=auxk, batch_size=16, total_tokens=64, device=kernel_device.type,
                      backend="triton", optimizer="row_sparse_adam", out_dir=str(tmp_path), progress=False)
    sae = saeengine.SAE(cfg.sae_config(24), device=kernel_device, seed=cfg.seed)
    train_step = TrainStep(sae, cfg)
    train_step.tokens_seen = cfg.dead_after_tokens
    train_step.last_fired[12:] = cfg.dead_after_tokens  # latents 0..11 dead
    x = torch.randn(16, 24, device=kernel_device)
    listings = []
    monkeypatch.setattr(step_module, "dead_latents_later", lambda mask: listings.append(mask.clone()) or
                        dead_latents_later(mask))
    with count_host_syncs() as syncs:
        train_step(x)
        train_step(x)
    assert sae.W_enc.grad.is_sparse and sae.W_dec.grad.is_sparse
    assert syncs.total == 0, dict(syncs.by_op)
    # Step 0 lists its own dead and the next step's, step 1 the next step's only.
    assert len(listings) == (3 if auxk else 0)
    assert train_step.steps_done == 2 and train_step.tokens_seen == cfg.dead_after_tokens + 32
    assert sae(x, dead_mask=train_step.dead, check=False).code.aux is not None or not auxk  # the dead stay dead


def _metric_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_last_metrics_line_is_the_final_step(tmp_path, planted):
    """What the CLI prints at the end of a run: the last line of metrics.jsonl is the final
    step (logged even when log_every does not divide the steps), with fvu, l0 and dead;
    a rerun of the finished run trains nothing and keeps it so."""
    cfg = quick(tmp_path, total_tokens=23 * 256, log_every=10)
    saeengine.train(planted.activations, cfg)
    run_dir = tmp_path / "run" / cfg.run_name
    lines = _metric_lines(run_dir)
    assert [line["step"] for line in lines] == [0, 10, 20, 22]
    assert lines[-1]["tokens"] == 23 * 256 and {"fvu", "l0", "dead"} <= set(lines[-1])
    assert 0 <= lines[-1]["dead"] <= 1 and lines[-1]["l0"] <= 3
    saeengine.train(planted.activations, cfg)
    assert _metric_lines(run_dir) == lines


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
    assert dictionary_recovery(data.atoms, start.W_dec) < START_BAR  # both runs start far from the atoms
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


def _expected_batches(data, batch_size, seed, count):
    from saeengine.store import batch_positions

    positions = batch_positions(data.shape[0], batch_size, seed)
    return [data[torch.from_numpy(next(positions)[2])].float() for _ in range(count)]


def test_tensor_batches_follow_the_store_order_and_resume():
    from saeengine.trainer.data import TensorBatches

    data = torch.randn(300, 5).to(torch.bfloat16)
    source = TensorBatches(data, 64, seed=3, device=torch.device("cpu"))
    batches = iter(source)
    got = [next(batches) for _ in range(6)]  # past one epoch (4 batches of 300 tokens)
    expected = _expected_batches(data, 64, 3, 6)
    assert all(g.dtype == torch.float32 and torch.equal(g, e) for g, e in zip(got, expected))
    resumed = TensorBatches(data, 64, seed=3, device=torch.device("cpu"))
    resumed.load_state_dict({"epoch": 0, "batch_in_epoch": 2})
    assert torch.equal(next(iter(resumed)), expected[2])
    same = TensorBatches(data.clone(), 64, seed=0, device=torch.device("cpu")).identity()
    assert same == source.identity() and same["shape"] == [300, 5] and same["dtype"] == "bfloat16"
    changed = data.clone()
    changed[299, 4] = 7.0
    assert TensorBatches(changed, 64, seed=3, device=torch.device("cpu")).identity() != same


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (pinned memory); test_tensor_batches_follow_the_store_order_and_resume "
                           "checks the same batches on the CPU")
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_tensor_batches_reach_the_gpu_without_a_host_sync(where):
    """An in-memory tensor on the host (or on the GPU) gives CUDA batches through pinned,
    non-blocking copies (of the rows, or of the row ids): no blocking copy is counted."""
    from saeengine.syncs import count_host_syncs
    from saeengine.trainer.data import TensorBatches

    data = torch.randn(1000, 24).to(where)
    batches = iter(TensorBatches(data, 128, seed=1, device=torch.device("cuda")))
    with count_host_syncs() as syncs:
        got = [next(batches) for _ in range(12)]  # more batches than pinned buffers
    assert syncs.total == 0, dict(syncs.by_op)
    for g, e in zip(got, _expected_batches(data.cpu(), 128, 1, 12)):
        assert g.is_cuda and torch.equal(g.cpu(), e)


def test_train_step_takes_its_flags_from_the_optimizer_and_the_config(monkeypatch):
    """The forward gets sparse gradients when the optimizer asks for them, the expert
    overrides of forward_options, the annealed k; the optimizer gets the scheduled lr."""
    import dataclasses

    from saeengine.trainer import TrainStep

    cfg = TrainConfig(d_sae=32, k=2, k_anneal_from=6, k_anneal_fraction=0.5, batch_size=8, total_tokens=80,
                      warmup_steps=4, optimizer="row_sparse_adam", device="cpu", backend="torch")
    sae = saeengine.SAE(cfg.sae_config(6), seed=0)
    calls = []
    forward = saeengine.SAE.forward
    monkeypatch.setattr(saeengine.SAE, "forward", lambda self, x, **kw: calls.append(kw) or forward(self, x, **kw))
    x = torch.randn(8, 6)
    row_sparse = TrainStep(sae, cfg, forward_options={"weight_copies": False})
    metrics = [row_sparse(x) for _ in range(3)]
    assert [c["sparse_grad"] for c in calls] == [True] * 3 and all(c["weight_copies"] is False for c in calls)
    assert [c["k"] for c in calls] == [6, 5, 4] == [m["k"] for m in metrics]  # 6 -> 2 over 5 of 10 steps
    assert [m["lr"] for m in metrics] == [cfg.learning_rate * f for f in (0.25, 0.5, 0.75)]
    assert row_sparse.optimizer.lr == metrics[-1]["lr"] and row_sparse.steps_done == 3
    dense = TrainStep(sae, dataclasses.replace(cfg, optimizer="adam"))
    dense(x)
    assert calls[-1]["sparse_grad"] is False and "weight_copies" not in calls[-1]
    with pytest.raises(ValueError, match=r"forward_options may not set \['sparse_grad'\]"):
        TrainStep(sae, cfg, forward_options={"sparse_grad": False})
    with pytest.raises(ValueError, match="d_sae: the SAE has 32, cfg 64"):
        TrainStep(sae, dataclasses.replace(cfg, d_sae=64))
    with pytest.raises(TypeError, match="SAEOptimizer"):
        TrainStep(sae, cfg, torch.optim.Adam(sae.parameters()))
