"""saeengine.eval.ood_scores: the SAE scores and the dense baselines against independent
oracles (scipy ranks / Spearman / logsumexp, sklearn kNN and EmpiricalCovariance, SAEs
whose code is known by construction) and on synthetic ID vs OOD data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import rankdata, spearmanr
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from saeengine import SAE, SAEConfig
from saeengine.errors import InputError
from saeengine.eval.ood import auroc
from saeengine.eval.ood_scores import DenseScorer, SAEScorer, average_ranks, spearman_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


def identity_sae(d: int) -> SAE:
    """A ReLU SAE with W_enc = W_dec = I and no biases: the code of x >= 0 is x itself, and
    the reconstruction is the code."""
    sae = SAE(SAEConfig(d_in=d, d_sae=d, architecture="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def subspace_sae(d: int, r: int) -> SAE:
    """A ReLU SAE with latents +-e_i for i < r: it reconstructs exactly the projection of x
    on the first r coordinates (x's other coordinates are the error)."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * r, architecture="relu"))
    basis = torch.eye(d)[:r]
    rows = torch.cat([basis, -basis])
    with torch.no_grad():
        sae.W_enc.copy_(rows)
        sae.W_dec.copy_(rows)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def kth_cosine(reference: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(reference)
    return nn.kneighbors(query)[0][:, -1]


# ----- ranks and Spearman ---------------------------------------------------------------------
def test_average_ranks_and_spearman_equal_scipy_with_heavy_ties():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (9, 40), generator=gen).float()
    a[0] = 0.0  # a constant row
    b = torch.randint(0, 3, (4, 40), generator=gen).float() * (torch.rand(4, 40, generator=gen) > 0.6)
    np.testing.assert_array_equal(average_ranks(a).numpy(), rankdata(a.numpy(), axis=1))
    rho = spearman_rows(a, b).numpy()
    for i in range(1, 9):
        for j in range(4):
            assert rho[i, j] == pytest.approx(spearmanr(a[i], b[j]).statistic, abs=1e-12)
    np.testing.assert_array_equal(rho[0], 0.0)  # scipy: nan (no spread); here 0, documented


# ----- SAEScorer ---------------------------------------------------------------------------------
def test_sae_scores_equal_their_formulas_on_a_known_code():
    gen = torch.Generator().manual_seed(1)
    d = 12
    sae = identity_sae(d)
    id_x = torch.rand(40, d, generator=gen) * (torch.rand(40, d, generator=gen) > 0.5)
    id_x[0] = 0.0  # a row with no active latent: cosine 0 to everything
    query = torch.rand(15, d, generator=gen) * (torch.rand(15, d, generator=gen) > 0.4)
    query[0] = 0.0
    s = SAEScorer(sae, id_x, knn_k=4).scores(query)
    assert set(s) == {"reconstruction", "max_latent", "energy", "knn"}  # no labels: no class_profile
    q = query.numpy().astype(np.float64)
    np.testing.assert_array_equal(s["max_latent"], -q.max(1))
    np.testing.assert_allclose(s["energy"], -logsumexp(q, axis=1), rtol=1e-6)
    np.testing.assert_allclose(s["knn"], kth_cosine(id_x.numpy(), q, 4), atol=1e-6)
    assert s["knn"][0] == pytest.approx(1.0)
    np.testing.assert_allclose(s["reconstruction"][1:], 0.0, atol=1e-12)
    for v in s.values():
        assert v.dtype == np.float64 and v.shape == (15,)


def test_sae_reconstruction_and_knn_on_a_topk_sae_equal_brute_force():
    gen = torch.Generator().manual_seed(2)
    sae = SAE(SAEConfig(d_in=6, d_sae=24, k=3, normalization="mean_norm"), seed=0)
    id_x = torch.randn(50, 6, generator=gen) + 1.0
    sae.fit_normalization(id_x)
    query = torch.randn(13, 6, generator=gen)
    s = SAEScorer(sae, id_x, knn_k=5, chunk=4).scores(query)  # chunks of 4 rows
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(query)).double().numpy()
        codes = {name: sae.encode(v).to_dense(24).numpy() for name, v in (("id", id_x), ("q", query))}
    q = query.double().numpy()
    np.testing.assert_allclose(s["reconstruction"], ((q - x_hat) ** 2).sum(1) / (q ** 2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(s["knn"], kth_cosine(codes["id"], codes["q"], 5), atol=1e-6)
    np.testing.assert_allclose(s["max_latent"], -codes["q"].max(1), rtol=1e-6)
    assert SAEScorer(sae, id_x, knn_k=5, chunk=4096).scores(query)["knn"] == pytest.approx(s["knn"], abs=1e-6)


def test_class_profile_is_exact_on_synthetic_class_profiles():
    gen = torch.Generator().manual_seed(3)
    f, c = 16, 3
    # Each class's profile p_c is chosen (sparse, with ties); its ID codes are p_c +- e, so
    # the class mean is p_c exactly.
    profiles = torch.randint(0, 4, (c, f), generator=gen).float() + 1.0
    profiles *= torch.rand(c, f, generator=gen) > 0.4
    e = 0.2 * torch.rand(c, 5, f, generator=gen) * (profiles[:, None] > 0)
    codes = torch.cat([profiles[:, None] + e, profiles[:, None] - e], 1).reshape(-1, f)
    labels = torch.arange(c).repeat_interleave(10) * 2 + 5  # not contiguous: classes 5, 7, 9
    scorer = SAEScorer(identity_sae(f), codes, labels, knn_k=3)
    np.testing.assert_allclose(scorer.profiles.numpy(), profiles.numpy(), atol=1e-6)
    query = torch.rand(20, f, generator=gen) * (torch.rand(20, f, generator=gen) > 0.5)
    query[:3] = profiles ** 2  # a monotone transform of its own profile: Spearman 1
    got = scorer.scores(query)["class_profile"]
    want = [1.0 - max(spearmanr(q, p).statistic for p in profiles.numpy()) for q in query.numpy()]
    np.testing.assert_allclose(got, want, atol=1e-9)
    np.testing.assert_allclose(got[:3], 0.0, atol=1e-12)


def test_sae_scores_separate_off_subspace_ood():
    gen = torch.Generator().manual_seed(4)
    d, r = 8, 4
    id_train = torch.cat([torch.randn(200, r, generator=gen), torch.zeros(200, d - r)], 1)
    id_test = torch.cat([torch.randn(100, r, generator=gen), torch.zeros(100, d - r)], 1)
    ood = torch.randn(100, d, generator=gen)  # energy off the SAE's subspace
    scorer = SAEScorer(subspace_sae(d, r), id_train, knn_k=10)
    s_id, s_ood = scorer.scores(id_test), scorer.scores(ood)
    np.testing.assert_allclose(s_id["reconstruction"], 0.0, atol=1e-10)
    assert auroc(s_id["reconstruction"], s_ood["reconstruction"]) == 1.0


def test_sae_scorer_inputs():
    gen = torch.Generator().manual_seed(5)
    sae = identity_sae(5)
    x = torch.rand(6, 5, generator=gen)
    with pytest.raises(InputError, match=r"class_profile needs >= 2 ID classes.*\[3\]"):
        SAEScorer(sae, x, torch.full((6,), 3))
    with pytest.warns(UserWarning, match="knn_k=50 exceeds the 6 ID rows"):
        scorer = SAEScorer(sae, x)
    assert scorer.knn_k == 6
    # The self-match: scoring the ID training rows themselves with k = 1 finds each row.
    np.testing.assert_allclose(SAEScorer(sae, x, knn_k=1).scores(x)["knn"], 0.0, atol=1e-6)
    with pytest.raises(InputError, match="width 4 but the SAE reads d_in=5"):
        scorer.scores(torch.rand(3, 4))
    with pytest.raises(InputError, match="2-D"):
        scorer.scores(torch.rand(5))
    with pytest.raises(ValueError, match="NaN or inf"):
        scorer.scores(torch.full((2, 5), float("nan")))
    with pytest.raises(InputError, match="no rows"):
        SAEScorer(sae, torch.zeros(0, 5))
    with pytest.raises(InputError, match="id_labels"):
        SAEScorer(sae, x, torch.arange(5))
    assert all(v.shape == (0,) for v in scorer.scores(torch.zeros(0, 5)).values())


# ----- DenseScorer -------------------------------------------------------------------------------
def gaussian_classes(gen, n_per, means, scale=0.5):
    x = torch.cat([m + scale * torch.randn(n_per, means.shape[1], generator=gen) for m in means])
    return x, torch.arange(len(means)).repeat_interleave(n_per)


def test_dense_scores_equal_sklearn_and_brute_force():
    gen = torch.Generator().manual_seed(6)
    means = 2.0 * torch.randn(3, 5, generator=gen)
    x, y = gaussian_classes(gen, 30, means)
    query = torch.randn(17, 5, generator=gen) * 2
    scorer = DenseScorer(x, y, knn_k=7, probe_epochs=30, device="cpu", chunk=5)
    s = scorer.scores(query)
    xn, yn, qn = x.double().numpy(), y.numpy(), query.double().numpy()
    mu = np.stack([xn[yn == c].mean(0) for c in range(3)])
    cov = EmpiricalCovariance(assume_centered=True).fit(xn - mu[yn])
    want = np.min([cov.mahalanobis(qn - mu[c]) for c in range(3)], axis=0)  # squared distances
    np.testing.assert_allclose(s["mahalanobis"], want, rtol=1e-6)
    np.testing.assert_allclose(s["knn"], kth_cosine(xn, qn, 7), atol=1e-6)
    with torch.no_grad():
        logits = scorer.probe(query).double().numpy()
    np.testing.assert_allclose(s["msp"], -softmax(logits, axis=1).max(1), rtol=1e-6)
    np.testing.assert_allclose(s["energy"], -logsumexp(logits, axis=1), rtol=1e-6)


def test_mahalanobis_with_rank_deficient_covariance_uses_the_pseudo_inverse():
    gen = torch.Generator().manual_seed(7)
    x, y = gaussian_classes(gen, 4, 3.0 * torch.randn(2, 10, generator=gen))  # 8 rows < d = 10
    query = torch.randn(5, 10, generator=gen)
    got = DenseScorer(x, y, knn_k=2, probe_epochs=5, device="cpu").scores(query)["mahalanobis"]
    xn, yn, qn = x.double().numpy(), y.numpy(), query.double().numpy()
    mu = np.stack([xn[yn == c].mean(0) for c in range(2)])
    cov = EmpiricalCovariance(assume_centered=True).fit(xn - mu[yn])
    want = np.min([cov.mahalanobis(qn - mu[c]) for c in range(2)], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_every_score_detects_shifted_gaussian_ood():
    gen = torch.Generator().manual_seed(8)
    d = 6
    means = torch.zeros(3, d)
    means[:, :3] = 4.0 * torch.eye(3)  # three classes in the first three coordinates
    id_train, y = gaussian_classes(gen, 100, means)
    id_test, _ = gaussian_classes(gen, 50, means)
    shift = torch.zeros(d)
    shift[:3] = 4.0 / 3  # between the classes, and off their plane
    shift[3:] = 4.0
    ood = shift + 0.5 * torch.randn(150, d, generator=gen)
    dense = DenseScorer(id_train, y, knn_k=10, probe_epochs=50, device="cpu")
    s_id, s_ood = dense.scores(id_test), dense.scores(ood)
    for name in ("msp", "energy", "mahalanobis", "knn"):
        assert auroc(s_id[name], s_ood[name]) > 0.9, name


def test_dense_scorer_inputs():
    x = torch.randn(6, 3)
    with pytest.raises(InputError, match=r"needs >= 2 ID classes"):
        DenseScorer(x, torch.zeros(6, dtype=torch.long), device="cpu")
    with pytest.warns(UserWarning, match="knn_k=50 exceeds the 6 ID rows"):
        scorer = DenseScorer(x, torch.tensor([0, 0, 0, 4, 4, 4]), probe_epochs=3, device="cpu")
    assert scorer.classes.tolist() == [0, 4] and scorer.probe.n_classes == 2
    before = x.clone()
    DenseScorer(x, torch.tensor([0, 1] * 3), knn_k=2, probe_epochs=3, device="cpu").scores(x)
    assert torch.equal(x, before)  # the caller's features are not scaled in place
    with pytest.raises(InputError, match="width 2 but the DenseScorer was fitted on width 3"):
        scorer.scores(torch.randn(2, 2))
    with pytest.raises(InputError, match="integer class ids"):
        DenseScorer(x, torch.rand(6), device="cpu")
    with pytest.raises(ValueError, match="knn_k"):
        DenseScorer(x, torch.tensor([0, 1] * 3), knn_k=0, device="cpu")


def test_docs_example_runs_and_prints_the_documented_table(capsys):
    """docs/ood.md's example runs as written; its printed AUROC / FPR95 match the table the
    doc shows (to 0.01: another BLAS may round differently)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "ood.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[-1]
    shown = text.split("It prints", 1)[1].split("```\n", 2)[1]
    exec(compile(code, "ood.md", "exec"), {})
    printed = capsys.readouterr().out

    def table(s):
        return {(m[0], m[1]): (float(m[2]), float(m[3]))
                for m in re.findall(r"(\w+)\s+(\w+)\s+AUROC ([\d.]+)\s+FPR95 ([\d.]+)", s)}
    got, want = table(printed), table(shown)
    assert len(want) == 9 and set(got) == set(want)
    for key, (a, f) in want.items():
        assert got[key][0] == pytest.approx(a, abs=0.01) and got[key][1] == pytest.approx(f, abs=0.01), key
