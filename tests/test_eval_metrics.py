"""ReconstructionMetrics against an independent float64 numpy recomputation and scikit-learn,
batch-splitting and save/load invariance, and its input checks."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import explained_variance_score, mean_squared_error, r2_score

from conftest import requires_gpu
from saeengine import SAE, SAEConfig
from saeengine.errors import CheckpointError, InputError, NonFiniteError
from saeengine.eval.batch import TokenBatch, code_pairs
from saeengine.eval.metrics import ReconstructionMetrics, reconstruction_metrics
from saeengine.losses import fvu as trainer_fvu


def make_data(n=257, d=7, w=5, seed=0):
    """Tokens with a large mean, a biased and shrunk reconstruction, one zero token, one zero
    reconstruction, and codes with some off slots."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d) + 20.0
    x_hat = 0.8 * x + 0.3 * torch.randn(n, d, generator=g) + 0.5
    x[3] = 0.0
    x_hat[5] = 0.0
    values = torch.rand(n, w, generator=g) * (torch.rand(n, w, generator=g) > 0.3)
    return x, x_hat, values


def brute_force(x, x_hat, values):
    """The metrics from their definitions (docs/eval-metrics.md), written without the module."""
    x, x_hat, v = (np.asarray(t, dtype=np.float64) for t in (x, x_hat, values))
    n = x.shape[0]
    err = x - x_hat
    sse = (err ** 2).sum()
    baseline_sse = ((x - x.mean(0)) ** 2).sum()
    nx, nh = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    cos = [a @ b / (p * q) if p > 0 and q > 0 else 0.0 for a, b, p, q in zip(x, x_hat, nx, nh)]
    ratios = [q / p for p, q in zip(nx, nh) if p > 0]
    return {
        "n_tokens": n,
        "mse": sse / n,
        "nmse": sse / baseline_sse,
        "fvu": sse / baseline_sse,
        "explained_variance": 1 - err.var(0).sum() / x.var(0).sum(),
        "l0": (v > 0).sum() / n,
        "l1": np.abs(v).sum() / n,
        "cosine": float(np.mean(cos)),
        "l2_ratio": float(np.mean(ratios)),
        "relative_reconstruction_bias": (x_hat ** 2).sum() / (x * x_hat).sum(),
    }


def batch_of(x, x_hat, values):
    n = x.shape[0]
    return TokenBatch(x=x, x_hat=x_hat, values=values, indices=torch.zeros_like(values, dtype=torch.int64),
                      image=torch.arange(n), position=torch.zeros(n, dtype=torch.int64),
                      is_cls=torch.zeros(n, dtype=torch.bool))


def test_every_metric_matches_brute_force():
    x, x_hat, values = make_data()
    got = reconstruction_metrics(x, x_hat, values)
    want = brute_force(x, x_hat, values)
    assert set(got) == set(want)
    assert got["n_tokens"] == want["n_tokens"] and isinstance(got["n_tokens"], int)
    for key, value in want.items():
        assert isinstance(got[key], (int, float))
        assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    # the data are chosen so that the metrics differ from each other (a swapped field fails)
    assert abs(got["explained_variance"] - (1 - got["nmse"])) > 1e-3
    assert 0 < got["relative_reconstruction_bias"] < 1 and got["l2_ratio"] < 1


def test_metrics_match_sklearn():
    x, x_hat, values = make_data(seed=1)
    got = reconstruction_metrics(x, x_hat, values)
    xn, hn = x.double().numpy(), x_hat.double().numpy()
    ev = explained_variance_score(xn, hn, multioutput="variance_weighted")
    # the identity the doc states: sklearn's variance-weighted EV is SAEBench's summed-variance EV
    assert ev == pytest.approx(1 - (xn - hn).var(0).sum() / xn.var(0).sum(), rel=1e-12)
    assert got["explained_variance"] == pytest.approx(ev, rel=1e-10)
    assert got["mse"] == pytest.approx(x.shape[1] * mean_squared_error(xn, hn), rel=1e-10)
    assert 1 - got["nmse"] == pytest.approx(r2_score(xn, hn, multioutput="variance_weighted"), rel=1e-10)


def test_fvu_is_the_trainers_fvu():
    x, x_hat, values = make_data(seed=2)
    assert reconstruction_metrics(x, x_hat, values)["fvu"] == pytest.approx(float(trainer_fvu(x, x_hat)), rel=1e-5)


def test_total_variance_survives_a_huge_mean():
    # mean 1e7, spread 1: summing raw x^2 in float64 would lose ~14 of 16 digits
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(512, 4, generator=g, dtype=torch.float64) + 1e7)
    x_hat = x + 0.1 * torch.randn(512, 4, generator=g, dtype=torch.float64)
    got = reconstruction_metrics(x, x_hat, torch.ones(512, 1))
    want = brute_force(x, x_hat, torch.ones(512, 1))
    assert got["nmse"] == pytest.approx(want["nmse"], rel=1e-9)
    assert got["explained_variance"] == pytest.approx(want["explained_variance"], rel=1e-9)


def split_points(n, seed):
    g = np.random.default_rng(seed)
    cuts = sorted(g.choice(np.arange(1, n), size=6, replace=False).tolist())
    return [0, 0, *cuts, cuts[-1], n]  # repeated cuts make empty batches


def test_batch_splitting_and_resume(tmp_path):
    x, x_hat, values = make_data(seed=4)
    whole = ReconstructionMetrics()
    whole.update(batch_of(x, x_hat, values))
    cuts = split_points(x.shape[0], 0)
    chunks = [(x[a:b], x_hat[a:b], values[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    assert any(c[0].shape[0] == 0 for c in chunks)

    straight = ReconstructionMetrics()
    for chunk in chunks:
        straight.update(batch_of(*chunk))
    for key, value in whole.result().items():
        assert straight.result()[key] == pytest.approx(value, rel=1e-12, abs=1e-14), key

    resumed, saved = ReconstructionMetrics(), None
    for i, chunk in enumerate(chunks):  # save to safetensors and reload into a fresh accumulator before every batch
        if saved is not None:
            resumed = ReconstructionMetrics()
            resumed.load_state_dict(load_file(saved))
        resumed.update(batch_of(*chunk))
        state = resumed.state_dict()
        assert all(t.device.type == "cpu" for t in state.values())
        saved = str(tmp_path / f"state{i}.safetensors")
        save_file(state, saved)
    assert resumed.result() == straight.result()  # bit-identical, not just close


def test_empty_pass_and_degenerate_tokens():
    metrics = ReconstructionMetrics()
    metrics.update(batch_of(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 2)))
    out = metrics.result()
    assert out["n_tokens"] == 0 and all(math.isnan(v) for k, v in out.items() if k != "n_tokens")
    # all-zero tokens: cosine 0 by definition, l2_ratio has no token to average, no variance
    zeros = reconstruction_metrics(torch.zeros(4, 3), torch.ones(4, 3), torch.zeros(4, 1))
    assert zeros["cosine"] == 0.0 and math.isnan(zeros["l2_ratio"]) and math.isnan(zeros["nmse"])
    assert zeros["mse"] == 3.0 and zeros["l0"] == 0.0


def test_real_sae_codes():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k=4))
    x = torch.randn(40, 8)
    code = sae.encode(x)
    values, _ = code_pairs(code)
    x_hat = sae.decode(code)
    got = reconstruction_metrics(x, x_hat, values)  # grad-tracking tensors are fine
    want = brute_force(x, x_hat.detach(), values.detach())
    assert got["l0"] == pytest.approx(want["l0"]) and 0 < got["l0"] <= 4
    assert got["nmse"] == pytest.approx(want["nmse"], rel=1e-9)


@pytest.mark.parametrize("change, error, words", [
    (lambda x, h, v: (x, h[:, :-1], v), InputError, "x_hat has shape"),
    (lambda x, h, v: (x, h, v[:-1]), InputError, "values has"),
    (lambda x, h, v: (x[0], h, v), InputError, "2-D"),
    (lambda x, h, v: (x.long(), h, v), InputError, "float"),
    (lambda x, h, v: (x, h.index_fill(0, torch.tensor([2]), math.nan), v), NonFiniteError, "x_hat"),
    (lambda x, h, v: (x.index_fill(1, torch.tensor([0]), math.inf), h, v), NonFiniteError, "x has"),
    (lambda x, h, v: (x, h, v.index_fill(0, torch.tensor([1]), math.nan)), NonFiniteError, "values"),
])
def test_bad_input(change, error, words):
    x, x_hat, values = make_data(n=6, d=3)
    with pytest.raises(error, match=words):
        reconstruction_metrics(*change(x, x_hat, values))


def test_width_change_and_bad_state():
    metrics = ReconstructionMetrics()
    metrics.add(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 1))
    with pytest.raises(InputError, match="d_in=4 but earlier batches had d_in=3"):
        metrics.add(torch.ones(2, 4), torch.ones(2, 4), torch.ones(2, 1))
    state = metrics.state_dict()
    with pytest.raises(CheckpointError, match="keys"):
        ReconstructionMetrics().load_state_dict({k: v for k, v in state.items() if k != "sum_dot"})
    with pytest.raises(CheckpointError, match="sum_err"):
        ReconstructionMetrics().load_state_dict({**state, "sum_err": torch.zeros(5, dtype=torch.float64)})
    with pytest.raises(CheckpointError, match="n_tokens"):
        ReconstructionMetrics().load_state_dict({**state, "n_tokens": torch.zeros(())})


@requires_gpu
def test_cuda_state_stays_on_the_device():
    x, x_hat, values = make_data(seed=5)
    metrics = ReconstructionMetrics()
    for a in range(0, x.shape[0], 50):
        metrics.update(batch_of(x[a:a + 50].cuda(), x_hat[a:a + 50].cuda(), values[a:a + 50].cuda()))
    assert metrics._state["sum_err"].is_cuda
    assert all(t.device.type == "cpu" for t in metrics.state_dict().values())
    want = brute_force(x, x_hat, values)
    for key, value in metrics.result().items():
        assert value == pytest.approx(want[key], rel=1e-10, abs=1e-12), key
