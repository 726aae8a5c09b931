"""Model-comparison tools against brute-force loops and sklearn.metrics.f1_score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from saeengine.errors import InputError
from saeengine.eval.comparison import (best_latent, concept_f1, f1_significance, image_scores, nearest_latent,
                                       random_latents)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_codes(n_images=5, t=4, w=3, d_sae=9, seed=0):
    """Code pairs of n_images * t tokens, with zeros (off slots) mixed in."""
    g = torch.Generator().manual_seed(seed)
    n = n_images * t
    values = torch.rand(n, w, generator=g)
    values[torch.rand(n, w, generator=g) < 0.3] = 0.0
    indices = torch.stack([torch.randperm(d_sae, generator=g)[:w] for _ in range(n)])
    image = torch.arange(n_images).repeat_interleave(t)
    position = torch.arange(t).repeat(n_images)
    return values, indices, image, position


def test_image_scores_match_a_loop():
    values, indices, image, position = random_codes()
    tokens = position != 0  # e.g. drop a CLS token at position 0
    for mask in (None, tokens):
        expected = torch.zeros(5, 9, dtype=torch.float64)
        for row in range(values.shape[0]):
            if mask is not None and not mask[row]:
                continue
            for slot in range(values.shape[1]):
                if values[row, slot] > 0:
                    expected[image[row], indices[row, slot]] += float(values[row, slot])
        got = image_scores(values, indices, image, position, 5, 9, tokens=mask)
        torch.testing.assert_close(got, expected)


def test_nearest_latent_is_the_top_summed_latent():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(12, 7, generator=g, dtype=torch.float64)
    concept = torch.rand(12, generator=g) > 0.5
    sums = [sum(float(scores[i, j]) for i in range(12) if concept[i]) for j in range(7)]
    latent, summed = nearest_latent(scores, concept)
    assert latent == max(range(7), key=lambda j: (sums[j], -j)) and summed == pytest.approx(sums[latent])
    tied = torch.zeros(3, 4, dtype=torch.float64)
    tied[:, 1] = tied[:, 3] = 1.0
    assert nearest_latent(tied, torch.tensor([True, True, False])) == (1, 2.0)


def test_concept_f1_matches_sklearn():
    g = torch.Generator().manual_seed(2)
    scores = torch.relu(torch.randn(30, 8, generator=g))
    scores[:, 0] = 0.0          # never fires: F1 0
    scores[:, 1] = 1.0          # always fires
    positives = torch.rand(30, generator=g) > 0.6
    f1 = concept_f1(scores, positives)
    for j in range(8):
        ref = f1_score(positives.numpy(), (scores[:, j] > 0).numpy(), zero_division=0)
        assert float(f1[j]) == pytest.approx(ref)
    p = int(positives.sum())
    assert float(f1[1]) == pytest.approx(2 * p / (2 * p + 30 - p))
    # no positives and a silent latent: the denominator is 0 -> 0 (documented)
    assert concept_f1(torch.zeros(4, 2), torch.zeros(4, dtype=torch.bool)).tolist() == [0.0, 0.0]


def test_best_latent_ties_and_candidates():
    scores = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    positives = torch.tensor([True, False, True])
    # latents 0 and 2 both have F1 = 1; the smaller id wins, whatever the candidates' order
    assert best_latent(scores, positives) == (0, 1.0)
    assert best_latent(scores, positives, candidates=torch.tensor([3, 2, 1])) == (2, 1.0)
    assert best_latent(scores, positives, candidates=torch.tensor([3, 1]))[0] == 1  # F1 2/3 vs 1/2


def test_f1_significance_and_random_latents():
    random_f1s = torch.tensor([0.1, 0.5, 0.5, 0.9])
    assert f1_significance(0.5, random_f1s) == pytest.approx((1 + 3) / 5)   # ties count against the latent
    assert f1_significance(0.95, random_f1s) == pytest.approx(1 / 5)        # the smallest reachable p
    brute = [(1 + sum(r >= b for r in random_f1s.tolist())) / 5 for b in (0.0, 0.3, 0.7)]
    assert [f1_significance(b, random_f1s) for b in (0.0, 0.3, 0.7)] == pytest.approx(brute)
    pool = torch.tensor([4, 8, 15])
    a, b = random_latents(pool, 50, seed=3), random_latents(pool, 50, seed=3)
    assert torch.equal(a, b) and set(a.tolist()) <= {4, 8, 15} and len(set(a.tolist())) == 3


@pytest.mark.parametrize("bad, phrase", [
    (lambda v, i, im, p: image_scores(v, i, im, p, 5, 4), "outside 0..3"),
    (lambda v, i, im, p: image_scores(v, i, im, p, 3, 9), "image ids must lie in 0..2"),
    (lambda v, i, im, p: nearest_latent(torch.rand(3, 2), torch.tensor([1, 0, 1])), "bool mask"),
    (lambda v, i, im, p: nearest_latent(torch.rand(3, 2), torch.zeros(3, dtype=torch.bool)), "no images"),
    (lambda v, i, im, p: concept_f1(torch.rand(3, 2), torch.ones(4, dtype=torch.bool)), "[n_images=3]"),
    (lambda v, i, im, p: f1_significance(0.5, []), "at least one"),
    (lambda v, i, im, p: random_latents(torch.tensor([], dtype=torch.long), 3), "empty"),
])
def test_bad_input_is_named(bad, phrase):
    with pytest.raises(InputError) as err:
        bad(*random_codes())
    assert phrase in str(err.value)


def test_concept_f1_rejects_nan_scores():
    from saeengine.errors import NonFiniteError

    with pytest.raises(NonFiniteError):
        concept_f1(np.array([[np.nan, 1.0]]), torch.tensor([True]))
