"""Automated attribute discovery (saeengine.eval.attributes, describers, the report and
``saeengine attributes``): the describers against independent computations (skimage,
brute force), the statistics' calibration, and the pipeline on a toy generator whose
planted brightness and hue directions are the known answer."""

from __future__ import annotations

import base64
import colorsys
import io
import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from saeengine import cli
from saeengine.errors import ConfigError, InputError
from saeengine.eval.attributes import discover_attributes, null_directions, score_attribute
from saeengine.eval.attributes_toy import TOY_PROMPTS, ToyGenerator, toy_directions
from saeengine.eval.describers import (CaptionDescriber, Describer, ImageStats, LabelDescriber, caption_words,
                                       change, colourfulness, parse_describers, wrap_turns)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = list(TOY_PROMPTS[:8])


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


@pytest.fixture(scope="module")
def toy():
    return ToyGenerator()


@pytest.fixture(scope="module")
def found(toy):
    """The toy's four latents (0 brightness, 1 hue, 2 and 3 random), 8 prompts, 8 nulls."""
    return discover_attributes(toy, toy_directions(toy), PROMPTS, alpha=4.0, describers=[ImageStats()], n_null=8)


def _by_latent(discovery) -> dict[int, dict]:
    return {row["latent"]: row for row in discovery.result["latents"]}


def _attribute(row: dict, name: str) -> dict:
    return next(a for a in row["attributes"] if a["attribute"] == name)


def _random_images(n=4, h=9, w=11, seed=0) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    images[0, :3] = 128  # some grey pixels (no hue, zero saturation)
    images[1, 0, 0] = 0  # a black pixel (value 0)
    return images


# ----- describers against independent computations ----------------------------------------------
def test_image_stats_match_skimage():
    from skimage.color import rgb2gray, rgb2hsv
    from skimage.filters import sobel

    images = _random_images()
    assert isinstance(ImageStats(), Describer)
    got = ImageStats().describe(images)
    for i, image in enumerate(images):
        hsv = rgb2hsv(image)
        grey = rgb2gray(image)
        assert got["brightness"][i] == pytest.approx(grey.mean(), abs=1e-12)
        assert got["saturation"][i] == pytest.approx(hsv[..., 1].mean(), abs=1e-12)
        chroma = (hsv[..., 1] * hsv[..., 2]).ravel()  # S * V = max - min
        angle = np.angle(np.sum(chroma * np.exp(2j * np.pi * hsv[..., 0].ravel()))) / (2 * np.pi)
        assert got["hue"][i] == pytest.approx(angle % 1.0, abs=1e-12)
        assert got["edge_density"][i] == pytest.approx((sobel(grey) > 0.1).mean(), abs=1e-12)


def test_colourfulness_equals_a_brute_force_loop():
    images = _random_images(n=2, h=5, w=4, seed=3)
    for i, image in enumerate(images):
        rg = [float(r) - float(g) for r, g, _ in image.reshape(-1, 3)]
        yb = [0.5 * (float(r) + float(g)) - float(b) for r, g, b in image.reshape(-1, 3)]
        expected = (math.sqrt(statistics.pvariance(rg) + statistics.pvariance(yb))
                    + 0.3 * math.sqrt(statistics.fmean(rg) ** 2 + statistics.fmean(yb) ** 2))
        assert colourfulness(images)[i] == pytest.approx(expected, rel=1e-12)
    grey = np.full((1, 4, 4, 3), 90, dtype=np.uint8)
    assert colourfulness(grey)[0] == 0.0


def _solid(hues, s=0.8, v=0.9, side=6) -> np.ndarray:
    """One image per list of hues (turns): its columns cycle through them."""
    out = np.empty((len(hues), side, side, 3), dtype=np.uint8)
    for i, row in enumerate(hues):
        for col in range(side):
            out[i, :, col] = np.round(255 * np.array(colorsys.hsv_to_rgb(row[col % len(row)], s, v)))
    return out


def test_hue_is_circular():
    stats = ImageStats()
    hue = stats.describe(_solid([[0.95], [0.05], [0.98, 0.02]]))["hue"]
    assert hue[0] == pytest.approx(0.95, abs=0.01) and hue[1] == pytest.approx(0.05, abs=0.01)
    assert min(hue[2], 1 - hue[2]) < 0.01  # the mean of 0.98 and 0.02 is 0.0, not the arithmetic 0.5
    assert change("circular", hue[:1], hue[1:2])[0] == pytest.approx(0.1, abs=0.02)  # +0.1 turn, not -0.9
    assert change("circular", hue[1:2], hue[:1])[0] == pytest.approx(-0.1, abs=0.02)
    assert wrap_turns(np.array([0.5, -0.5, 0.25, 0.75]) ).tolist() == [-0.5, -0.5, 0.25, -0.25]
    grey = np.full((1, 4, 4, 3), 70, dtype=np.uint8)
    assert np.isnan(stats.describe(grey)["hue"][0])  # no colour, no hue


def test_change_of_each_kind():
    base, steered = np.array([1.0, 2.0, np.nan]), np.array([1.0, 5.0, 3.0])
    assert change("categorical", base, steered)[:2].tolist() == [0.0, 1.0]
    assert np.isnan(change("categorical", base, steered)[2])
    assert change("linear", base, steered)[:2].tolist() == [0.0, 3.0]
    assert change("presence", np.array([1.0, 0.0]), np.array([0.0, 0.0])).tolist() == [-1.0, 0.0]


def test_label_describer_on_real_photos():
    import skimage.data
    from PIL import Image

    photos = [skimage.data.chelsea(), skimage.data.coffee()]  # a cat; a cup of coffee
    images = np.stack([np.asarray(Image.fromarray(p).resize((128, 128), Image.BILINEAR)) for p in photos])
    describer = LabelDescriber()
    label = describer.describe(images)["label"]
    names = describer.categories("label")
    assert 281 <= label[0] <= 285, names[int(label[0])]  # ImageNet's domestic cats are classes 281..285
    assert names[int(label[1])] in ("espresso", "cup", "coffee mug"), names[int(label[1])]
    assert change("categorical", label[[0, 0]], label[[0, 1]]).tolist() == [0.0, 1.0]


def test_caption_words_and_describer_plumbing():
    assert caption_words("A photo of a Bright, red car!") == {"bright", "red", "car"}
    captions = iter([["a red car", "a blue sky"]])
    describer = CaptionDescriber(lambda images: next(captions))
    got = describer.describe(np.zeros((2, 4, 4, 3), dtype=np.uint8))
    assert {k: v.tolist() for k, v in got.items()} == {"says:blue": [0.0, 1.0], "says:car": [1.0, 0.0],
                                                        "says:red": [1.0, 0.0], "says:sky": [0.0, 1.0]}
    with pytest.raises(InputError, match="one caption per image"):
        CaptionDescriber(lambda images: ["only one"]).describe(np.zeros((2, 4, 4, 3), dtype=np.uint8))


def _tiny_blip(folder: Path) -> Path:
    """A random-initialized BLIP captioner and its processor from configs (a 12-word vocabulary)."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "bright", "dark", "red", "blue", "a", "cat", "photo"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    text = dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=2, sep_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    saved = folder / "blip"
    model.save_pretrained(saved)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(saved)
    return saved


def test_vlm_describer_loads_a_local_model_folder(tmp_path):
    folder = _tiny_blip(tmp_path)
    describer = CaptionDescriber.from_pretrained(folder, prompt=None, max_new_tokens=4)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    got = describer.describe(images)
    assert len(describer.last_captions) == 3 and all(isinstance(c, str) for c in describer.last_captions)
    for caption, i in zip(describer.last_captions, range(3)):  # the attributes are the captions' words
        assert {k[len("says:"):] for k, v in got.items() if v[i] == 1.0} == caption_words(caption)
    assert all(k.startswith("says:") and set(v.tolist()) <= {0.0, 1.0} for k, v in got.items())
    with pytest.raises(InputError, match="no such folder"):
        CaptionDescriber.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="could not load"):
        CaptionDescriber.from_pretrained(tmp_path / "empty")


# ----- the statistics ----------------------------------------------------------------------------
def test_p_values_are_calibrated_when_the_latent_is_one_more_null():
    """A latent drawn from the nulls' own distribution gets p < 0.05 about 5% of the time
    (Monte Carlo, 4000 draws: 0.05 +- 0.011 at 3 standard errors)."""
    rng = np.random.default_rng(0)
    k, p = 8, 6
    small = 0
    for _ in range(4000):
        shift = rng.normal(size=k + 1)  # each direction's own mean change, plus per-pair noise
        changes = shift[:, None] + 0.3 * rng.normal(size=(k + 1, p))
        small += score_attribute("linear", changes[0], changes[1:])["p_value"] < 0.05
    assert abs(small / 4000 - 0.05) < 0.011


def test_score_attribute_by_hand():
    null = np.array([[0.1, -0.1, 0.2], [-0.2, 0.0, 0.1], [0.05, 0.05, -0.3], [0.0, 0.1, 0.0]])
    latent = np.array([1.0, 0.05, 0.9])
    got = score_attribute("linear", latent, null)
    mu = null.mean(axis=1)
    assert got["mean_change"] == pytest.approx(latent.mean())
    assert got["null"]["mean"] == pytest.approx(mu.mean()) and got["null"]["std"] == pytest.approx(mu.std(ddof=1))
    assert got["effect"] == pytest.approx((latent.mean() - mu.mean()) / mu.std(ddof=1))
    tau = np.sort(np.abs(null).ravel())  # 95th percentile, numpy's linear interpolation, by hand
    pos = 0.95 * (tau.size - 1)
    tau = tau[int(pos)] + (pos - int(pos)) * (tau[int(pos) + 1] - tau[int(pos)])
    assert got["detection_threshold"] == pytest.approx(tau)
    assert got["consistency"] == pytest.approx(np.mean(latent > tau))  # 2 of 3 pairs beyond tau
    assert got["beats_null_max"] and got["sign"] == 1
    assert got["paired_d"] == pytest.approx(latent.mean() / latent.std(ddof=1))
    # the nulls never change a label, the latent changes 2 of 3: an infinite effect
    label = score_attribute("categorical", np.array([1.0, 0.0, 1.0]), np.zeros((4, 3)))
    assert label["effect"] == math.inf and label["p_value"] == 0.0 and label["null_spread_zero"]
    assert label["consistency"] == pytest.approx(2 / 3)


def test_null_directions_are_seeded_unit_vectors():
    a, b = null_directions(16, 5, seed=3), null_directions(16, 5, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, null_directions(16, 5, seed=4))
    assert torch.allclose(a.norm(dim=1), torch.ones(5), atol=1e-6)


# ----- the pipeline on the toy generator ----------------------------------------------------------
def test_toy_alpha_zero_is_the_unsteered_image(toy):
    seeds = list(range(len(PROMPTS)))
    base = toy.generate(PROMPTS, seeds)
    assert np.array_equal(base, toy.generate(PROMPTS, seeds, toy.hue_direction, 0.0))
    assert not np.array_equal(base, toy.generate(PROMPTS, seeds, toy.hue_direction, 4.0))


def test_discovery_names_the_planted_latents(found):
    rows = _by_latent(found)
    brightness, hue = rows[0], rows[1]
    assert brightness["name"] == "brightness +" and brightness["kept"][0] == "brightness"
    assert hue["name"] == "hue +" and hue["kept"][0] == "hue"
    assert _attribute(brightness, "brightness")["consistency"] >= 0.9
    assert _attribute(hue, "hue")["consistency"] >= 0.9
    # the toy's hue moves by hue_gain * alpha * ||v|| = 0.06 * 4 = 0.24 turn, plus grating rounding
    assert _attribute(hue, "hue")["mean_change"] == pytest.approx(0.24, abs=0.01)
    assert "hue" not in brightness["kept"] and "brightness" not in hue["kept"]
    assert rows[2]["kept"] == [] and rows[3]["kept"] == []  # the random controls: nothing beats the null
    assert [r["rank"] for r in found.result["latents"]][:2] == [1, 2]
    assert {r["latent"] for r in found.result["latents"][:2]} == {0, 1}


def test_random_directions_are_rejected(toy):
    """Ten random directions of the planted latents' norm: the test's family-wise level is
    5% per latent, so at most one of ten may keep anything by chance (here: none)."""
    gen = torch.Generator().manual_seed(12345)
    raw = torch.randn(10, toy.width, generator=gen)
    directions = {j: raw[j] / raw[j].norm() for j in range(10)}
    discovery = discover_attributes(toy, directions, PROMPTS, alpha=4.0, describers=[ImageStats()], n_null=8,
                                    null_seed=7)
    kept = [row["latent"] for row in discovery.result["latents"] if row["kept"]]
    assert len(kept) <= 1, kept
    assert all(row["name"] is None for row in discovery.result["latents"] if row["latent"] not in kept)


class _Recorder:
    """A SteerableGenerator that records each call and forwards it to the toy."""

    def __init__(self, inner):
        self.inner, self.width, self.calls = inner, inner.width, []

    def generate(self, prompts, seeds, direction=None, alpha=0.0):
        self.calls.append((list(prompts), list(seeds), None if direction is None else direction.clone(), alpha))
        return self.inner.generate(prompts, seeds, direction, alpha)


def test_pairs_share_seeds_and_nulls_match_each_norm(toy):
    from saeengine.steer import SteerableGenerator

    recorder = _Recorder(toy)
    assert isinstance(toy, SteerableGenerator) and isinstance(recorder, SteerableGenerator)
    directions = {0: 2.0 * toy.brightness_direction, 1: 2.0 * toy.hue_direction, 5: 0.5 * toy.hue_direction}
    seeds = [10, 11, 12]
    discover_attributes(recorder, directions, PROMPTS[:3], seeds, alpha=3.0, describers=[ImageStats()], n_null=4,
                        batch_size=2)
    calls = [(d, a) for p, s, d, a in recorder.calls if p == PROMPTS[:2]]  # one per image set (batches of 2)
    assert all(s in ([10, 11], [12]) for _, s, _, _ in recorder.calls)
    assert calls[0] == (None, 0.0)  # the base images, once for all latents
    norms = [round(float(d.norm()), 5) for d, _ in calls[1:]]
    # latent 0 (norm 2), its 4 nulls (norm 2), latent 1 (norm 2, nulls shared), latent 5 (0.5) and its 4 nulls
    assert norms == [2.0] * 6 + [0.5] * 5 and all(a == 3.0 for _, a in calls[1:])
    nulls = [d for d, _ in calls[2:6]]
    assert torch.allclose(torch.stack(nulls) / 2.0, null_directions(toy.width, 4, 0), atol=1e-6)


def test_a_caption_describer_names_the_brightness_latent(toy):
    """A fake VLM that calls an image "bright" above a luma of 0.55: only the brightness
    latent gains the word, and no random direction ever does (an infinite effect)."""
    def captioner(images):
        luma = ImageStats().describe(images)["brightness"]
        return ["a bright picture" if b > 0.55 else "a dim picture" for b in luma]

    describer = CaptionDescriber(captioner, name="fake-vlm")
    directions = {j: d for j, d in toy_directions(toy).items() if j in (0, 1)}
    discovery = discover_attributes(toy, directions, PROMPTS, alpha=4.0, describers=[describer], n_null=8)
    rows = _by_latent(discovery)
    bright = _attribute(rows[0], "says:bright")
    assert rows[0]["kept"][0] in ("says:bright", "says:dim") and bright["kept"] and bright["sign"] == 1
    assert rows[1]["kept"] == []
    assert discovery.result["attributes"]["says:bright"] == {"kind": "presence", "describer": "fake-vlm"}


# ----- bad inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, phrase", [
    ({"alpha": math.nan}, InputError, "not finite"),
    ({"alpha": math.inf}, InputError, "not finite"),
    ({"alpha": 0.0}, InputError, "steers nothing"),
    ({"prompts": []}, InputError, "no prompts"),
    ({"prompts": "a cat"}, InputError, "not one string"),
    ({"seeds": [1]}, InputError, "one per prompt"),
    ({"describers": []}, InputError, "no describers"),
    ({"directions": {}}, InputError, "non-empty"),
    ({"directions": {0: torch.ones(3)}}, InputError, "width 64"),
    ({"directions": {0: torch.zeros(64)}}, InputError, "never fired"),
    ({"directions": {0: torch.full((64,), math.nan)}}, InputError, "not finite"),
    ({"n_null": 1}, ConfigError, "n_null"),
    ({"significance": 1.5}, InputError, "significance"),
])
def test_bad_inputs_are_named(toy, kwargs, error, phrase):
    args = {"directions": {0: toy.brightness_direction}, "prompts": PROMPTS[:2], "seeds": None, "alpha": 4.0,
            "describers": [ImageStats()]}
    args.update(kwargs)
    with pytest.raises(error, match=phrase):
        discover_attributes(toy, args.pop("directions"), args.pop("prompts"), args.pop("seeds"), args.pop("alpha"),
                            args.pop("describers"), **args)


def test_unknown_describers_are_named():
    assert parse_describers("stats, label,vlm=/m/blip") == [("stats", None), ("label", None), ("vlm", "/m/blip")]
    for text, phrase in (("stats,clip", "unknown describer 'clip'"), ("vlm", "unknown describer 'vlm'"),
                         ("stats,stats", "twice"), (" , ", "no describer")):
        with pytest.raises(InputError, match=phrase):
            parse_describers(text)


# ----- the report and the command line ------------------------------------------------------------
def _strict_json(path: Path) -> dict:
    def no_constants(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=no_constants)


def _decoded_images(page: str) -> int:
    from PIL import Image

    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    for uri in uris:
        Image.open(io.BytesIO(base64.b64decode(uri))).load()
    return len(uris)


def test_cli_toy_writes_json_and_html(tmp_path, capsys):
    out = tmp_path / "toy"
    assert cli.main(["attributes", "--toy", "--examples", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "latent 0: brightness +" in printed and "latent 1: hue +" in printed
    data = _strict_json(out / "attributes.json")
    assert data["format"] == "saeengine-attributes" and data["report"] == "attributes.html"
    assert data["source"]["planted"] == {"0": "brightness", "1": "hue", "2": "random", "3": "random"}
    rows = {r["latent"]: r for r in data["latents"]}
    assert rows[0]["name"] == "brightness +" and rows[1]["name"] == "hue +" and not rows[2]["kept"] + rows[3]["kept"]
    assert data["n_images"] == (1 + 4 + 8) * len(TOY_PROMPTS)
    page = (out / "attributes.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    for latent in range(4):
        assert f'id="latent-{latent}"' in page
    assert _decoded_images(page) == 4 * (2 * 3 + 1)  # per latent: 3 pairs and the effect plot
    # every field the JSON holds is documented
    docs = (ROOT / "docs" / "attributes.md").read_text()
    fields = [*data, *data["settings"], *rows[0], *rows[0]["attributes"][0], *rows[0]["attributes"][0]["null"]]
    assert [f for f in fields if f"`{f}`" not in docs] == []


class _StepGenerator:
    """White images when alpha * direction[0] > 3, black otherwise: no random unit direction
    of 64 dimensions gets there (it would need |u_0| > 0.75), the first axis does."""

    width = 64

    def generate(self, prompts, seeds, direction=None, alpha=0.0):
        on = direction is not None and float(alpha * direction[0]) > 3
        return np.full((len(prompts), 4, 4, 3), 255 if on else 0, dtype=np.uint8)


def test_an_infinite_effect_is_strict_json(tmp_path):
    from saeengine.eval.attributes_report import write_attributes

    discovery = discover_attributes(_StepGenerator(), {0: torch.eye(64)[0]}, PROMPTS[:3], describers=[ImageStats()],
                                    n_null=4)
    paths = write_attributes(tmp_path, discovery, {"generator": "step"})
    data = _strict_json(paths["json"])
    row = data["latents"][0]
    bright = next(a for a in row["attributes"] if a["attribute"] == "brightness")
    assert bright["mean_change"] == 1.0 and bright["null"]["std"] == 0.0 and bright["null_spread_zero"]
    assert bright["effect"] is None and bright["p_value"] == 0.0 and bright["kept"] and row["name"] == "brightness +"
    assert "+inf" in paths["html"].read_text()


@pytest.mark.parametrize("argv, phrase", [
    (["--alpha", "nan"], "not finite"),
    (["--latents", "7"], "latent 7 is out of range"),
    (["--describers", "stats,colour"], "unknown describer 'colour'"),
])
def test_cli_bad_inputs(tmp_path, capsys, argv, phrase):
    assert cli.main(["attributes", "--toy", "--out", str(tmp_path), "--no-progress", *argv]) == 1
    assert phrase in capsys.readouterr().err


def test_cli_empty_prompts_file(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("# only a comment\n\n")
    assert cli.main(["attributes", "--toy", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path),
                     "--no-progress"]) == 1
    assert "holds no prompts" in capsys.readouterr().err


def test_cli_on_a_tiny_diffusion_pipeline(tmp_path, capsys):
    """The pipeline path end to end on helper E's tiny random Stable Diffusion (32x32, two
    steps) with a random SAE on its penultimate text-encoder block."""
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from tiny_diffusion import save_pipeline, tiny_sd
    finally:
        sys.path.remove(str(ROOT / "tests"))
    from saeengine import SAE, SAEConfig

    save_pipeline(tiny_sd(), tmp_path / "pipe")
    SAE(SAEConfig(d_in=32, d_sae=8, k=2), seed=0).save(tmp_path / "sae")
    (tmp_path / "prompts.txt").write_text("a cat\na red dog\nthe cat on a mat\n")
    common = ["attributes", "--pipeline", str(tmp_path / "pipe"), "--sae", str(tmp_path / "sae"), "--prompts",
              str(tmp_path / "prompts.txt"), "--steps", "2", "--size", "32", "--nulls", "2", "--no-progress"]
    assert cli.main([*common, "--top", "2", "--out", str(tmp_path / "out")]) == 0
    data = _strict_json(tmp_path / "out" / "attributes.json")
    assert len(data["latents"]) == 2 and data["settings"]["width"] == 32
    assert data["source"]["layer"] == -2 and set(data["source"]["m_j"]) == {str(r["latent"]) for r in data["latents"]}
    assert all(v > 0 for v in data["source"]["m_j"].values())
    assert data["n_images"] == (1 + 2 + 2 * len({r["norm"] for r in data["latents"]})) * 3
    capsys.readouterr()
    assert cli.main([*common, "--latents", "99", "--out", str(tmp_path / "bad")]) == 1
    assert "latent 99 is out of range" in capsys.readouterr().err
