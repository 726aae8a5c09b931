"""The README's main job and the install layout."""

import subprocess
import sys

import torch

from saeengine import SAE
from saeengine.demo import DemoConfig, run_demo
from saeengine.synthetic import dictionary_recovery, planted_dictionary


def test_demo_recovers_planted_dictionary(tmp_path):
    report = run_demo(DemoConfig(tokens=60_000, steps=800, device="cpu", out=str(tmp_path / "demo")), progress=False)
    assert report["recovery_mean_max_cos"] >= 0.9
    assert report["fvu"] < 0.2 and abs(report["l0"] - 4) < 1e-6
    assert SAE.load(report["checkpoint"]).cfg.d_sae == 512


def test_recovery_metric_can_fail():
    data = planted_dictionary(1000, 32, 64, 3, seed=1)
    random_decoder = torch.randn(128, 32)
    assert dictionary_recovery(data.atoms, random_decoder) < 0.7
    assert dictionary_recovery(data.atoms, data.atoms) > 0.999


def test_cli_help_lists_demo_options():
    out = subprocess.run([sys.executable, "-m", "saeengine.cli", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--d-sae" in out.stdout and "SAE latents" in out.stdout


def test_kernels_install_as_subpackage_only(tmp_path):
    """Run from a folder outside the repo: the install maps kernels/ to saeengine.kernels
    and installs no top-level package named kernels."""
    code = ("import importlib.util, saeengine.kernels, saeengine.kernels.topk_encode as t; "
            "print(importlib.util.find_spec('kernels') is None, t.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "saeengine.kernels.topk_encode"]
