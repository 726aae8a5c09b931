"""Faults in recording (issue 14, class 8): a recording SIGKILLed at random points (once,
or again while resuming), then resumed, ends with the stores of an uninterrupted recording (same content hashes);
and recording memory stays flat as the number of images grows."""

from __future__ import annotations

import importlib.util
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
from kill_child import kill_after_lines
from PIL import Image

from saeengine.backbones import record_activations
from saeengine.store import ActivationStore, StoreMetadata

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "record_memory.py"
_SPEC = importlib.util.spec_from_file_location("record_memory", BENCH)
record_memory = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(record_memory)

LAYERS = ["blocks.0", "blocks.2"]  # 64 and 16 tokens per image: they commit at different batches
SETTINGS = dict(batch_size=3, shard_tokens=200)
N_IMAGES = 30
N_BATCHES = -(-N_IMAGES // SETTINGS["batch_size"])

CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {bench!r})
    from record_memory import tiny_backbone
    from saeengine.backbones import record_activations

    backbone = tiny_backbone()
    forward = backbone.forward
    def announced(pixels):  # tells the parent where the recording is, and slows it to kill-able speed
        print("batch", flush=True)
        time.sleep(0.01)
        return forward(pixels)
    backbone.forward = announced
    record_activations(backbone, {images!r}, {layers!r}, {out!r}, progress=False, resume=True, **{settings!r})
    print("done", flush=True)
""")


def write_images(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        sub = folder / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return folder


def hashes(out: Path) -> dict[str, str]:
    return {layer: ActivationStore(out / layer).content_hash for layer in LAYERS}


def kill_during_recording(images: Path, out: Path, after_batches: int, extra_s: float) -> bool:
    """Run a recording in a subprocess and SIGKILL it after it announced ``after_batches``
    forward passes (plus ``extra_s``). Returns whether it was killed before finishing."""
    script = CHILD.format(bench=str(BENCH.parent), images=str(images), layers=LAYERS, out=str(out),
                          settings=SETTINGS)
    return kill_after_lines(script, after_batches, extra_s)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed,kills", [(0, 2), (1, 1), (2, 1)])
def test_sigkill_then_resume_gives_the_uninterrupted_stores(tmp_path, seed, kills):
    """Killed once, or killed and then killed again while resuming; the last resume runs here."""
    rng = random.Random(seed)
    images = write_images(tmp_path / "imgs")
    record_activations(record_memory.tiny_backbone(), images, LAYERS, tmp_path / "clean", progress=False, **SETTINGS)
    expected = hashes(tmp_path / "clean")
    out = tmp_path / "killed"
    first = rng.randrange(1, N_BATCHES - 2)
    killed = kill_during_recording(images, out, first, rng.uniform(0, 0.012))
    assert killed, "the first kill came after the recording finished: the test did not test resuming"
    assert not all((out / layer / "meta.json").exists() and StoreMetadata.read(out / layer).complete
                   for layer in LAYERS)
    if kills == 2:  # the resumed run is killed at a point of its own (unless it finishes first)
        kill_during_recording(images, out, rng.randrange(1, N_BATCHES - first + 1), rng.uniform(0, 0.012))
    record_activations(record_memory.tiny_backbone(), images, LAYERS, out, progress=False, resume=True, **SETTINGS)
    assert hashes(out) == expected
    s = ActivationStore(out / "blocks.2")
    assert s.image_paths == ActivationStore(tmp_path / "clean" / "blocks.2").image_paths and s.n_images == N_IMAGES


@pytest.mark.timeout(240)
def test_recording_memory_is_flat_in_the_number_of_images(tmp_path):
    """10x the images, peak RSS within 20%. The images (1600x1200 JPEGs) are big enough
    that holding the 40 of the large run decoded (230 MB, against about 550 MB for the
    process) would break the bound."""
    result = record_memory.run(images=4, factor=10, side=1600, batch=4, workdir=tmp_path, unique=2)
    assert result["peak_rss_mib_factorN"] > 100  # a real process was measured (torch alone is more)
    assert result["ratio"] <= 1.2, result
