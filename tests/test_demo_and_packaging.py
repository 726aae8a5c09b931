"""The README's main job (the vision demo and its report), the synthetic demo, and the
install layout."""

import html.parser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.demo import DemoConfig, run_demo
from saeengine.demo_synthetic import SyntheticDemoConfig, run_synthetic_demo
from saeengine.synthetic import dictionary_recovery, planted_dictionary

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(mnist_images=300, d_sae=256, total_tokens=60_000, latents_shown=4, images_per_latent=3,
                     device="cpu", out=str(out))
    return run_demo(cfg, progress=False), out


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.images, self.problems = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in ("meta", "br", "polyline"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("polyline",):
            return
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(f"unbalanced </{tag}>")


def test_vision_demo_trains_and_writes_a_self_contained_report(small_demo):
    report, out = small_demo
    photo_tokens = report["tokens"] - 300 * 3 * 3  # digits at 48 px: a 3x3 map at stride 16
    assert photo_tokens > 0 and photo_tokens % 64 == 0  # photos at 128 px: 8x8 each
    assert report["fvu"] < 0.5 and abs(report["l0"] - 8) < 1e-6
    assert SAE.load(report["checkpoint"]).cfg.d_sae == 256
    page = Path(report["report"]).read_text()
    parser = _Tags()
    parser.feed(page)
    assert not parser.problems and not parser.stack
    assert page.count('<section class="latent">') == 4
    assert len(parser.images) >= 4 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert page.count("<svg") == 2 and "fvu" in page


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")),
                    reason="no Chromium installed; scripts/check_report_in_browser.py checks the report where one is")
def test_report_opens_in_headless_chromium(small_demo, tmp_path):
    report, _ = small_demo
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report_in_browser.py"), report["report"],
                           "--screenshot", str(tmp_path / "shot.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_synthetic_demo_recovers_planted_dictionary(tmp_path):
    report = run_synthetic_demo(SyntheticDemoConfig(tokens=60_000, steps=800, device="cpu",
                                                    out=str(tmp_path / "demo")), progress=False)
    assert report["recovery_at_init"] < 0.5, report  # the SAE starts far from the atoms (measured 0.37)
    assert report["recovery_mean_max_cos"] >= 0.9
    assert report["fvu"] < 0.2 and abs(report["l0"] - 4) < 1e-6
    assert SAE.load(report["checkpoint"]).cfg.d_sae == 512


def test_recovery_metric_can_fail():
    data = planted_dictionary(1000, 32, 64, 3, seed=1)
    random_decoder = torch.randn(128, 32)
    assert dictionary_recovery(data.atoms, random_decoder) < 0.7
    assert dictionary_recovery(data.atoms, data.atoms) > 0.999


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_planted_atoms_are_drawn_apart_from_the_sae_init(seed):
    """The data's stream is not SAE(seed=...)'s: with one stream, the initial decoder's
    first rows were the atoms and recovery was 1.0 before training. No atom is close to
    any initial decoder row, for the data's seed or another."""
    data = planted_dictionary(100, 32, 128, 3, seed=seed)
    for sae_seed in (seed, seed + 1):
        w_dec = SAE(SAEConfig(d_in=32, d_sae=256, k=3), seed=sae_seed).W_dec.detach()
        cos = torch.nn.functional.normalize(w_dec, dim=1) @ data.atoms.T
        assert float(cos.abs().max()) < 0.95, (seed, sae_seed)
        assert dictionary_recovery(data.atoms, w_dec) < 0.6
    assert torch.equal(planted_dictionary(100, 32, 128, 3, seed=seed).activations, data.activations)  # seeded
    assert not torch.equal(planted_dictionary(100, 32, 128, 3, seed=seed + 1).atoms, data.atoms)


def test_cli_help_lists_demo_options():
    out = subprocess.run([sys.executable, "-m", "saeengine.cli", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--mnist-images" in out.stdout and "MNIST digits recorded" in out.stdout
    out = subprocess.run([sys.executable, "-m", "saeengine.cli", "demo-synthetic", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "Planted dictionary size" in out.stdout


def test_kernels_install_as_subpackage_only(tmp_path):
    """Run from a folder outside the repo: the install maps kernels/ to saeengine.kernels
    and installs no top-level package named kernels."""
    code = ("import importlib.util, saeengine.kernels, saeengine.kernels.topk_encode as t; "
            "print(importlib.util.find_spec('kernels') is None, t.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "saeengine.kernels.topk_encode"]
