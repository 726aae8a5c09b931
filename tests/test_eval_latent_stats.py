"""LatentStats against brute force over a dense [N, F] code matrix: counts, frequency, mean,
min/max, np.histogram per latent, and the streaming percentile within its stated bound."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import requires_gpu
from saeengine import SAE, SAEConfig
from saeengine.errors import CheckpointError, ConfigError, InputError, NonFiniteError
from saeengine.eval.batch import TokenBatch, code_pairs
from saeengine.eval.latent_stats import LatentStats

LOW, HIGH = 1e-2, 1e2


def dense_codes(n=400, f=12, seed=0):
    """[n, f] float32 codes: latent 0 never fires, 1 fires once, 2 twice, 3 has 98 values at
    1.0 and 2 far above (the convention matters), 4 fires below LOW, 5 above HIGH, 6 straddles
    the whole range, the rest are log-normal with assorted frequencies and scales."""
    g = np.random.default_rng(seed)
    dense = np.zeros((n, f), np.float32)
    dense[g.integers(n), 1] = 3.7
    dense[g.choice(n, 2, replace=False), 2] = [0.5, 0.55]
    rows = g.choice(n, 100, replace=False)
    dense[rows[:98], 3] = 1.0
    dense[rows[98:], 3] = [40.0, 60.0]
    dense[g.choice(n, 50, replace=False), 4] = g.uniform(1e-4, 2e-2, 50)
    dense[g.choice(n, 60, replace=False), 5] = g.uniform(50, 1e4, 60)
    dense[g.choice(n, 300, replace=False), 6] = np.exp(g.uniform(np.log(1e-5), np.log(1e5), 300))
    for i in range(7, f):
        fire = g.random(n) < g.uniform(0.2, 0.9)
        dense[fire, i] = np.exp(g.normal(np.log(g.uniform(0.1, 10)), 1.0, fire.sum()))
    return dense


def to_pairs(dense, w, seed=0):
    """Dense [n, f] -> (values, indices) [n, w] with the firing latents in shuffled slots and
    padding slots (value 0, arbitrary and repeated ids)."""
    g = np.random.default_rng(seed)
    n, f = dense.shape
    assert (dense > 0).sum(1).max() <= w
    values = np.zeros((n, w), np.float32)
    indices = g.integers(0, f, (n, w))
    for r in range(n):
        ids = np.flatnonzero(dense[r] > 0)
        slots = g.permutation(w)[:len(ids)]
        values[r, slots], indices[r, slots] = dense[r, ids], ids
    return torch.from_numpy(values), torch.from_numpy(indices).long()


def batch_of(values, indices):
    n = values.shape[0]
    return TokenBatch(x=torch.zeros(n, 1), x_hat=torch.zeros(n, 1), values=values, indices=indices,
                      image=torch.arange(n), position=torch.zeros(n, dtype=torch.int64),
                      is_cls=torch.zeros(n, dtype=torch.bool))


def exact_percentile(v, q=0.99):
    """v_(k), k = ceil(q c), in integer arithmetic for q = 0.99."""
    k = -(-99 * len(v) // 100)
    return np.sort(v)[k - 1]


@pytest.fixture(scope="module")
def data():
    dense = dense_codes()
    values, indices = to_pairs(dense, w=dense.shape[1])
    return dense, values, indices


def run(values, indices, f, cuts=None, **kwargs):
    stats = LatentStats(f, **kwargs)
    cuts = cuts or [0, values.shape[0]]
    for a, b in zip(cuts[:-1], cuts[1:]):
        stats.update(batch_of(values[a:b], indices[a:b]))
    return stats.result()


@pytest.mark.parametrize("bins", [7, 64])
def test_stats_match_brute_force(data, bins):
    dense, values, indices = data
    n, f = dense.shape
    out = run(values, indices, f, bins=bins, low=LOW, high=HIGH)
    assert int(out["n_tokens"]) == n
    edges = out["histogram_edges"].numpy()
    assert edges.shape == (bins + 1,) and edges[0] == LOW and edges[-1] == HIGH
    np.testing.assert_allclose(edges, np.geomspace(LOW, HIGH, bins + 1), rtol=1e-12)
    assert out["histogram"].shape == (f, bins) and out["histogram"].dtype == torch.int64
    for i in range(f):
        v = dense[:, i][dense[:, i] > 0].astype(np.float64)
        assert int(out["count"][i]) == len(v), i
        assert float(out["frequency"][i]) == len(v) / n
        if len(v) == 0:
            assert float(out["mean_nonzero"][i]) == 0 and float(out["max"][i]) == 0 and float(out["p99"][i]) == 0
            assert int(out["histogram"][i].sum()) == 0
            continue
        assert float(out["mean_nonzero"][i]) == pytest.approx(v.mean(), rel=1e-12)
        assert float(out["max"][i]) == v.max() and float(out["min_nonzero"][i]) == v.min()
        want_hist, _ = np.histogram(np.clip(v, LOW, HIGH), edges)
        np.testing.assert_array_equal(out["histogram"][i].numpy(), want_hist, err_msg=f"latent {i}")
    assert float(out["dead_fraction"]) == pytest.approx(np.mean((dense > 0).sum(0) == 0))
    assert float(out["dense_fraction"]) == pytest.approx(np.mean((dense > 0).mean(0) > 1e-2))


def test_values_on_the_edges():
    # powers of two: the edges 0.25 .. 4 and the float32 values are exact, so the bin
    # convention [e_j, e_{j+1}) (last bin closed, outside values clipped) is what is tested
    v = np.array([0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 3.9, 4.0, 9.0], np.float32)
    out = run(torch.from_numpy(v)[:, None], torch.zeros(len(v), 1, dtype=torch.int64), 1, bins=4, low=0.25, high=4.0)
    assert out["histogram_edges"].tolist() == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert out["histogram"][0].tolist() == [2, 2, 1, 4]
    want, _ = np.histogram(np.clip(v, 0.25, 4.0), [0.25, 0.5, 1.0, 2.0, 4.0])
    assert out["histogram"][0].tolist() == want.tolist()


@pytest.mark.parametrize("bins", [5, 16, 128])
def test_percentile_within_stated_bound(data, bins):
    dense, values, indices = data
    n, f = dense.shape
    out = run(values, indices, f, bins=bins, low=LOW, high=HIGH)
    ratio = (HIGH / LOW) ** (1 / bins)
    checked_inside = 0
    for i in range(f):
        v = dense[:, i][dense[:, i] > 0].astype(np.float64)
        if len(v) == 0:
            continue
        exact = exact_percentile(v)
        assert exact == np.quantile(v, 0.99, method="inverted_cdf")
        got, bound = float(out["p99"][i]), float(out["p99_error_bound"][i])
        assert v.min() <= got <= v.max(), i
        rel = abs(got - exact) / exact
        assert rel <= bound * (1 + 1e-9) + 1e-7, (i, got, exact, bound)
        if len(v) < 100:  # k = ceil(0.99 c) = c: the max, exactly
            assert got == np.float32(v.max()) and bound == 0, i
        if LOW <= v.min() and v.max() <= HIGH:
            assert bound <= ratio - 1 + 1e-12, i
            checked_inside += 1
    assert checked_inside >= 4
    # the bound is the documented interval [max(E_j, min), min(E_{j+1}, max)] of v_(k)'s bin
    v = dense[:, 6][dense[:, 6] > 0].astype(np.float64)
    edges = out["histogram_edges"].numpy().copy()
    j = min(max(np.searchsorted(edges, exact_percentile(v), side="right") - 1, 0), bins - 1)
    edges[0], edges[-1] = 0, np.inf
    lo, hi = max(edges[j], v.min()), min(edges[j + 1], v.max())
    assert float(out["p99_error_bound"][6]) == pytest.approx(hi / lo - 1, rel=1e-12)


def test_percentile_of_many_values_is_close():
    # 20k log-uniform values in range: the estimate is far better than the worst-case bound
    g = np.random.default_rng(1)
    v = np.exp(g.uniform(np.log(0.05), np.log(50), 20000)).astype(np.float32)
    values, indices = torch.from_numpy(v)[:, None], torch.zeros(len(v), 1, dtype=torch.int64)
    out = run(values, indices, 1, bins=64, low=LOW, high=HIGH)
    exact = exact_percentile(v.astype(np.float64))
    rel = abs(float(out["p99"][0]) - exact) / exact
    assert rel <= (HIGH / LOW) ** (1 / 64) - 1
    assert rel < 0.005  # 0.15% here: the log-linear interpolation, not just the bin, is right


def test_batch_splitting_and_resume(data, tmp_path):
    dense, values, indices = data
    f = dense.shape[1]
    whole = run(values, indices, f, bins=32)
    cuts = [0, 0, 17, 17, 150, 151, 399, 400]
    split = run(values, indices, f, cuts=cuts, bins=32)
    for key, t in whole.items():
        if t.dtype == torch.float64:
            np.testing.assert_allclose(split[key].numpy(), t.numpy(), rtol=1e-12, atol=0, err_msg=key)
        else:
            assert torch.equal(split[key], t), key
    resumed = None
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        stats = LatentStats(f, bins=32)
        if resumed is not None:
            stats.load_state_dict(load_file(resumed))
        stats.update(batch_of(values[a:b], indices[a:b]))
        state = stats.state_dict()
        assert all(t.device.type == "cpu" for t in state.values())
        resumed = str(tmp_path / f"state{i}.safetensors")
        save_file(state, resumed)
    final = stats.result()
    assert set(final) == set(split)
    assert all(torch.equal(final[k], split[k]) for k in split)  # bit-identical


def test_real_sae_codes():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k=4))
    with torch.no_grad():
        values, indices = code_pairs(sae.encode(torch.randn(64, 8) * 3))
    out = run(values, indices, 32)
    dense = torch.zeros(64, 32).scatter_(1, indices, values).numpy()
    np.testing.assert_array_equal(out["count"].numpy(), (dense > 0).sum(0))
    np.testing.assert_array_equal(out["max"].numpy(), dense.max(0))
    assert int(out["count"].sum()) == int((values > 0).sum()) and int(out["count"].sum()) > 0


def test_empty_batch():
    stats = LatentStats(5)
    stats.update(batch_of(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64)))
    out = stats.result()
    assert int(out["n_tokens"]) == 0 and float(out["dead_fraction"]) == 1.0
    assert not out["frequency"].any() and not out["p99"].any()


@pytest.mark.parametrize("values, indices, error, words", [
    ([[1.0, 0.0]], [[7, 9]], InputError, "latent id 7 fires but the statistics hold d_sae=5"),
    ([[0.0, 2.0]], [[9, -1]], InputError, "latent id -1 fires"),
    ([[1.0, 2.0, 0.0]], [[3, 3, 3]], InputError, "latent 3 fires twice in token row 0"),
    ([[float("nan"), 1.0]], [[0, 1]], NonFiniteError, "values has 1 non-finite"),
    ([[float("inf"), 1.0]], [[0, 1]], NonFiniteError, "NaN or inf"),
])
def test_bad_codes(values, indices, error, words):
    with pytest.raises(error, match=words):
        LatentStats(5).add(torch.tensor(values), torch.tensor(indices))


def test_bad_shapes_settings_and_state():
    stats = LatentStats(5)
    with pytest.raises(InputError, match="int64"):
        stats.add(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(InputError, match="shape"):
        stats.add(torch.ones(2, 2), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(InputError, match="2-D"):
        stats.add(torch.ones(2), torch.zeros(2, dtype=torch.int64))
    for kwargs, words in [({"d_sae": 0}, "d_sae"), ({"bins": 0}, "bins"), ({"low": 0.0}, "low"),
                          ({"low": 2.0, "high": 1.0}, "low"), ({"high": math.inf}, "high"),
                          ({"quantile": 0.0}, "quantile"), ({"quantile": 1.5}, "quantile")]:
        with pytest.raises(ConfigError, match=words):
            LatentStats(**{"d_sae": 5, **kwargs})
    state = stats.state_dict()
    with pytest.raises(CheckpointError, match="d_sae=6"):
        LatentStats(6).load_state_dict(state)
    with pytest.raises(CheckpointError, match="bins=8"):
        LatentStats(5, bins=8).load_state_dict(state)
    with pytest.raises(CheckpointError, match="same low and high"):
        LatentStats(5, low=1e-4).load_state_dict(state)
    with pytest.raises(CheckpointError, match="keys"):
        LatentStats(5).load_state_dict({k: v for k, v in state.items() if k != "min"})


@requires_gpu
def test_cuda_state_stays_on_the_device_and_is_deterministic(data):
    dense, values, indices = data
    f = dense.shape[1]
    cpu = run(values, indices, f, bins=32)
    runs = []
    for _ in range(2):
        stats = LatentStats(f, bins=32)
        for a in range(0, values.shape[0], 64):
            stats.update(batch_of(values[a:a + 64].cuda(), indices[a:a + 64].cuda()))
        assert stats._state["histogram"].is_cuda
        assert all(t.device.type == "cpu" for t in stats.state_dict().values())
        runs.append(stats.result())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in cpu)  # float sums without atomics
    for key, t in cpu.items():
        if t.dtype == torch.float64:
            np.testing.assert_allclose(runs[0][key].numpy(), t.numpy(), rtol=1e-12, err_msg=key)
        else:
            assert torch.equal(runs[0][key], t), key
