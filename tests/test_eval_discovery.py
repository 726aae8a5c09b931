"""Feature discovery (saeengine.eval.discovery) on a planted SAE whose latent j reads input
coordinate j only, so the summed code of any patches is known from the tokens themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.errors import ConfigError, DataMismatchError, InputError
from saeengine.eval.batch import TokenBatch, code_pairs
from saeengine.eval.discovery import discover, top_latents_for_patches
from saeengine.eval.exemplars import Exemplars

D_IN, D_SAE = 6, 8  # latents 6 and 7 read nothing: they never fire
SELECTED = [1, 4, 7]


def planted_sae(architecture: str) -> SAE:
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=2))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:D_IN] = torch.eye(D_IN)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def query_tokens() -> np.ndarray:
    """[9, D_IN] tokens, at most two positive coordinates each (so TopK k=2 keeps them all).
    The selected patches fire latents 3 (most), 1, then 4 and 5 tied; the others fire
    latent 0 hard (a selection that is ignored would put it first) and latent 2 is negative."""
    t = np.zeros((9, D_IN), np.float32)
    t[[0, 2, 3, 5, 6, 8], 0] = 10.0
    t[1, [3, 1]] = [1.25, 0.5]
    t[4, [3, 4]] = [1.0, 0.25]
    t[7, [3, 5]] = [0.75, 0.25]
    t[SELECTED, 2] = -3.0
    return t


def oracle(tokens: np.ndarray, patches, n: int):
    """Top latents of the summed ReLU codes of the planted SAE, by decreasing sum then id."""
    summed = np.zeros(D_SAE)
    summed[:D_IN] = np.clip(tokens[patches], 0, None).sum(0)
    order = sorted((j for j in range(D_SAE) if summed[j] > 0), key=lambda j: (-summed[j], j))[:n]
    return order, [summed[j] for j in order]


@pytest.mark.parametrize("architecture", ["relu", "topk"])
@pytest.mark.parametrize("n", [2, 3, 10])
def test_top_latents_are_the_planted_ones(architecture, n):
    tokens = query_tokens()
    latents, summed = top_latents_for_patches(planted_sae(architecture), torch.from_numpy(tokens), SELECTED, n=n)
    want, want_sums = oracle(tokens, SELECTED, n)
    assert latents.dtype == torch.int64 and summed.dtype == torch.float32
    assert latents.tolist() == want and want[:2] == [3, 1]
    assert summed.tolist() == pytest.approx(want_sums, abs=1e-6)
    assert len(want) == min(n, 4)  # fewer than n fire: only those come back


def test_mask_positions_and_repeats_agree():
    sae, tokens = planted_sae("relu"), torch.from_numpy(query_tokens())
    mask = np.zeros(9, bool)
    mask[SELECTED] = True
    runs = [top_latents_for_patches(sae, tokens, p) for p in
            (SELECTED, mask, torch.from_numpy(mask), torch.tensor(SELECTED), [1, 1, 4, 7, 7])]
    for latents, summed in runs[1:]:
        assert torch.equal(latents, runs[0][0]) and torch.equal(summed, runs[0][1])
    other, _ = top_latents_for_patches(sae, tokens, ~mask)
    assert other.tolist() == [0]  # the unselected patches fire latent 0 only


@pytest.mark.parametrize("patches, needle", [
    ([1, 9], r"position 9.*T=9"), ([-1], r"position -1.*T=9"), ([], "no patch selected"),
    (np.zeros(9, bool), "no patch selected"), (np.ones(8, bool), r"T=9"), ([1.5], "float")])
def test_bad_patches_raise(patches, needle):
    with pytest.raises(InputError, match=needle):
        top_latents_for_patches(planted_sae("relu"), torch.from_numpy(query_tokens()), patches)


def test_bad_counts_raise():
    sae, tokens = planted_sae("relu"), torch.from_numpy(query_tokens())
    with pytest.raises(ConfigError, match="n=0"):
        top_latents_for_patches(sae, tokens, SELECTED, n=0)
    with pytest.raises(ConfigError, match="per_latent=0"):
        discover(sae, tokens, SELECTED, Exemplars(D_SAE, 2).result(), per_latent=0)


def dataset_exemplars(sae: SAE) -> Exemplars:
    """Exemplars of a 5-image "dataset" encoded by the planted SAE: image 30 has latent 3's
    strongest patch, image 10 the second; latent 1 fires on image 20 only."""
    rows = {10: [(3, 2.0)], 20: [(1, 0.5)], 30: [(3, 4.0), (4, 1.0)], 40: [(5, 0.5)], 50: [(0, 1.0)]}
    x, image, position = [], [], []
    for img, hits in rows.items():
        for p in range(3):
            tok = np.zeros(D_IN, np.float32)
            if p == 1:
                for j, v in hits:
                    tok[j] = v
            x.append(tok)
            image.append(img)
            position.append(p)
    x = torch.from_numpy(np.stack(x))
    values, indices = code_pairs(sae.encode(x))
    acc = Exemplars(D_SAE, top_k=4)
    acc.update(TokenBatch(x=x, x_hat=x, values=values, indices=indices, image=torch.tensor(image),
                          position=torch.tensor(position), is_cls=torch.zeros(len(image), dtype=torch.bool)))
    return acc


@pytest.mark.parametrize("as_dict", [False, True])
def test_discover_returns_the_exemplars_of_the_top_latents(as_dict):
    sae = planted_sae("relu")
    acc = dataset_exemplars(sae)
    source = acc.result() if as_dict else acc  # a result dict, or anything with .exemplars(rule)
    hits = discover(sae, torch.from_numpy(query_tokens()), SELECTED, source, n=3, per_latent=8)
    assert [h["latent"] for h in hits] == [3, 1, 4]
    assert hits[0]["summed"] == pytest.approx(3.0)
    assert hits[0]["images"] == [30, 10] and hits[0]["scores"] == [4.0, 2.0] and hits[0]["positions"] == [1, 1]
    assert hits[1]["images"] == [20] and hits[2]["images"] == [30]
    image_rule = discover(sae, torch.from_numpy(query_tokens()), SELECTED, source, n=1, rule="image", per_latent=1)
    assert image_rule == [{"latent": 3, "summed": 3.0, "images": [30], "scores": [4.0], "positions": [-1]}]


def test_discover_checks_the_table():
    sae, tokens = planted_sae("relu"), torch.from_numpy(query_tokens())
    with pytest.raises(DataMismatchError, match="d_sae=8"):
        discover(sae, tokens, SELECTED, Exemplars(D_SAE + 1, 2).result())
    with pytest.raises(ConfigError, match="'cls'"):
        discover(sae, tokens, SELECTED, Exemplars(D_SAE, 2, rules=("patch",)).result(), rule="cls")
    with pytest.raises(InputError, match="exemplars"):
        discover(sae, tokens, SELECTED, [1, 2])


def test_doc_example_runs(capsys):
    """docs/eval-exemplars.md's example runs as written and prints three latents."""
    from pathlib import Path
    text = (Path(__file__).parents[1] / "docs" / "eval-exemplars.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "eval-exemplars.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 4 and all(line.split()[0].isdigit() for line in lines[:3])
