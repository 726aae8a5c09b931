"""Each architecture against an independent float64 formula (encode, decode, forward and
its gradients), the dense codes' interface and host syncs, the registry, and the config
errors."""

import math

import pytest
import torch

from saeengine import SAE, SAEConfig, TrainConfig, config, ops
from saeengine.architectures import DenseCode, architecture_names, get_architecture
from saeengine.optim import fired_rows, mark_fired_
from saeengine.syncs import count_host_syncs

N, D, F, K = 24, 12, 40, 4

ARCHS = {  # name -> SAEConfig fields
    "topk": dict(architecture="topk"),
    "batchtopk": dict(architecture="batchtopk"),
    "relu": dict(architecture="relu"),
    "jumprelu": dict(architecture="jumprelu", jumprelu_threshold=0.3, jumprelu_bandwidth=0.5),  # a wide window: many
    # pre-activations near the threshold, so its straight-through gradient is tested
    "matryoshka": dict(architecture="matryoshka", matryoshka_prefixes=(5, 17, F)),
    "matryoshka_random": dict(architecture="matryoshka", matryoshka_random_prefixes=4),
    "matryoshka_batchtopk": dict(architecture="matryoshka", matryoshka_inner="batchtopk",
                                 matryoshka_prefixes=(10, F)),
}


def make_sae(name, normalization="mean_norm", seed=0, **extra):
    sae = SAE(SAEConfig(d_in=D, d_sae=F, k=K, normalization=normalization, **ARCHS[name], **extra), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases, an encoder that differs from the decoder
        sae.b_enc.copy_(0.1 * torch.randn(F, generator=gen))
        sae.b_dec.copy_(0.5 * torch.randn(D, generator=gen))
        sae.W_enc.add_(0.3 * torch.randn(F, D, generator=gen))
    return sae


def data(seed=0):
    gen = torch.Generator().manual_seed(100 + seed)
    return 2.0 + 1.5 * torch.randn(N, D, generator=gen)


@torch.no_grad()
def expected_activations(sae, x):
    """(x~, pre, the dense code [N, F]) of x, in float64, from each architecture's formula."""
    mu, s = sae.norm_mean.double(), sae.norm_scale.double()
    xn = (x.double() - mu) / s
    pre = (xn - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double()
    arch, inner = sae.cfg.architecture, sae.cfg.matryoshka_inner
    if arch == "relu":
        return xn, pre, torch.relu(pre)
    if arch == "jumprelu":
        return xn, pre, torch.where(pre > sae.log_threshold.double().exp(), pre, 0.0)
    act = torch.relu(pre)
    if arch == "batchtopk" or (arch == "matryoshka" and inner == "batchtopk"):
        keep = torch.zeros(act.numel(), dtype=torch.bool)
        keep[act.reshape(-1).topk(N * K).indices] = True  # the N*k largest of the batch
        return xn, pre, torch.where(keep.reshape(act.shape), act, 0.0)
    top = act.topk(K, dim=1).indices
    return xn, pre, torch.zeros_like(act).scatter(1, top, act.gather(1, top))


def fvu64(xn, x_hat):
    return ((xn - x_hat) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()


@pytest.mark.parametrize("name", list(ARCHS))
def test_encode_decode_forward_match_dense_formula(name):
    sae = make_sae(name)
    x = data()
    sae.fit_normalization(x)
    lengths = None
    if name == "matryoshka_random":  # the lengths this step draws (asked in eval: the counter stays)
        sae.eval()
        lengths = [int(m) for m in sae.architecture.prefix_lengths(sae)]
    sae.train()
    out = sae(x, backend="torch")
    xn, pre, act = expected_activations(sae, x)
    W_dec, b_dec = sae.W_dec.double(), sae.b_dec.double()
    dense = out.code.to_dense(F).double()
    torch.testing.assert_close(dense, act, atol=1e-5, rtol=1e-5)
    x_hat = act @ W_dec + b_dec
    mu, s = sae.norm_mean.double(), sae.norm_scale.double()
    torch.testing.assert_close(out.recon.double(), x_hat * s + mu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.fvu.double(), fvu64(xn, x_hat), atol=1e-6, rtol=1e-4)
    assert float(out.auxk_loss) == 0.0  # no dead latents given
    if sae.cfg.architecture == "matryoshka":
        prefixes = lengths or list(sae.cfg.matryoshka_prefixes)
        assert prefixes[-1] == F
        loss = sum(fvu64(xn, act[:, :m] @ W_dec[:m] + b_dec) for m in prefixes) / len(prefixes)
        torch.testing.assert_close(out.loss.double(), loss, atol=1e-6, rtol=1e-4)
    else:
        torch.testing.assert_close(out.loss, out.fvu)
    if name == "relu":
        torch.testing.assert_close(out.sparsity.double(), act.sum(1).mean(), rtol=1e-5, atol=1e-5)
    elif name == "jumprelu":
        torch.testing.assert_close(out.sparsity.double(), (act > 0).double().sum(1).mean())
    else:
        assert float(out.sparsity) == 0.0
    torch.testing.assert_close(out.l0.double(), (act > 0).double().sum(1).mean())
    # Inference: encode and decode agree with the training forward's code (batchtopk in
    # training mode selects per batch; in eval it thresholds: checked below).
    code = sae.encode(x, backend="torch")
    torch.testing.assert_close(code.to_dense(F).double(), act, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(code, backend="torch").double(), x_hat * s + mu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_inference_thresholds_at_the_trained_ema(name):
    sae = make_sae(name, normalization="none")
    x = data()
    sae.train()
    assert torch.isnan(sae.threshold)
    lows = []
    for seed in range(3):
        xs = data(seed)
        sae(xs, backend="torch")
        _, _, act = expected_activations(sae, xs)
        lows.append(float(act[act > 0].min()))
    ema = lows[0]
    for low in lows[1:]:
        ema = 0.99 * ema + 0.01 * low
    assert float(sae.threshold) == pytest.approx(ema, rel=1e-5)
    sae.eval()
    _, pre, _ = expected_activations(sae, x)
    expect = torch.where(torch.relu(pre) > ema, torch.relu(pre), 0.0)
    torch.testing.assert_close(sae.encode(x).to_dense(F).double(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["topk", "matryoshka", "relu", "jumprelu"])
def test_gradients_match_dense_formula(name):
    """The loss's gradients in every parameter equal those of the float64 formula, with the
    selection (which latents are on) taken from the code."""
    sae = make_sae(name)
    x = data()
    sae.fit_normalization(x)
    out = sae(x, backend="torch")
    (out.loss + out.sparsity).backward()
    params = {n: p.detach().double().requires_grad_() for n, p in sae.named_parameters()}
    xn = (x.double() - sae.norm_mean.double()) / sae.norm_scale.double()
    pre = (xn - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]
    on = out.code.to_dense(F).detach() > 0
    if name == "jumprelu":  # the straight-through thresholds: d act / d theta = -theta * window / bandwidth
        theta = params["log_threshold"].exp()
        bw = sae.cfg.jumprelu_bandwidth
        window = ((pre.detach() - theta.detach()).abs() < bw / 2).double() / bw
        # the value of a term (theta - theta.detach()) * g is 0; its gradient in theta is g
        act = torch.where(on, pre, 0.0) + (theta - theta.detach()) * -window * theta.detach()
        l0 = ((pre > theta).double() + (theta - theta.detach()) * -window).sum(1).mean()
    else:
        act = torch.where(on, torch.relu(pre), 0.0)
    x_hat = act @ params["W_dec"] + params["b_dec"]
    if name == "matryoshka":
        prefixes = sae.cfg.matryoshka_prefixes
        loss = sum(fvu64(xn, act[:, :m] @ params["W_dec"][:m] + params["b_dec"]) for m in prefixes) / len(prefixes)
    else:
        loss = fvu64(xn, x_hat)
    if name == "relu":
        loss = loss + act.sum(1).mean()
    if name == "jumprelu":
        loss = loss + l0
    loss.backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def test_matryoshka_with_one_prefix_is_topk():
    topk = make_sae("topk")
    single = SAE(SAEConfig(d_in=D, d_sae=F, k=K, normalization="mean_norm", architecture="matryoshka",
                           matryoshka_prefixes=(F,)), seed=0)
    single.load_state_dict(topk.state_dict())
    x = data()
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    a, b = topk(x, dead, backend="torch"), single(x, dead, backend="torch")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.auxk_loss, b.auxk_loss) and float(a.auxk_loss.detach()) > 0
    a.loss.backward(), b.loss.backward()
    for (n, p), q in zip(topk.named_parameters(), single.parameters()):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("name", ["matryoshka", "matryoshka_batchtopk"])
def test_matryoshka_auxk_is_topk_auxk_on_the_full_residual(name):
    """AuxK of a Matryoshka SAE: the dead latents' top-k_aux code decodes the full
    reconstruction's residual, scaled as TopK's."""
    sae = make_sae(name, k_aux=5)
    x = data()
    sae.fit_normalization(x)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=torch.Generator().manual_seed(3))[:12]] = True
    out = sae(x, dead, backend="torch")
    xn, pre, act = expected_activations(sae, x)
    e = xn - (act @ sae.W_dec.double() + sae.b_dec.double())
    ids = torch.nonzero(dead).squeeze(1)
    va, pos = torch.relu(pre[:, ids]).topk(5, dim=1)
    e_hat = (va[..., None] * sae.W_dec.double()[ids[pos]]).sum(1)
    aux = ((e - e_hat) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.auxk_loss.double(), aux, rtol=1e-4, atol=1e-7)
    assert torch.equal(out.code.aux.indices.sort(1).values, ids[pos].sort(1).values)


def test_random_prefixes_follow_their_distribution_and_the_counter():
    sae = SAE(SAEConfig(d_in=4, d_sae=1000, k=2, architecture="matryoshka", matryoshka_random_prefixes=6), seed=0)
    sae.eval()
    first = [int(m) for m in sae.architecture.prefix_lengths(sae)]
    assert int(sae.prefix_step) == 0  # eval: the counter stays
    assert first == [int(m) for m in sae.architecture.prefix_lengths(sae)]
    sae.train()
    drawn = []
    for step in range(400):
        lengths = [int(m) for m in sae.architecture.prefix_lengths(sae)]
        assert len(lengths) == 6 and lengths[-1] == 1000 and lengths == sorted(lengths)
        assert 1 <= lengths[0] and lengths[-2] <= 999
        drawn += lengths[:-1]
    assert int(sae.prefix_step) == 400
    drawn = torch.tensor(drawn, dtype=torch.float64)
    for m in (10, 100, 250, 500, 900):  # P(length <= m) = (m / d_sae) ^ 0.5
        assert float((drawn <= m).double().mean()) == pytest.approx(math.sqrt(m / 1000), abs=0.03)
    # The counter alone decides the draws: a copy at the same step draws the same.
    other = SAE(sae.cfg, seed=1)
    other.load_state_dict(sae.state_dict())
    other.train()
    assert [int(m) for m in other.architecture.prefix_lengths(sae)] == \
        [int(m) for m in sae.architecture.prefix_lengths(other)]


@pytest.mark.parametrize("name", ["relu", "jumprelu"])
def test_dense_architectures_never_sync(name):
    sae = make_sae(name)
    x = data()
    with count_host_syncs() as syncs:
        code = sae.encode(x, check=False)
        sae.decode(code)
        out = sae(x, check=False)
        (out.loss + out.sparsity).backward()
    assert isinstance(code, DenseCode) and code.values.shape == (N, F)
    assert syncs.total == 0, syncs.by_op


def test_matryoshka_forward_with_listed_dead_latents_never_syncs():
    sae = make_sae("matryoshka_random")
    sae.train()
    x, dead = data(), torch.arange(0, F, 3)
    with count_host_syncs() as syncs:
        out = sae(x, dead_latents=dead, check=False, backend="torch")
        out.loss.backward()
    assert syncs.total == 0, syncs.by_op
    assert float(out.auxk_loss.detach()) > 0


def test_dense_code_works_where_sparse_codes_do():
    sae = make_sae("relu")
    x = data()
    code = sae.encode(x)
    act = code.values.detach()
    fired = act.gt(0).any(0)
    assert 0 < int(fired.sum()) < F  # some latents off in every row, some on
    # The optimizer-side bookkeeping reads (values, indices) pairs.
    assert torch.equal(fired_rows(code, F).get(), torch.nonzero(fired).squeeze(1))
    last = torch.zeros(F, dtype=torch.int64)
    mark_fired_(last, code.indices, code.values, 77, backend="torch")
    assert torch.equal(last, torch.where(fired, 77, 0))
    # what the trainer reads: one pair per latent, the same stamps
    indices, values = code.fired_pairs()
    assert indices.shape == values.shape == (1, F)
    last_compact = torch.zeros(F, dtype=torch.int64)
    mark_fired_(last_compact, indices, values, 77, backend="torch")
    assert torch.equal(last_compact, last)
    # decode takes a sparse code of the same activations, too (e.g. an edited one)
    sparse = ops.SparseCode(*act.topk(F, dim=1))
    torch.testing.assert_close(sae.decode(sparse, backend="torch"), sae.decode(code), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="this code has 40 latents, not d_sae=41"):
        code.to_dense(41)


def test_registry_and_config_agree():
    assert config.ARCHITECTURES == architecture_names() == ("topk", "batchtopk", "relu", "jumprelu", "matryoshka")
    for name in architecture_names():
        assert get_architecture(name).name == name
        TrainConfig(architecture=name, d_sae=64, k=4)  # each trains through TrainConfig
    assert [n for n in architecture_names() if get_architecture(n).uses_auxk] == ["topk", "batchtopk", "matryoshka"]


@pytest.mark.parametrize("fields,message", [
    (dict(architecture="gated"), r"architecture='gated' is invalid: .*choose one of \('topk', 'batchtopk', 'relu', "
                                 r"'jumprelu', 'matryoshka'\)"),
    (dict(architecture="matryoshka", matryoshka_prefixes=(8, 4, 32)), r"matryoshka_prefixes=\(8, 4, 32\) is invalid"),
    (dict(architecture="matryoshka", matryoshka_prefixes=(8, 16)), r"ending at d_sae=32"),
    (dict(architecture="matryoshka", matryoshka_prefixes=(0, 32)), r"positive ints"),
    (dict(architecture="matryoshka", matryoshka_prefixes=(8.0, 32)), r"matryoshka_prefixes=\(8.0, 32\) is invalid"),
    (dict(architecture="matryoshka", matryoshka_random_prefixes=0), r"matryoshka_random_prefixes=0 is invalid.*"
                                                                    r"\[1, d_sae=32\]"),
    (dict(architecture="matryoshka", matryoshka_random_prefixes=33), r"matryoshka_random_prefixes=33"),
    (dict(architecture="matryoshka", matryoshka_inner="relu"), r"matryoshka_inner='relu' is invalid: .*choose one of "
                                                               r"\('topk', 'batchtopk'\)"),
    (dict(architecture="matryoshka", k=33), r"k=33 exceeds d_sae=32"),
    (dict(architecture="jumprelu", jumprelu_threshold=0.0), r"jumprelu_threshold=0.0 is invalid: it must be a "
                                                            r"positive number"),
    (dict(architecture="jumprelu", jumprelu_bandwidth=float("nan")), r"jumprelu_bandwidth=nan is invalid"),
])
def test_bad_config_values_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=8, d_sae=32, **{"k": 4, **fields})


def test_bad_train_config_values_name_the_field():
    with pytest.raises(ValueError,
                       match=r"TrainConfig.matryoshka_prefixes='8,x' is invalid: it must be comma-separated"):
        TrainConfig(architecture="matryoshka", d_sae=32, k=4, matryoshka_prefixes="8,x")
    with pytest.raises(ValueError, match=r"TrainConfig: SAEConfig.matryoshka_prefixes=\(8, 16\) is invalid"):
        TrainConfig(architecture="matryoshka", d_sae=32, k=4, matryoshka_prefixes="8,16")
    with pytest.raises(ValueError, match="k_anneal_from applies to topk, batchtopk, matryoshka, not 'relu'"):
        TrainConfig(architecture="relu", d_sae=64, k=4, k_anneal_from=8)
    cfg = TrainConfig(architecture="matryoshka", d_sae=32, k=4, matryoshka_prefixes="8,32", matryoshka_inner="batchtopk")
    sae_cfg = cfg.sae_config(d_in=6)
    assert sae_cfg.matryoshka_prefixes == (8, 32) and sae_cfg.matryoshka_inner == "batchtopk" and sae_cfg.d_in == 6


def test_forward_arguments_that_an_architecture_cannot_use_raise():
    relu = make_sae("relu")
    with pytest.raises(ValueError, match=r"k=2 applies to topk, batchtopk, matryoshka SAEs .*this SAE is 'relu'"):
        relu(data(), k=2)
    with pytest.raises(ValueError, match=r"dead_mask/AuxK applies to topk, batchtopk, matryoshka SAEs, not 'relu'"):
        relu(data(), torch.zeros(F, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"k=41 applies .* \[1, d_sae=40\]"):
        make_sae("matryoshka")(data(), k=41)
