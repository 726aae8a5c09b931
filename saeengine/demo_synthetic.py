"""``saeengine demo-synthetic``: train a TopK SAE on a planted sparse dictionary and report
how well it recovered the atoms, against the recovery of the decoder it started from. Runs
on CPU in well under a minute."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import field_checks as checks
from .backends import available_backends
from .synthetic import dictionary_recovery, planted_dictionary
from .trainer import TrainConfig, initial_sae, train
from .trainer.config import CHECKS as TRAIN_CHECKS


@dataclass(frozen=True)
class SyntheticDemoConfig:
    """Settings of ``saeengine demo-synthetic``."""

    d_in: int = 64
    """Width of the synthetic activations."""
    n_atoms: int = 256
    """Planted dictionary size."""
    active_per_token: int = 4
    """Atoms mixed into each token."""
    d_sae: int = 512
    """SAE latents (2x the planted dictionary)."""
    k: int = 4
    """TopK k."""
    tokens: int = 200_000
    """Synthetic tokens generated."""
    steps: int = 1500
    """Training steps."""
    batch_size: int = 512
    """Tokens per step."""
    lr: float = 2e-3
    """Adam learning rate; 0 means 2e-4 / sqrt(d_sae / 2^14)."""
    seed: int = 0
    """Seed of the data and the SAE initialization (drawn from independent streams: the SAE
    does not start at the atoms)."""
    device: str = "auto"
    """"auto" (cuda if present), "cpu" or "cuda"."""
    backend: str = "auto"
    """Op backend: auto, torch, triton or cuda."""
    out: str = "runs/demo-synthetic"
    """Where the trained SAE checkpoint is written."""

    def __post_init__(self) -> None:
        checks.check_fields(self, _CHECKS, _RULES)


HELD_OUT_MAX = 8192  # tokens held out of training for the reported FVU: min(this, tokens // 5)


def held_out_tokens(tokens: int) -> int:
    """Tokens of ``tokens`` that training never samples (the last ones): the reported FVU's."""
    return min(HELD_OUT_MAX, tokens // 5)


_CHECKS = {
    "d_in": checks.integer(1),
    "n_atoms": checks.integer(1),
    "active_per_token": checks.integer(1),
    "d_sae": checks.integer(1),
    "k": checks.integer(1),
    "tokens": checks.integer(10, why="a fifth of them, at least 2, is held out for the FVU"),
    "steps": checks.integer(1),
    "batch_size": TRAIN_CHECKS["batch_size"],  # the trainer's checks (batch_size, lr, seed): handed on to it
    "lr": TRAIN_CHECKS["lr"],
    "seed": TRAIN_CHECKS["seed"],
    "device": checks.device,
    "backend": checks.backend,
    "out": checks.folder,
}
checks.require_every_field(SyntheticDemoConfig, _CHECKS)
_RULES = (
    checks.at_most("active_per_token", "n_atoms"),
    checks.at_most("k", "d_sae"),
    checks.Rule("tokens", lambda cfg: cfg.tokens - held_out_tokens(cfg.tokens) >= cfg.batch_size,
                lambda cfg: f"an int that leaves at least batch_size={cfg.batch_size} training tokens after the "
                            f"min({HELD_OUT_MAX}, tokens // 5) held out for the FVU (it leaves "
                            f"{cfg.tokens - held_out_tokens(cfg.tokens)})"),
)


def run_synthetic_demo(cfg: SyntheticDemoConfig, progress: bool = True) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    data = planted_dictionary(cfg.tokens, cfg.d_in, cfg.n_atoms, cfg.active_per_token, seed=cfg.seed)
    n_held = held_out_tokens(cfg.tokens)  # never sampled for training: the reported FVU is held out
    held_out, train_rows = data.activations[-n_held:], data.activations[:-n_held]
    train_cfg = TrainConfig(d_sae=cfg.d_sae, k=cfg.k, total_tokens=cfg.steps * cfg.batch_size,
                            batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=20, normalization="none",
                            b_dec_init="mean", dead_after_tokens=50 * cfg.batch_size, seed=cfg.seed,
                            device=str(device), backend=cfg.backend, out_dir=cfg.out, name="demo",
                            resume=False, progress=progress)
    at_init = dictionary_recovery(data.atoms, initial_sae(train_cfg, cfg.d_in).W_dec)  # where training starts
    start = time.perf_counter()
    sae = train(train_rows, train_cfg)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out = sae(held_out.to(device), backend=cfg.backend)
    metrics = Path(cfg.out) / "demo" / "metrics.jsonl"
    last = json.loads(metrics.read_text().splitlines()[-1])
    return {
        "device": str(device),
        "backends": {op: available_backends(op, device) for op in ("topk_encode", "sparse_decode")},
        "train_seconds": round(seconds, 2),
        "fvu": float(out.fvu),
        "l0": float(out.l0),
        "dead_fraction": last["dead"],
        "recovery_mean_max_cos": dictionary_recovery(data.atoms, sae.W_dec),
        "recovery_at_init": at_init,
        "checkpoint": str(Path(cfg.out) / "demo"),
        "metrics": str(metrics),
    }
