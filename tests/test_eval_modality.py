"""Shared vision-language latents (saeengine.eval.modality, modality_record, modality_layers,
modality_synthetic, modality_report, ``saeengine modality``): the bookkeeping against brute force on random codes, the
planted-direction synthetic pairs against their disjoint control, the recording of a tiny
random LLaVA against its own hidden states, the command line end to end, and bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.architectures.dense import DenseCode
from saeengine.errors import InputError
from saeengine.eval.modality import (ModalityCounts, PairSets, categorize, derangement, modality_stats,
                                     pair_grounding)

transformers = pytest.importorskip("transformers", reason="the LLaVA recording needs transformers")
from tiny_llava import BOS_ID, IMAGE_TOKENS, VOCAB, save_tiny_llava, tiny_llava  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


def random_code(n: int, d_sae: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values, indices [n, k]: k distinct latents per row, about a third of the slots off (0)."""
    gen = torch.Generator().manual_seed(seed)
    # a skewed draw so that some latents are frequent, some rare and some never fire
    weights = torch.rand(d_sae, generator=gen) ** 3
    weights[: d_sae // 8] = 0
    indices = torch.stack([torch.multinomial(weights, k, generator=gen) for _ in range(n)])
    values = torch.rand(n, k, generator=gen) * (torch.rand(n, k, generator=gen) > 0.35)
    return values, indices


def dense_of(values, indices, d_sae):
    dense = np.zeros((values.shape[0], d_sae))
    for row in range(values.shape[0]):
        for v, j in zip(values[row].tolist(), indices[row].tolist()):
            dense[row, j] += v
    return dense


# ----- the bookkeeping ----------------------------------------------------------------------
def test_rates_scores_and_categories_match_brute_force():
    d_sae, n = 40, 600
    values, indices = random_code(n, d_sae, 5, seed=1)
    image = torch.rand(n, generator=torch.Generator().manual_seed(2)) < 0.3
    counts = ModalityCounts(d_sae)
    for start in range(0, n, 97):  # streaming in uneven batches = one pass
        counts.add(values[start:start + 97], indices[start:start + 97],
                   kinds=["image" if b else "text" for b in image[start:start + 97].tolist()])
    result = counts.result(low=0.2, high=0.8, min_rate=0.01)
    fires = dense_of(values, indices, d_sae) > 0
    img, txt = image.numpy(), ~image.numpy()
    p_img, p_txt = fires[img].mean(0), fires[txt].mean(0)
    np.testing.assert_allclose(result["p_img"], p_img, rtol=0, atol=1e-15)
    np.testing.assert_allclose(result["p_txt"], p_txt, rtol=0, atol=1e-15)
    assert result["n_image_tokens"] == img.sum() and result["n_text_tokens"] == txt.sum()
    expected = []
    for j in range(d_sae):  # the definitions, one latent at a time
        if p_img[j] + p_txt[j] == 0:
            assert math.isnan(result["score"][j])
            expected.append("dead")
            continue
        m = p_img[j] / (p_img[j] + p_txt[j])
        assert result["score"][j] == pytest.approx(m, abs=1e-15)
        if m > 0.8:
            expected.append("image")
        elif m < 0.2:
            expected.append("text")
        elif p_img[j] >= 0.01 and p_txt[j] >= 0.01:
            expected.append("shared")
        else:
            expected.append("rare_mixed")
    assert result["category"].tolist() == expected
    live = sum(e != "dead" for e in expected)
    assert result["live"] == live and result["dead"] == d_sae - live >= d_sae // 8
    assert result["shared"] == expected.count("shared") > 0
    assert result["shared_fraction"] == expected.count("shared") / live
    assert result["shared_fraction_of_all"] == expected.count("shared") / d_sae
    # a dense code of the same activations and a bool mask of the kinds give the same numbers
    dense = modality_stats(DenseCode(torch.from_numpy(dense_of(values, indices, d_sae)).float()), kinds=image,
                           low=0.2, high=0.8, min_rate=0.01)
    np.testing.assert_array_equal(dense["count_image"], result["count_image"])
    np.testing.assert_array_equal(dense["count_text"], result["count_text"])


def test_categorize_edges_and_rate_floor():
    p_img = np.array([0.0, 0.5, 0.1, 0.9e-4, 0.2, 0.0])
    p_txt = np.array([0.0, 0.5, 0.9, 0.9e-4, 0.0, 0.3])
    # m = nan, 0.5, 0.1 (the band's edge is in), 0.5 (but too rare), 1, 0
    assert categorize(p_img, p_txt).tolist() == ["dead", "shared", "shared", "rare_mixed", "image", "text"]
    assert categorize(p_img, p_txt, min_rate=0).tolist()[3] == "shared"
    with pytest.raises(InputError, match="low <= high"):
        categorize(p_img, p_txt, low=0.9, high=0.1)


def test_pair_grounding_matches_brute_force_and_sklearn():
    from sklearn.metrics import roc_auc_score

    d_sae, n_pairs = 30, 25
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, 9, (n_pairs, 2), generator=gen)  # image and caption tokens per pair
    pair = torch.cat([torch.full((int(lengths[p].sum()),), p) for p in range(n_pairs)])
    image = torch.cat([torch.tensor([True] * int(lengths[p, 0]) + [False] * int(lengths[p, 1]))
                       for p in range(n_pairs)])
    values, indices = random_code(pair.numel(), d_sae, 4, seed=4)
    order = torch.randperm(pair.numel(), generator=gen)  # a pair's tokens spread over batches
    fires = dense_of(values, indices, d_sae) > 0
    for min_share in (0.0, 0.5):
        sets = PairSets(d_sae)
        for part in order.split(37):
            sets.add(values[part], indices[part], pairs=pair[part], kinds=image[part])
        result = sets.result(min_share=min_share, seed=7)
        perm = result["derangement"]
        assert sorted(perm.tolist()) == list(range(n_pairs)) and all(perm != np.arange(n_pairs))

        def active(p, side):
            rows = (pair.numpy() == p) & (image.numpy() == side)
            need = max(1, math.ceil(min_share * rows.sum()))
            return {j for j in range(d_sae) if fires[rows, j].sum() >= need}

        def jac(a, b):
            return len(a & b) / len(a | b) if a | b else 0.0

        matched = [jac(active(p, True), active(p, False)) for p in range(n_pairs)]
        mismatched = [jac(active(p, True), active(int(perm[p]), False)) for p in range(n_pairs)]
        np.testing.assert_allclose(result["matched"], matched, rtol=0, atol=1e-12)
        np.testing.assert_allclose(result["mismatched"], mismatched, rtol=0, atol=1e-12)
        labels = [1] * n_pairs + [0] * n_pairs
        assert result["auroc"] == pytest.approx(roc_auc_score(labels, matched + mismatched), abs=1e-12)
        one_shot = pair_grounding(values, indices, pairs=pair, kinds=image, d_sae=d_sae, min_share=min_share, seed=7)
        np.testing.assert_array_equal(one_shot["matched"], result["matched"])


def test_derangement_is_deterministic_and_has_no_fixed_point():
    for n in (2, 3, 10, 101):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n)) and not np.any(perm == np.arange(n))
            np.testing.assert_array_equal(perm, derangement(n, seed))
    assert any(not np.array_equal(derangement(50, 0), derangement(50, s)) for s in range(1, 4))
    with pytest.raises(ValueError, match="n=1"):
        derangement(1)


def test_bookkeeping_refuses_bad_codes_and_kinds():
    values, indices = random_code(10, 8, 3, seed=0)
    counts = ModalityCounts(8)
    with pytest.raises(InputError, match="'image' or 'text'"):
        counts.add(values, indices, kinds=["image"] * 5 + ["pad"] * 5)
    with pytest.raises(InputError, match="one entry per token"):
        counts.add(values, indices, kinds=["image"] * 9)
    bad = indices.clone()
    bad[0] = 3
    with pytest.raises(InputError, match="fires twice"):
        counts.add(torch.ones_like(values), bad, kinds=["image"] * 10)
    counts.add(values, indices, kinds=["image"] * 10)
    with pytest.raises(InputError, match="no text tokens"):
        counts.result()
    sets = PairSets(8)
    sets.add(values, indices, pairs=[0] * 5 + [2] * 5, kinds=["image", "text"] * 5)
    with pytest.raises(InputError, match="pair 1 has no image tokens"):
        sets.result()
    with pytest.raises(InputError, match="d_sae"):
        modality_stats(values, indices, kinds=["image"] * 10)


# ----- planted shared directions vs a disjoint control ------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    from saeengine.eval.experiments.common import train_small_sae
    from saeengine.eval.modality_layers import ModalityTokens, analyze
    from saeengine.eval.modality_synthetic import synthetic_pairs

    shared, control = synthetic_pairs(shared=True, seed=0), synthetic_pairs(shared=False, seed=0)
    data = ModalityTokens({**shared.layers, **control.layers}, shared.image, shared.pair, shared.caption,
                          {**shared.directions, **control.directions})
    saes = {name: train_small_sae(tokens, d_sae=64, k=2, epochs=20, seed=0) for name, tokens in data.layers.items()}
    return data, saes, analyze(data, saes=saes, progress=False)


def test_planted_shared_directions_give_shared_latents_and_grounding(synthetic):
    data, saes, result = synthetic
    row = {r["layer"]: r for r in result["layers"]}["planted-shared"]
    directions = data.directions["planted-shared"]["image"]  # = the text directions here
    assert torch.equal(directions, data.directions["planted-shared"]["text"])
    category = result["latents"]["planted-shared"]["category"]
    rows = torch.nn.functional.normalize(saes["planted-shared"].W_dec.detach(), dim=1)
    cos = rows @ directions.T  # [F, C]: an oracle independent of the firing bookkeeping
    start = SAE(SAEConfig(d_in=directions.shape[1], d_sae=64, k=2), seed=0).W_dec.detach()  # train_small_sae's start
    at_start = torch.nn.functional.normalize(start, dim=1) @ directions.T
    assert (at_start.max(0).values < 0.6).all(), at_start.max(0).values  # far from every concept (measured <= 0.45)
    shared = torch.from_numpy(category == "shared")
    # every planted concept has a shared latent along it, and every shared latent is a concept's
    assert (cos[shared].max(0).values > 0.9).all(), cos[shared].max(0).values
    assert (cos[shared].max(1).values > 0.9).all()
    assert row["concepts_found"]["found"] == directions.shape[0]
    # latents along no concept (the styles) are modality-pure
    assert set(category[(cos.max(1).values < 0.5).numpy()].tolist()) <= {"image", "text", "dead"}
    assert row["shared_fraction"] > 0.2 and row["auroc"] > 0.9
    assert row["matched_mean"] > 5 * row["mismatched_mean"]


def test_disjoint_control_shares_nothing_and_grounds_at_chance(synthetic):
    _, _, result = synthetic
    row = {r["layer"]: r for r in result["layers"]}["disjoint-control"]
    assert row["live"] > 30
    assert row["shared_fraction"] < 0.05
    assert 0.4 < row["auroc"] < 0.6
    assert row["concepts_found"]["found"] == 0


# ----- the tiny LLaVA ---------------------------------------------------------------------------
CAPTIONS = ["a red cat", "the big dog on the grass", "car", "a small bird in the blue sky"]


def caption_ids(texts):
    return [[VOCAB[word] for word in text.split()] for text in texts]


def test_recording_labels_and_records_the_residual_stream(tmp_path):
    from saeengine.eval.modality_layers import analyze
    from saeengine.eval.modality_record import examples_from_ids, record_pairs

    model = tiny_llava(n_layers=3)
    captions = caption_ids(CAPTIONS)
    pixels = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    examples = examples_from_ids(model, captions, pixels, prefix=[BOS_ID])
    data = record_pairs(model, examples, [0, 1], tmp_path / "rec", batch_size=3, progress=False)
    n_caption = sum(len(c) for c in captions)
    assert int(data.image.sum()) == IMAGE_TOKENS * len(captions)
    assert int((~data.image).sum()) == n_caption + len(captions)  # the caption and <s>
    assert int(data.caption.sum()) == n_caption and not bool((data.caption & data.image).any())
    assert torch.bincount(data.pair).tolist() == [1 + IMAGE_TOKENS + len(c) for c in captions]
    # the stores hold the model's own hidden states after blocks 0 and 1 (hidden_states[1], [2])
    with torch.no_grad():
        ids = torch.tensor(examples[1]["input_ids"])[None]
        out = model(input_ids=ids, pixel_values=examples[1]["pixel_values"], output_hidden_states=True)
    rows = np.flatnonzero(data.pair.numpy() == 1)
    for layer, hidden in (("blocks.0", out.hidden_states[1]), ("blocks.1", out.hidden_states[2])):
        torch.testing.assert_close(data.layers[layer].get(rows), hidden[0], rtol=1e-5, atol=1e-5)
    result = analyze(data, d_sae=32, k=4, epochs=2, progress=False)
    assert [r["layer"] for r in result["layers"]] == ["blocks.0", "blocks.1"]
    for row in result["layers"]:
        assert row["n_image_tokens"] == IMAGE_TOKENS * len(captions) and row["n_pairs"] == len(captions)
        assert row["n_caption_tokens"] == n_caption and row["live"] + row["dead"] == 32
        assert 0 <= row["auroc"] <= 1 and len(result["latents"][row["layer"]]["score"]) == 32


def write_pairs(folder, captions, bad_line: str | None = None):
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": caption}))
    if bad_line is not None:
        lines.insert(1, bad_line)
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_end_to_end_on_the_tiny_model(tmp_path, capsys):
    from saeengine.cli import main

    model = save_tiny_llava(tmp_path / "model", n_layers=3)
    pairs = write_pairs(tmp_path / "data", CAPTIONS)
    out = tmp_path / "out"
    args = ["modality", "--model", str(model), "--pairs", str(pairs), "--layers", "0,-1", "--d-sae", "32", "--k",
            "4", "--epochs", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "blocks.2:" in capsys.readouterr().out
    document = json.loads((out / "modality.json").read_text())
    assert document["format"] == "saeengine-modality" and document["source"]["n_pairs"] == len(CAPTIONS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
    n_caption = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in CAPTIONS)
    rows = document["layers"]
    assert [r["layer"] for r in rows] == ["blocks.0", "blocks.2"]
    for row in rows:
        assert row["n_image_tokens"] == IMAGE_TOKENS * len(CAPTIONS)
        assert row["n_caption_tokens"] == n_caption and row["n_text_tokens"] == n_caption + len(CAPTIONS)
        assert len(document["latents"][row["layer"]]["category"]) == 32
        assert row["sae"].endswith(f"saes/{row['layer']}/sae")
    html = (out / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 3 * len(rows)
    assert not re.search(r'src="(?!data:)', html)
    # the saved SAEs and the finished recording, reused: the same numbers
    assert main([*args[:-3], "--out", str(out), "--sae", str(out / "saes"), "--resume", "--no-progress"]) == 0
    reused = json.loads((out / "modality.json").read_text())
    for old, new in zip(rows, reused["layers"]):
        assert new["sae"] == str(out / "saes" / old["layer"] / "sae")
        assert {k: v for k, v in new.items() if k != "sae"} == {k: v for k, v in old.items() if k != "sae"}


def test_cli_synthetic_demo(tmp_path, capsys):
    from saeengine.cli import main

    assert main(["modality", "--synthetic", "--epochs", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "planted-shared:" in said and "disjoint-control:" in said
    document = json.loads((tmp_path / "modality.json").read_text())
    assert [r["layer"] for r in document["layers"]] == ["planted-shared", "disjoint-control"]
    assert document["layers"][0]["n_pairs"] == 240 and "concepts_found" in document["layers"][0]
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 6
    with pytest.raises(SystemExit):
        main(["modality", "--synthetic", "--model", "x", "--out", str(tmp_path)])
    assert "--synthetic makes its own data" in capsys.readouterr().err


# ----- bad input --------------------------------------------------------------------------------
def test_a_model_without_image_tokens_is_refused(tmp_path, capsys):
    from saeengine.cli import main
    from saeengine.eval.modality_record import examples_from_ids, record_pairs

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=40)
    text_only = transformers.LlamaForCausalLM(config)
    with pytest.raises(InputError, match="no image_token_id"):
        examples_from_ids(text_only, [[5, 6]], torch.zeros(1, 3, 32, 32))
    with pytest.raises(InputError, match="LLaVA-style"):
        record_pairs(text_only, [], [0], tmp_path / "rec")
    text_only.save_pretrained(tmp_path / "llama")
    pairs = write_pairs(tmp_path / "data", CAPTIONS[:2])
    assert main(["modality", "--model", str(tmp_path / "llama"), "--pairs", str(pairs), "--layers", "0",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "image_token_id" in capsys.readouterr().err
    # a LLaVA model, but inputs that hold no image token
    model = tiny_llava(n_layers=1)
    no_image = [{"input_ids": [BOS_ID, 5, 6], "pixel_values": torch.zeros(1, 3, 32, 32)}] * 2
    with pytest.raises(InputError, match="pair 0 has no image token"):
        record_pairs(model, no_image, [0], tmp_path / "rec2")


def test_bad_pairs_files_and_layers_are_refused(tmp_path, capsys):
    from saeengine.cli import main
    from saeengine.eval.modality_record import read_pairs

    pairs = write_pairs(tmp_path / "a", CAPTIONS[:2], bad_line=json.dumps({"image": "images/0.png"}))
    with pytest.raises(InputError, match=r'line 2 has no "caption"'):
        read_pairs(pairs)
    pairs = write_pairs(tmp_path / "b", CAPTIONS[:2], bad_line=json.dumps({"image": "nope.png", "caption": "x"}))
    with pytest.raises(InputError, match="nope.png does not exist"):
        read_pairs(pairs)
    pairs = write_pairs(tmp_path / "c", CAPTIONS[:2], bad_line="not json")
    with pytest.raises(InputError, match="line 2 is not JSON"):
        read_pairs(pairs)
    assert [p[1] for p in read_pairs(write_pairs(tmp_path / "d", CAPTIONS[:2]))] == CAPTIONS[:2]
    model = save_tiny_llava(tmp_path / "model", n_layers=2)
    good = tmp_path / "d" / "pairs.jsonl"
    assert main(["modality", "--model", str(model), "--pairs", str(good), "--layers", "0,7", "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "layer 7 is out of range" in err and "0..1" in err
    with pytest.raises(SystemExit):
        main(["modality", "--model", str(model), "--pairs", str(good), "--out", str(tmp_path / "o")])
    assert "give --layers" in capsys.readouterr().err
