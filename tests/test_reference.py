"""The reference engine (torch backend) against float64 formulas of engine-design.md."""

import pytest
import torch

from saeengine import SAE, SAEConfig, ops
from saeengine.architectures import DenseCode
from saeengine.ops.latent_index import build_latent_index, latent_weighted_rowsum_ref

from conftest import assert_valid_topk, pre_activations64

SHAPES = [  # (N, d_in, d_sae, k)
    (1, 72, 100, 1),
    (7, 72, 130, 8),
    (33, 16, 48, 48),   # k = d_sae
    (5, 9, 7, 3),
]


def make_sae(d_in, d_sae, k, normalization="none", seed=0, **kw):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, normalization=normalization, **kw), seed=seed)
    with torch.no_grad():  # non-trivial biases and an encoder that differs from the decoder
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    return sae


def decode64(values, indices, W_dec, b_dec=None):
    out = (values.double()[..., None] * W_dec.double()[indices]).sum(1)
    return out + (b_dec.double() if b_dec is not None else 0.0)


@pytest.mark.parametrize("n,d_in,d_sae,k", SHAPES)
def test_encode_matches_formula(n, d_in, d_sae, k):
    sae = make_sae(d_in, d_sae, k)
    x = torch.randn(n, d_in)
    code = sae.encode(x, backend="torch")
    pre = pre_activations64(x, sae.W_enc, sae.b_enc, b_pre=sae.b_dec)
    assert_valid_topk(code.values, code.indices, pre, k, tol=1e-5)


@pytest.mark.parametrize("n,d_in,d_sae,k", SHAPES)
def test_decode_matches_formula(n, d_in, d_sae, k):
    sae = make_sae(d_in, d_sae, k)
    values = torch.rand(n, k)
    indices = torch.stack([torch.randperm(d_sae)[:k] for _ in range(n)])
    out = sae.decode(ops.SparseCode(values, indices), backend="torch")
    torch.testing.assert_close(out.double(), decode64(values, indices, sae.W_dec, sae.b_dec), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalization", ["none", "mean_norm"])
def test_forward_fvu_and_recon_match_formula(normalization):
    sae = make_sae(72, 130, 8, normalization=normalization)
    x = 3.0 + 2.0 * torch.randn(40, 72)
    sae.fit_normalization(x)
    out = sae(x, backend="torch")
    mu, s = (x.double().mean(0), (x.double() - x.double().mean(0)).norm(dim=1).mean() / 72**0.5) \
        if normalization == "mean_norm" else (0.0, 1.0)
    xn = (x.double() - mu) / s
    pre = pre_activations64(xn, sae.W_enc, sae.b_enc, b_pre=sae.b_dec)
    v, i = pre.topk(8, dim=1)
    xhat = decode64(v, i, sae.W_dec, sae.b_dec)
    fvu = ((xn - xhat) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.fvu.double(), fvu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.recon.double(), xhat * s + mu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, out.fvu)  # no dead mask: no AuxK term
    if normalization == "mean_norm":
        assert abs(float(sae.normalize(x).norm(dim=1).mean()) - 72**0.5) < 1e-3


@pytest.mark.parametrize("n_dead", [20, 3])
def test_auxk_matches_formula(n_dead):
    """AuxK = min(#dead/k_aux, 1) * |e - e_hat|^2 / var, e_hat decoded from the top
    min(k_aux, #dead) pre-activations among dead latents only."""
    torch.manual_seed(1)
    k_aux = 6
    sae = make_sae(24, 64, 4, k_aux=k_aux, aux_alpha=0.25)
    x = torch.randn(50, 24)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    out = sae(x, dead_mask=dead, backend="torch")
    pre = pre_activations64(x, sae.W_enc, sae.b_enc, b_pre=sae.b_dec)
    v, i = pre.topk(4, dim=1)
    e = x.double() - decode64(v, i, sae.W_dec, sae.b_dec)
    dead_ids = torch.nonzero(dead).squeeze(1)
    va, pos = pre[:, dead_ids].topk(min(k_aux, n_dead), dim=1)
    ia = dead_ids[pos]
    assert torch.equal(out.code.aux.indices.sort(1).values, ia.sort(1).values)
    listed = ops.topk_encode(x, sae.W_enc, sae.b_enc, 4, b_pre=sae.b_dec, dead_latents=dead_ids, k_aux=k_aux,
                           backend="torch")
    assert torch.equal(listed.aux.indices, out.code.aux.indices)  # the list instead of the mask: same code
    e_hat = decode64(va, ia, sae.W_dec)
    var = ((x.double() - x.double().mean(0)) ** 2).sum()
    aux = min(n_dead / k_aux, 1.0) * ((e - e_hat) ** 2).sum() / var
    torch.testing.assert_close(out.auxk_loss.double(), aux, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.loss, out.fvu + 0.25 * out.auxk_loss)
    # The AuxK gradient reaches the encoder rows of dead latents (the main loss cannot).
    sae.zero_grad()
    out.auxk_loss.backward()
    assert sae.W_enc.grad[dead].abs().sum() > 0
    assert sae.W_enc.grad[~dead].abs().sum() == 0


def test_latent_index_segments_partition_pairs_by_latent():
    indices = torch.tensor([[3, 1], [1, 0], [3, 2], [5, 1]])
    index = build_latent_index(indices)
    flat = indices.reshape(-1)
    n_unique = int((index.unique_latents >= 0).sum())
    assert n_unique == 5
    assert index.unique_latents[:n_unique].tolist() == [0, 1, 2, 3, 5]
    for u in range(n_unique):
        pairs = index.order[index.segment_starts[u]:index.segment_starts[u + 1]]
        assert (flat[pairs] == index.unique_latents[u]).all()
        assert (pairs.diff() > 0).all()  # stable: pairs of one latent in increasing order
    assert int(index.segment_starts[n_unique]) == flat.numel()


def test_latent_rowsum_reference_matches_loop():
    indices = torch.randint(0, 6, (5, 3))
    coef, rows = torch.randn(5, 3), torch.randn(5, 4)
    out, sums = latent_weighted_rowsum_ref(indices, coef, rows, 6)
    expect = torch.zeros(6, 4)
    for n in range(5):
        for j in range(3):
            expect[indices[n, j]] += coef[n, j] * rows[n]
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(sums, torch.zeros(6).index_add_(0, indices.reshape(-1), coef.reshape(-1)))


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_other_architectures_encode_their_codes(arch):
    sae = make_sae(16, 40, 4, architecture=arch)
    x = torch.randn(12, 16)
    sae.train()
    code = sae.encode(x)
    pre = pre_activations64(x, sae.W_enc, sae.b_enc, b_pre=sae.b_dec)
    if arch == "relu":
        expect = pre
    elif arch == "jumprelu":
        expect = torch.where(pre > sae.log_threshold.exp().double(), pre, 0.0)
    else:  # top N*k of the whole batch
        flat = pre.reshape(-1)
        keep = torch.zeros_like(flat).scatter(0, flat.topk(12 * 4).indices, 1.0).reshape(pre.shape)
        expect = pre * keep
        assert torch.isfinite(sae.threshold)  # the inference threshold was updated
    dense = code.to_dense(40).double()
    torch.testing.assert_close(dense, expect, atol=1e-5, rtol=1e-5)
    if arch == "batchtopk":
        assert code.values.shape[1] == int((expect > 0).sum(1).max())  # padded to the batch's max L0
    else:  # dense activations [N, F]: no padding, so no host sync reads a width
        assert isinstance(code, DenseCode) and code.values.shape == (12, 40)
    out = sae(x)
    assert torch.isfinite(out.loss)
