"""Interventions: unedited edits are bit-identical, the error term is kept (x' - x equals
decode(z') - decode(z) at the edited tokens and 0 elsewhere), the baselines have the
stated latents and norms, bad input names the problem; the classification and
segmentation helpers against brute-force loops with planted answers."""

import numpy as np
import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.backbones import Backbone
from saeengine.errors import InputError
from saeengine.eval.intervention_effects import (auto_select_latents, change_counts, change_rates,
                                                 classification_effect, pooled_change_rates)
from saeengine.eval.interventions import intervene, random_latent_edit, random_vector_edit, set_latents

D_IN, D_SAE, SIDE = 6, 32, 3  # tokens per image: SIDE * SIDE


class Toy(torch.nn.Module):
    """Two 1x1-conv blocks (a per-position MLP) and a mean-pooled output; ``identity_tail``
    makes block 1 the identity and returns the flattened map (the "logits" are then the
    edited layer's activations themselves)."""

    def __init__(self, identity_tail=False):
        super().__init__()
        torch.manual_seed(0)
        tail = torch.nn.Identity() if identity_tail else torch.nn.Conv2d(D_IN, 5, 1)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(3, D_IN, 1), tail])
        self.identity_tail = identity_tail

    def forward(self, x):
        if self.identity_tail:
            return self.blocks[1](self.blocks[0](x)).flatten(1)
        return self.blocks[1](torch.relu(self.blocks[0](x)) - 0.3).mean((2, 3))


def toy_backbone(identity_tail=False):
    return Backbone(Toy(identity_tail), "toy", image_size=SIDE, mean=(0, 0, 0), std=(1, 1, 1), spatial=True)


def toy_sae(architecture="topk"):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, architecture=architecture, normalization="mean_norm"), seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    sae.fit_normalization(torch.randn(64, D_IN))
    return sae


def layer_tokens(backbone, pixels):
    seen = {}
    handle = backbone.layer_module("blocks.0").register_forward_hook(
        lambda m, i, o: seen.__setitem__("t", backbone.to_tokens(o)))
    with torch.no_grad():
        backbone.forward(pixels)
    handle.remove()
    return seen["t"]  # [B, T, d]


@torch.no_grad()
def dense_codes(sae, tokens):
    flat = tokens.reshape(-1, D_IN)
    code = sae.encode(flat)
    return code.values if not hasattr(code, "to_dense") else code.to_dense(D_SAE)


PIXELS = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_edits_that_leave_the_code_unchanged_are_bit_identical(architecture):
    backbone, sae = toy_backbone(), toy_sae(architecture)
    z = dense_codes(sae, layer_tokens(backbone, PIXELS)).view(2, SIDE * SIDE, D_SAE)
    image, pos, j = [int(v) for v in torch.nonzero(z > 0)[0]]
    current = float(z[image, pos, j])
    mask = torch.zeros(2, SIDE * SIDE, dtype=torch.bool)
    mask[image, pos] = True
    same = intervene(backbone, "blocks.0", sae, PIXELS, latents=[j], scales=[current], positions=mask, softmax=False)
    assert torch.equal(same.after, same.before)
    never = torch.nonzero(z.reshape(-1, D_SAE).amax(0) == 0).flatten()
    if architecture == "topk":  # k = 3 of 32 latents on 18 tokens: some latent never fires
        silent = int(never[0])
        off = intervene(backbone, "blocks.0", sae, PIXELS, latents=[silent, j], scales=[0.0, current],
                        positions=mask, softmax=False)
        assert torch.equal(off.after, off.before)
        probs = intervene(backbone, "blocks.0", sae, PIXELS, latents=[silent], scales=[0.0])
        assert torch.equal(probs.after, probs.before)
    changed = intervene(backbone, "blocks.0", sae, PIXELS, latents=[j], scales=[current + 2.0], positions=mask,
                        softmax=False)
    assert not torch.equal(changed.after[image], changed.before[image])  # the identity test can fail
    assert torch.equal(changed.after[1 - image], changed.before[1 - image])  # the other image is not edited


def test_the_error_term_is_kept_and_only_edited_tokens_move():
    backbone, sae = toy_backbone(identity_tail=True), toy_sae()
    tokens = layer_tokens(backbone, PIXELS)  # [2, 9, 6]
    z = dense_codes(sae, tokens)
    latents, values, positions = [4, 9], [1.5, -0.7], [0, 5, 7]
    res = intervene(backbone, "blocks.0", sae, PIXELS, latents=latents, scales=values, positions=positions,
                    softmax=False)
    # Logits = the layer's map [B, C, H, W] flattened: back to tokens [B, T, d].
    change = (res.after - res.before).view(2, D_IN, SIDE * SIDE).transpose(1, 2)
    z_new = z.clone().view(2, SIDE * SIDE, D_SAE)
    for j, v in zip(latents, values):
        z_new[:, positions, j] = v
    dz = (z_new.reshape(-1, D_SAE) - z).double()
    expected = (dz @ sae.W_dec.double().detach()) * float(sae.norm_scale)  # decode(z') - decode(z), raw space
    expected = expected.view(2, SIDE * SIDE, D_IN)
    torch.testing.assert_close(change[:, positions].double(), expected[:, positions], rtol=1e-4, atol=1e-5)
    others = [p for p in range(SIDE * SIDE) if p not in positions]
    assert torch.equal(change[:, others], torch.zeros_like(change[:, others]))
    assert res.latents.tolist() == [[4, 9], [4, 9]] and res.values.tolist() == [pytest.approx(values)] * 2
    maxima = torch.linspace(0.5, 2.0, D_SAE)  # the scale rule: value = s * m_j
    scaled = intervene(backbone, "blocks.0", sae, PIXELS, latents=[4], scales=[-2.0], maxima=maxima, softmax=False)
    assert scaled.values[:, 0].tolist() == pytest.approx([-2.0 * float(maxima[4])] * 2)


def test_baselines_have_the_stated_latents_and_norms():
    backbone, sae = toy_backbone(identity_tail=True), toy_sae()
    maxima = torch.rand(D_SAE, generator=torch.Generator().manual_seed(0)) + 0.5
    maxima[[1, 2, 3]] = 0.0  # never fired: never drawn
    kwargs = dict(latents=[4, 9], scales=[-1.0, 0.5], maxima=maxima, positions=[0, 5], softmax=False)
    chosen = intervene(backbone, "blocks.0", sae, PIXELS, **kwargs)
    step = (chosen.after - chosen.before).view(2, D_IN, -1).transpose(1, 2)  # [B, T, d]
    vec = random_vector_edit(backbone, "blocks.0", sae, PIXELS, seed=5, **kwargs)
    added = (vec.after - vec.before).view(2, D_IN, -1).transpose(1, 2)
    torch.testing.assert_close(vec.vector.norm(dim=1), torch.ones(2), rtol=0, atol=1e-6)
    assert not torch.allclose(vec.vector[0], vec.vector[1])  # one direction per image
    torch.testing.assert_close(added.norm(dim=2), step.norm(dim=2), rtol=1e-4, atol=1e-6)  # equal norm per token
    moved = added.norm(dim=2) > 0
    assert moved[:, [0, 5]].all() and not moved[:, [1, 2, 3, 4, 6, 7, 8]].any()
    for b in range(2):  # along that image's u
        cos = (added[b, [0, 5]] @ vec.vector[b]) / added[b, [0, 5]].norm(dim=1)
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-4)
    drawn = set()
    for seed in range(30):
        rnd = random_latent_edit(backbone, "blocks.0", sae, PIXELS, seed=seed, **kwargs)
        assert rnd.latents.shape == (2, 2)
        for row, vals in zip(rnd.latents.tolist(), rnd.values.tolist()):
            assert len(set(row)) == 2 and not set(row) & {4, 9, 1, 2, 3}
            assert vals == pytest.approx([-1.0 * float(maxima[row[0]]), 0.5 * float(maxima[row[1]])])
            drawn |= set(row)
    assert len(drawn) > 10  # it is random
    per_image = dict(kwargs, latents=[[4, 9], [5, 6]])
    shared = random_latent_edit(backbone, "blocks.0", sae, PIXELS, seed=1, per_image=False, **per_image)
    assert torch.equal(shared.latents[0], shared.latents[1])  # one draw for the batch
    assert not set(shared.latents[0].tolist()) & {4, 9, 5, 6, 1, 2, 3}
    again = random_latent_edit(backbone, "blocks.0", sae, PIXELS, seed=3, **kwargs)
    assert torch.equal(again.latents, random_latent_edit(backbone, "blocks.0", sae, PIXELS, seed=3, **kwargs).latents)


def test_per_image_latents_and_positions_match_one_image_at_a_time():
    backbone, sae = toy_backbone(), toy_sae()
    latents = [[3, 7], [12, 3]]
    mask = torch.zeros(2, SIDE * SIDE, dtype=torch.bool)
    mask[0, [0, 4]] = True
    mask[1, [8]] = True
    maxima = torch.linspace(0.5, 2.0, D_SAE)
    both = intervene(backbone, "blocks.0", sae, PIXELS, latents=latents, scales=[-1.0, 2.0], maxima=maxima,
                     positions=mask, softmax=False)
    for b in range(2):
        one = intervene(backbone, "blocks.0", sae, PIXELS[b:b + 1], latents=latents[b], scales=[-1.0, 2.0],
                        maxima=maxima, positions=mask[b], softmax=False)
        torch.testing.assert_close(both.after[b:b + 1], one.after, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(one.after, one.before)
    with pytest.raises(InputError, match=r"latents has shape \(3, 2\); give \[n\] ids"):
        intervene(backbone, "blocks.0", sae, PIXELS, latents=[[1, 2]] * 3, scales=[0.0, 0.0])


def test_set_latents_appends_only_where_needed():
    code = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=3), seed=0).encode(torch.randn(4, D_IN))
    j = int(code.indices[0, 0])
    same = set_latents([j], [0.0], torch.tensor([False, True]))(code, 2, 2)  # rows 1 and 3
    assert same.values.shape == code.values.shape
    absent = next(i for i in range(D_SAE) if not (code.indices == i).any())
    grown = set_latents([absent], [2.5], None)(code, 2, 2)
    assert grown.values.shape[1] == code.values.shape[1] + 1
    assert torch.equal(grown.to_dense(D_SAE)[:, absent], torch.full((4,), 2.5))


def test_bad_input_names_the_problem():
    backbone, sae = toy_backbone(), toy_sae()
    with pytest.raises(InputError, match=rf"latent 40 is out of range: the SAE has d_sae={D_SAE}"):
        intervene(backbone, "blocks.0", sae, PIXELS, latents=[40], scales=[0.0])
    with pytest.raises(InputError, match=r"position 9 is out of range: blocks.0 has 9 tokens per image"):
        intervene(backbone, "blocks.0", sae, PIXELS, latents=[1], scales=[0.0], positions=[2, 9])
    with pytest.raises(InputError, match="2 latents but 1 scales"):
        intervene(backbone, "blocks.0", sae, PIXELS, latents=[1, 2], scales=[0.0])
    with pytest.raises(InputError, match=r"positions mask has shape \(4,\); blocks.0 has 9 tokens"):
        intervene(backbone, "blocks.0", sae, PIXELS, latents=[1], scales=[0.0], positions=torch.ones(4, dtype=bool))
    with pytest.raises(InputError, match=rf"maxima has shape \(3,\); it must be \[d_sae={D_SAE}\]"):
        intervene(backbone, "blocks.0", sae, PIXELS, latents=[1], scales=[0.0], maxima=torch.ones(3))
    with pytest.raises(InputError, match="repeat an id"):
        intervene(backbone, "blocks.0", sae, PIXELS, latents=[1, 1], scales=[0.0, 0.0])


def test_classification_effect_against_a_loop():
    rng = np.random.default_rng(0)
    before = torch.softmax(torch.tensor(rng.normal(size=(50, 4)) * 2), 1)
    after = torch.softmax(torch.tensor(rng.normal(size=(50, 4)) * 2), 1)
    y = rng.integers(0, 4, 50)
    out = classification_effect(before, after, y)
    deltas, correct, flips, changed = [], 0, 0, 0
    for b, a, t in zip(before.tolist(), after.tolist(), y):
        deltas.append(a[t] - b[t])
        top_b, top_a = int(np.argmax(b)), int(np.argmax(a))
        correct += top_b == t
        flips += top_b == t and top_a != t
        changed += top_b != top_a
    assert out["delta_p_true_mean"] == pytest.approx(np.mean(deltas))
    assert out["delta_p_true_std"] == pytest.approx(np.std(deltas))
    assert out["n_correct_before"] == correct and out["flip_rate"] == pytest.approx(flips / correct)
    assert out["top1_changed"] == pytest.approx(changed / 50)
    with pytest.raises(InputError, match="not probabilities"):
        classification_effect(before * 3, after, y)


def brute_force_f1(dense, labels, pure, c, thresholds, max_freq):
    """{latent: (best f1, its smallest t)} over the unmasked latents, by loops."""
    n, f = dense.shape
    out = {}
    for j in range(f):
        if sum(dense[p, j] > 0 for p in range(n)) / n >= max_freq:
            continue
        best = (-1.0, None)
        for t in thresholds:
            tp = fp = fn = 0
            for p in range(n):
                if not pure[p]:
                    continue
                fires, is_c = dense[p, j] > t, labels[p] == c
                tp += fires and is_c
                fp += fires and not is_c
                fn += (not fires) and is_c
            f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
            if f1 > best[0]:
                best = (f1, t)
        out[j] = best
    return out


def test_auto_select_finds_the_planted_latents_and_matches_brute_force():
    rng = np.random.default_rng(1)
    n, f, n_cls = 300, 24, 4
    labels = rng.integers(0, n_cls, n)
    purity = np.where(rng.random(n) < 0.8, 1.0, rng.uniform(0.3, 0.89, n))
    dense = np.where(rng.random((n, f)) < 0.05, rng.uniform(0.01, 2.0, (n, f)), 0.0)
    planted = {0: 7, 1: 3, 2: 15, 3: 20}
    for c, j in planted.items():  # fires on c-patches only, mostly weakly (t=0.1 is best)
        dense[:, j] = np.where(labels == c, rng.uniform(0.05, 0.25, n) * (rng.random(n) < 0.9), 0.0)
        dense[labels != c, j] = np.where(rng.random((labels != c).sum()) < 0.03, 0.05, 0.0)
    dense[:, 11] = np.where(labels == 2, 3.0, 0.5)  # perfect at t = 1.0 but fires everywhere: masked
    thresholds = (0.0, 0.1, 0.3, 1.0)
    picked = auto_select_latents(torch.tensor(dense), labels, purity, thresholds=thresholds, max_freq=0.5)
    assert {c: v["latent"] for c, v in picked.items()} == planted
    k = int((dense > 0).sum(1).max())  # the same code as sparse (values, indices) pairs
    order = np.argsort(-dense, 1, kind="stable")[:, :k]
    pairs = (torch.tensor(np.take_along_axis(dense, order, 1)), torch.tensor(order))
    assert auto_select_latents(pairs, labels, purity, d_sae=f, thresholds=thresholds, max_freq=0.5) == picked
    for c in range(n_cls):
        loops = brute_force_f1(dense, labels, purity >= 0.9, c, thresholds, 0.5)
        best_j = max(loops, key=lambda j: (loops[j][0], -j))
        assert picked[c]["latent"] == best_j
        assert picked[c]["f1"] == pytest.approx(loops[best_j][0])
        assert picked[c]["threshold"] == loops[best_j][1]
    unmasked = auto_select_latents(torch.tensor(dense), labels, purity, thresholds=thresholds, max_freq=1.01)
    assert unmasked[2]["latent"] == 11 and unmasked[2]["threshold"] == 1.0


def test_auto_selection_leaves_out_a_class_with_only_masked_latents():
    labels = np.array([0] * 10 + [1] * 10)
    dense = np.ones((20, 3))  # every latent fires on every patch: all masked by max_freq
    picked = auto_select_latents(torch.tensor(dense), labels, np.ones(20), max_freq=0.5)
    assert picked == {}
    dense[:10, 2] = 0.0  # latent 2 now fires on class 1 only (frequency 0.5 < 0.6)
    assert list(auto_select_latents(torch.tensor(dense), labels, np.ones(20), max_freq=0.6)) == [1]
    with pytest.raises(InputError, match="patch_labels holds -1"):
        auto_select_latents(torch.tensor(dense), labels - 1, np.ones(20), max_freq=0.6)


def test_change_rates_against_loops():
    rng = np.random.default_rng(2)
    counts = []
    brute = []
    for c in range(1, 5):
        labels = rng.integers(0, 5, 200)
        before = rng.integers(0, 5, 200)
        after = np.where(rng.random(200) < 0.3 + 0.1 * c, rng.integers(0, 5, 200), before)
        t_changed = sum(1 for b, a, y in zip(before, after, labels) if y == c and a != b)
        t_total = sum(1 for y in labels if y == c)
        o_changed = sum(1 for b, a, y in zip(before, after, labels) if y != c and a != b)
        o_total = 200 - t_total
        assert change_rates(before, after, labels, c) == pytest.approx((t_changed / t_total, o_changed / o_total))
        counts.append(change_counts(before, after, labels, c))
        brute.append((t_changed, t_total, o_changed, o_total))
    pooled = pooled_change_rates(counts)
    assert pooled["target_rate"] == pytest.approx(sum(b[0] for b in brute) / sum(b[1] for b in brute))
    assert pooled["other_rate"] == pytest.approx(sum(b[2] for b in brute) / sum(b[3] for b in brute))
    assert pooled["target_std"] == pytest.approx(np.std([b[0] / b[1] for b in brute]))
    assert pooled["other_std"] == pytest.approx(np.std([b[2] / b[3] for b in brute]))
