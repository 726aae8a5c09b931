"""``saeengine eval``: eval.json's fields against their sources (the encode summary, numpy on
brute-force codes, downstream_metrics), the report's sections, heatmaps and embedded images,
the report in headless Chromium, the CLI end to end on tiny encoded folders, and bad input."""

from __future__ import annotations

import base64
import contextlib
import html.parser
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saeengine import SAE, SAEConfig, cli
from saeengine.backbones import Backbone, record_activations
from saeengine.errors import ConfigError, DataMismatchError, InputError
from saeengine.eval import run_eval
from saeengine.eval.batch import code_pairs
from saeengine.eval.downstream import downstream_metrics
from saeengine.eval.encode import encode_store
from saeengine.eval.encoded import EncodedDataset
from saeengine.eval.report import dict_table
from saeengine.eval.report_latents import _ImageCodes, choose_latents
from saeengine.store import ActivationStore, ActivationWriter

ROOT = Path(__file__).resolve().parent.parent
D, F, K, N_IMAGES = 8, 32, 3, 6
CLS_KINDS = ["cls", "patch", "patch", "patch", "patch"]  # a 2x2 patch grid behind a CLS token
HAS_CHROMIUM = any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome"))


class Toy(torch.nn.Module):
    """Block 0: 8x8 RGB -> a 4x4 map of D channels (16 tokens an image); block 1 -> 5 logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(3, D, 3, stride=2, padding=1), torch.nn.Conv2d(D, 5, 1)])

    def forward(self, x):
        return self.blocks[1](torch.relu(self.blocks[0](x))).mean((2, 3))


def toy_backbone() -> Backbone:
    return Backbone(Toy(), "toy", image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), spatial=True)


def load_check_script():
    spec = importlib.util.spec_from_file_location("check_eval", ROOT / "scripts" / "check_eval_report_in_browser.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A recorded store of image files (relative paths) and a CLS+patch store without paths,
    each encoded by one tiny TopK SAE."""
    tmp = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp / "images" / f"img{i}.png")
    backbone = toy_backbone()
    stores = record_activations(backbone, tmp / "images", ["blocks.0"], tmp / "rec", dtype="float32",
                                progress=False)
    sae = SAE(SAEConfig(d_in=D, d_sae=F, k=K), seed=0)
    sae.save(tmp / "sae")
    encode_store(sae, stores["blocks.0"], tmp / "enc", sae_dir=tmp / "sae", progress=False, batch_tokens=32)
    acts = torch.from_numpy(rng.normal(size=(5 * 5, D)).astype(np.float32))
    with ActivationWriter(tmp / "cls_store", d_in=D, dtype="float32", backbone="toy", layer="blocks.0",
                          token_kind="cls+patch", extra={"token_kinds": CLS_KINDS}, auto_shard=False) as w:
        w.add(acts, torch.arange(5).repeat_interleave(5), torch.arange(5).repeat(5))
        w.flush({"images_done": 5})
    encode_store(sae, tmp / "cls_store", tmp / "cls_enc", sae_dir=tmp / "sae", progress=False, batch_tokens=10)
    return {"tmp": tmp, "store": stores["blocks.0"], "enc": tmp / "enc", "cls_store": tmp / "cls_store",
            "cls_enc": tmp / "cls_enc", "sae": sae, "images": tmp / "images", "backbone": backbone}


def brute_codes(sae: SAE, store_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every token's dense code [N, F] (by the SAE directly), and its (image, position)."""
    store = ActivationStore(store_dir)
    rows = np.arange(store.n_tokens)
    with torch.no_grad():
        values, indices = code_pairs(sae.encode(store.get(rows)))
    dense = torch.zeros(len(rows), F).scatter_(1, indices, values).numpy()
    image, position = store.sources(rows)
    return dense, image, position


class _Page(html.parser.HTMLParser):
    """The tags of a page: sections by id, images (src, class), every src/href, tables."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.links, self.tables, self.cards = [], [], [], 0, []
        self.rule = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "section":
            self.sections.append(a.get("id"))
            if a.get("class") == "latent":
                self.cards.append({"id": a["id"], "rules": {}})
        elif tag == "div" and a.get("class") == "rule":
            self.rule = a["data-rule"]
            self.cards[-1]["rules"][self.rule] = []
        elif tag == "img":
            self.images.append((a["src"], a.get("class", "")))
            if a.get("class") == "exemplar":
                self.cards[-1]["rules"][self.rule].append(a["src"])
        elif tag == "table":
            self.tables += 1


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def png(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


# ----- eval.json against its sources ---------------------------------------------------------
def test_eval_json_fields_equal_their_sources(folders, tmp_path):
    result = run_eval.evaluate(folders["enc"], tmp_path / "out", n_latents=4, per_latent=3, progress=False)
    on_disk = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert on_disk == result
    assert set(result) == {"format", "version", "encoded", "metrics", "latents", "downstream", "experiments",
                           "report"}
    assert (result["format"], result["version"], result["report"]) == ("saeengine-eval", 1, "report.html")
    assert result["encoded"] == str(folders["enc"].resolve())
    assert result["downstream"] is None and result["experiments"] == {}
    summary = json.loads((folders["enc"] / "summary.json").read_text())
    assert result["metrics"] == summary["metrics"] and "fvu" in result["metrics"]

    dense, _, _ = brute_codes(folders["sae"], folders["store"])
    count = (dense > 0).sum(0)
    frequency = count / dense.shape[0]
    latents = result["latents"]
    assert latents["d_sae"] == F and latents["n_tokens"] == dense.shape[0] == N_IMAGES * 16
    assert latents["dead"] == int((count == 0).sum()) and latents["alive"] == F - latents["dead"]
    assert latents["dense"] == int((frequency > 1e-2).sum())
    assert latents["dead_fraction"] == pytest.approx(summary["metrics"]["dead_fraction"])
    assert latents["dense_fraction"] == pytest.approx(summary["metrics"]["dense_fraction"])
    for q, value in latents["frequency_quantiles"].items():
        assert value == pytest.approx(np.quantile(frequency, float(q)), abs=1e-12), q
    assert list(latents["frequency_quantiles"]) == ["0", "0.01", "0.1", "0.25", "0.5", "0.75", "0.9", "0.99", "1"]
    # no latent of this SAE lies in saev's band (all fire on > 1% of tokens): the 4 most frequent
    assert latents["shown"]["rule"] == "most_frequent"
    order = sorted(range(F), key=lambda j: (-count[j], j))
    assert latents["shown"]["latents"] == order[:4]


def test_choose_latents_takes_saevs_band_else_the_most_frequent():
    frequency = np.array([0.5, 1e-3, 1e-5, 1e-3, 0.0, 1e-4, 0.2])
    mean = np.array([1.0, 2.0, 0.5, 50.0, 0.0, 0.2, 3.0])
    ids, rule = choose_latents(frequency, mean, 10)
    assert rule == "band" and sorted(ids.tolist()) == [1, 2, 5]  # 3: mean out of band; 0, 6: too frequent
    assert ids.tolist() == [1, 5, 2]  # by decreasing frequency
    ids, rule = choose_latents(frequency, mean, 2)
    assert rule == "band" and ids.tolist() == [1, 2]  # evenly spaced: both ends of the band
    ids, rule = choose_latents(np.array([0.3, 0.0, 0.5, 0.3]), np.array([5.0, 0, 9.0, 9.0]), 3)
    assert rule == "most_frequent" and ids.tolist() == [2, 0, 3]  # dead latent 1 never shown


# ----- report.html -------------------------------------------------------------------------
def test_report_has_every_section_and_only_embedded_images(folders, tmp_path):
    result = run_eval.evaluate(folders["enc"], tmp_path, n_latents=3, per_latent=4, images=folders["images"],
                               progress=False)
    page = parse(tmp_path / "report.html")
    for section in ("metrics", "latents", "exemplars", "downstream", "experiments"):
        assert section in page.sections, section
    assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)
    classes = [cls for _, cls in page.images]
    assert classes.count("plot") == 2 and classes.count("plot histogram") == 3  # scatter, histogram; 1 a card
    text = (tmp_path / "report.html").read_text()
    for name in result["metrics"]:
        assert f"<th>{name}</th>" in text
    assert "fraction of variance unexplained" in text
    encoded = EncodedDataset(folders["enc"])
    assert [c["id"] for c in page.cards] == [f"latent-{j}" for j in result["latents"]["shown"]["latents"]]
    for card in page.cards:
        latent = int(card["id"].split("-")[1])
        assert "cls" not in card["rules"]  # the store holds no CLS token
        for rule in ("patch", "image"):
            held = int((encoded.exemplars(rule)["images"][latent] >= 0).sum())
            assert len(card["rules"].get(rule, [])) == min(held, 4), (latent, rule)
    top = int(encoded.exemplars("patch")["images"][result["latents"]["shown"]["latents"][0]][0])
    assert f"img{top}.png" in text  # captions are the recorded paths


def test_heatmap_is_the_latents_codes_on_the_patch_grid(folders, tmp_path):
    """On the CLS+patch store (positions 1..4 the 2x2 patches), without images: the heat
    grid equals the brute-force codes, and the thumbnail is red exactly where it is not 0."""
    encoded = EncodedDataset(folders["cls_enc"])
    dense, image, position = brute_codes(folders["sae"], folders["cls_store"])
    result = run_eval.evaluate(folders["cls_enc"], tmp_path, n_latents=2, per_latent=5, progress=False)
    latent = result["latents"]["shown"]["latents"][0]
    best = int(encoded.exemplars("patch")["images"][latent][0])
    mine = (image == best) & (position >= 1)
    expected = np.zeros(4, dtype=np.float32)
    expected[position[mine] - 1] = dense[mine, latent]
    got = _ImageCodes(encoded, CLS_KINDS).heat(best, latent)
    np.testing.assert_allclose(got, expected.reshape(2, 2), rtol=1e-6)
    assert expected.max() > 0 and (expected == 0).any()  # the picture check below needs both
    page = parse(tmp_path / "report.html")
    card = page.cards[0]
    assert set(card["rules"]) == {"patch", "image", "cls"}
    thumb = png(card["rules"]["patch"][0])
    centres = thumb[[24, 24, 72, 72], [24, 72, 24, 72]]  # one pixel in each 48-px cell, row-major
    is_red = centres[:, 1] < 250
    assert is_red.tolist() == (expected > 0).tolist()
    assert (centres[~is_red] == 255).all()  # white where the latent does not fire
    assert "Heatmaps alone" in (tmp_path / "report.html").read_text()


@pytest.mark.skipif(not HAS_CHROMIUM, reason="no Chromium installed (CI installs it; see .ci/run)")
def test_report_loads_in_headless_chromium(folders, tmp_path):
    run_eval.evaluate(folders["enc"], tmp_path, n_latents=2, per_latent=2, images=folders["images"],
                      progress=False)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_eval_report_in_browser.py"),
                           str(tmp_path / "report.html")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the same check on a page with an image it cannot decode and an outside link fails
    broken = (tmp_path / "report.html").read_text().replace(
        "</body>", '<img class="exemplar" src="data:image/png;base64,AAAA"><a href="http://x.org/">x</a></body>')
    (tmp_path / "broken.html").write_text(broken)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_eval_report_in_browser.py"),
                           str(tmp_path / "broken.html")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "decoded" in proc.stdout and "outside" in proc.stdout, proc.stdout


def test_dom_check_names_what_is_missing(folders, tmp_path):
    run_eval.evaluate(folders["enc"], tmp_path, n_latents=1, per_latent=1, progress=False)
    text = (tmp_path / "report.html").read_text()
    n = text.count("<img ")  # as a browser that decoded every image would record it
    dom = text.replace("<body>", f'<body data-images-decoded="{n}" data-images-total="{n}">')
    check = load_check_script()
    assert check.dom_problems(dom) == []
    problems = check.dom_problems(dom.replace('<section id="downstream"', "<section").replace('id="scatter"', ""))
    assert any("'downstream'" in p for p in problems) and any("scatter" in p for p in problems)


# ----- downstream and experiments ---------------------------------------------------------
def test_downstream_equals_downstream_metrics(folders, tmp_path):
    backbone = folders["backbone"]
    result = run_eval.evaluate(folders["enc"], tmp_path, backbone=backbone, images=folders["images"], n_latents=1,
                               progress=False)
    expected = downstream_metrics(backbone, "blocks.0", SAE.load(folders["tmp"] / "sae"),
                                  backbone.preprocess(folders["images"]))
    assert result["downstream"] == {"backbone": "toy", "layer": "blocks.0", **expected}
    assert result["downstream"]["n_images"] == N_IMAGES
    assert "kl_recovered_zero" in (tmp_path / "report.html").read_text()
    docs = (ROOT / "docs" / "eval-report.md").read_text()
    fields = [*result, *(f"latents.{k}" for k in result["latents"]), *(f"downstream.{k}" for k in result["downstream"]),
              *(f"latents.shown.{k}" for k in result["latents"]["shown"])]
    undocumented = [f for f in fields if f"`{f}`" not in docs]
    undocumented += [f for f in result["metrics"] if f"`{f}`" not in docs]  # listed in the metrics row
    assert not undocumented, f"docs/eval-report.md does not name {undocumented}"
    # a cap: evenly spaced images, the first and the last among them
    some = run_eval.downstream_sample(N_IMAGES, 3)
    assert len(some) == 3 and some[0] == 0 and some[-1] == N_IMAGES - 1 and (np.diff(some) > 0).all()
    result = run_eval.evaluate(folders["enc"], tmp_path, backbone=backbone, images=folders["images"], n_latents=1,
                               progress=False, downstream_images=3)
    paths = [folders["images"] / f"img{i}.png" for i in some]
    expected = downstream_metrics(backbone, "blocks.0", SAE.load(folders["tmp"] / "sae"), backbone.preprocess(paths))
    assert result["downstream"] == {"backbone": "toy", "layer": "blocks.0", **expected}
    assert result["downstream"]["n_images"] == 3
    other = toy_backbone()
    other.image_size = 6  # not the recorded 8 px
    with pytest.warns(UserWarning, match="recorded at 8 px"):
        run_eval.evaluate(folders["enc"], tmp_path, backbone=other, images=folders["images"], n_latents=0,
                          progress=False, downstream_images=1)


def test_experiments_are_stored_and_tabled(folders, tmp_path, monkeypatch):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return {"probe": {"accuracy": np.float64(0.875)}, "rows": [{"arm": "sae", "flip_rate": 0.5},
                                                                   {"arm": "random", "flip_rate": float("nan")}]}

    monkeypatch.setitem(run_eval.EXPERIMENTS, "segmentation", fake)
    result = run_eval.evaluate(folders["enc"], tmp_path, experiments=["segmentation"], size="full", n_latents=1,
                               progress=False)
    assert calls == [{"size": "full", "seed": 0, "progress": False}]
    assert result["experiments"] == {"segmentation": {"probe": {"accuracy": 0.875}, "rows": [
        {"arm": "sae", "flip_rate": 0.5}, {"arm": "random", "flip_rate": None}]}}
    text = (tmp_path / "report.html").read_text()
    assert 'id="experiment-segmentation"' in text and "0.875" in text and "<th>flip_rate</th>" in text


def test_dict_table_nests():
    out = dict_table({"a": {"b": 1.23456789}, "c": [1, 2], "d": [{"x": 1}, {"x": 2, "y": "z"}]})
    assert out.count("<table") == 3 and "1.235" in out and "[1, 2]" in out and "<th>y</th>" in out


def test_cli_lists_the_experiments_run_eval_knows():
    from saeengine import cli_eval

    assert cli_eval._EXPERIMENTS == tuple(run_eval.EXPERIMENTS)


# ----- the CLI --------------------------------------------------------------------------------
def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_cli_end_to_end(folders, tmp_path):
    code, out, err = run_cli("eval", "--encoded", folders["enc"], "--out", tmp_path / "ev", "--latents", 2,
                             "--images", folders["images"], "--no-progress")
    assert code == 0, err
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["metrics"] == EncodedDataset(folders["enc"]).metrics
    assert len(result["latents"]["shown"]["latents"]) == 2
    assert (tmp_path / "ev" / "report.html").is_file() and "eval.json" in out


def test_cli_default_out_is_beside_the_encoded_folder_which_encode_still_reuses(folders, tmp_path):
    enc = tmp_path / "enc"
    shutil.copytree(folders["enc"], enc)
    code, _, err = run_cli("eval", "--encoded", enc, "--latents", 1, "--no-progress")
    assert code == 0, err
    out = tmp_path / "enc-eval"
    assert (out / "eval.json").is_file() and (out / "report.html").is_file()
    assert sorted(p.name for p in enc.iterdir()) == sorted(p.name for p in folders["enc"].iterdir())
    summary = json.loads((enc / "summary.json").read_text())
    again = encode_store(summary["sae"]["dir"], summary["store"]["dir"], enc, progress=False,
                         batch_tokens=32)  # reused: no error, no work
    assert again.n_tokens == summary["counts"]["tokens"]


def test_cli_help_names_every_top_level_field(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    for field in ("format", "version", "encoded", "metrics", "latents", "downstream", "experiments", "report",
                  "frequency_quantiles", "docs/eval-report.md"):
        assert field in text, field


@pytest.mark.parametrize("argv, code, phrases", [
    (["--encoded", "{tmp}"], 1, ["is not an encode output"]),
    (["--encoded", "{enc}", "--experiments", "classification,bogus"], 2,
     ["'bogus'", "classification, segmentation, model-comparison"]),
    (["--encoded", "{enc}", "--latents", "-1"], 2, ["--latents must be >= 0"]),
    (["--encoded", "{enc}", "--size", "huge"], 2, ["--size"]),
    (["--encoded", "{enc}", "--images", "{tmp}"], 1, ["images"]),
    (["--encoded", "{cls_enc}", "--backbone", "efficientnet-lite0"], 1, ["need the images", "--images"]),
], ids=["not-encoded", "unknown-experiment", "negative-latents", "bad-size", "empty-images", "backbone-no-images"])
def test_cli_bad_input_is_one_line(folders, tmp_path, argv, code, phrases):
    argv = [a.format(tmp=tmp_path, enc=folders["enc"], cls_enc=folders["cls_enc"]) for a in argv]
    got, _, err = run_cli("eval", *argv, "--no-progress")
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith("saeengine eval"), err
    assert all(p in lines[0] for p in phrases), lines[0]
    assert not (tmp_path / "eval.json").exists()


def test_python_api_bad_input(folders, tmp_path):
    with pytest.raises(ConfigError, match="size='medium'"):
        run_eval.evaluate(folders["enc"], tmp_path, size="medium")
    with pytest.raises(ConfigError, match="choose from classification"):
        run_eval.evaluate(folders["enc"], tmp_path, experiments=["probe"])
    with pytest.raises(DataMismatchError, match="3 images given, but the encoded store holds at least 5"):
        run_eval.evaluate(folders["cls_enc"], tmp_path, images=[np.zeros((4, 4), np.uint8)] * 3)
    with pytest.raises(DataMismatchError, match="5 images given, but the encoded store holds 6"):
        run_eval.evaluate(folders["enc"], tmp_path, images=[np.zeros((4, 4), np.uint8)] * 5)
    renamed = tmp_path / "renamed"
    shutil.copytree(folders["images"], renamed)
    (renamed / "img0.png").rename(renamed / "zzz.png")
    with pytest.raises(DataMismatchError, match="image 0 is 'img1.png' but the store recorded 'img0.png'"):
        run_eval.evaluate(folders["enc"], tmp_path, images=renamed)
    with pytest.raises(InputError, match="is not a folder"):
        run_eval.evaluate(tmp_path / "missing", tmp_path)
    encode_store(folders["sae"], folders["store"], tmp_path / "no_sae_dir", progress=False)  # no sae_dir
    with pytest.raises(InputError, match="sae.dir is empty"):
        run_eval.evaluate(tmp_path / "no_sae_dir", tmp_path, backbone=folders["backbone"], images=folders["images"])
    assert not (tmp_path / "eval.json").exists()


def test_known_experiment_gets_its_headline_table():
    from saeengine.eval.report_experiments import summary_html

    digits = {"mean_f1_cross": 0.61, "mean_random_f1": 0.28, "p_value_mean": 0.004, "n_significant_05": 3,
              "mean_f1_select": 0.8, "mean_f1_oracle_b": 0.85, "sae": {"fvu": 0.25}}
    result = {"extractors": {"efficientnet-lite0": digits, "pixel-pca": {**digits, "mean_f1_cross": 0.01}},
              "real_beats_random": True, "real_beats_pca": True, "trivial_f1": 2 / 3}
    out = summary_html("model-comparison", result)
    assert "cross-style F1" in out and "<td>pixel-pca</td>" in out and '<td class="num">0.61</td>' in out
    assert "beats pixel PCA: <b>True</b>" in out
    assert summary_html("model-comparison", {"extractors": 3}) == ""  # fields it does not know: none
    assert summary_html("no-such-experiment", result) == ""


def effect(delta, flip):
    return {"n": 200, "delta_p_true_mean": delta, "delta_p_true_std": 0.1, "p_true_before": 0.9,
            "p_true_after": 0.9 + delta, "flip_rate": flip, "top1_changed": flip}


def test_intervention_experiments_get_their_headline_tables():
    from saeengine.eval.report_experiments import summary_html

    scale = {"chosen": effect(-0.42, 0.61), "random_latent": effect(-0.01, 0.02), "random_vector": effect(-0.05, 0.04),
             "p_value_vs_random_latent": 1e-9, "p_value_vs_random_vector": 2e-7, "beats_random_latent": True,
             "beats_random_vector": True, "random_latent_active": 0.3}
    out = summary_html("classification", {"probe": {"train_accuracy": 0.99, "test_accuracy": 0.95, "n_train": 500,
                                                    "n_test": 200}, "layer": "blocks.4", "scales": {"0.0": scale},
                                          "main_scale": 0.0, "margin": 0.05, "beats_baselines": True})
    assert "(main setting)" in out and "Δp(true) mean" in out and '<td class="num">-0.42</td>' in out
    assert "<td>random_vector</td>" in out and '<td class="num">0.61</td>' in out and "<b>True</b>" in out
    rates = {"target_rate": 0.7, "other_rate": 0.05, "other_digit_rate": 0.02}
    out = summary_html("segmentation", {
        "probe": {"miou_patches": 0.55, "miou_pixels": 0.5, "patch_accuracy": 0.9, "digit_patch_accuracy": 0.6,
                  "n_test_patches": 1000}, "scale": -2.0,
        "pooled": {"auto": {**rates, "target_std": 0.1, "other_std": 0.01, "n_classes": 10}},
        "classes": [{"class": 1, "digit": 0, "latent": 17, "f1": 0.8, "threshold": 0.3, "auto": rates,
                     "random_latent": {**rates, "target_rate": 0.03}, "n_test_images": 40}],
        "auto_beats_baselines": False})
    assert "mIoU (patches)" in out and '<td class="num">0.55</td>' in out and '<td class="num">17</td>' in out
    assert '<td class="num">0.03</td>' in out and "<td>n/a</td>" in out  # no random_vector entry: n/a
    assert "<b>False</b>" in out
    assert summary_html("segmentation", {"probe": {}}) == ""  # a dict of another shape: only the generic table
