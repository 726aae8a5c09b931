"""A compact training loop for an in-memory activation matrix.

Adam, decoder unit norm with parallel-gradient removal, dead-latent tracking on the
device (tokens since each latent last fired) feeding AuxK, b_dec initialized to the data
mean, input normalization fitted from the data. The full trainer (activation stores,
sweeps, resumable checkpoints, row-sparse optimizer) builds on this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .sae import SAE


def default_lr(d_sae: int) -> float:
    """2e-4 / sqrt(F / 2^14) (Gao et al. 2024)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


@dataclass
class TrainResult:
    sae: SAE
    history: list[dict]      # one dict of metrics per logged step
    dead_fraction: float     # latents that did not fire within dead_after_tokens at the end


def train_in_memory(sae: SAE, data: torch.Tensor, *, steps: int, batch_size: int = 1024,
                    lr: float | None = None, dead_after_tokens: int = 200_000, auxk: bool = True,
                    seed: int = 0, backend: str = "auto", log_every: int = 50,
                    progress: bool = True) -> TrainResult:
    """Train ``sae`` on rows of ``data`` [M, d_in] sampled uniformly with replacement."""
    if data.dim() != 2 or data.shape[1] != sae.cfg.d_in:
        raise ValueError(f"data must be [M, d_in={sae.cfg.d_in}], got {tuple(data.shape)}")
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2 (FVU needs two rows); got {steps}, {batch_size}")
    device = sae.W_enc.device
    data = data.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sample = data[torch.randint(len(data), (min(len(data), 65536),), generator=gen).to(device)]
    sae.fit_normalization(sample)
    with torch.no_grad():
        sae.b_dec.copy_(sae.normalize(sample.float()).mean(0).to(sae.b_dec.dtype))
    opt = torch.optim.Adam(sae.parameters(), lr=lr or default_lr(sae.cfg.d_sae), betas=(0.9, 0.999))
    tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=device)
    history: list[dict] = []
    sae.train()
    bar = tqdm(range(steps), disable=not progress, desc="train", unit="step")
    for step in bar:
        rows = torch.randint(len(data), (batch_size,), generator=gen).to(device)
        x = data[rows]
        dead = tokens_since_fired >= dead_after_tokens if auxk else None
        out = sae(x, dead_mask=dead, backend=backend, check=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            # Fire counts from the code, on the device (integer adds: no host sync, exact).
            fires = torch.zeros_like(tokens_since_fired).scatter_add_(
                0, out.code.indices.reshape(-1), (out.code.values > 0).reshape(-1).long())
            tokens_since_fired = torch.where(fires > 0, 0, tokens_since_fired + batch_size)
        if step % log_every == 0 or step == steps - 1:
            metrics = {"step": step, "fvu": float(out.fvu.detach()), "auxk": float(out.auxk_loss.detach()), "l0": float(out.l0),
                       "dead": float((tokens_since_fired >= dead_after_tokens).float().mean())}
            history.append(metrics)
            bar.set_postfix(fvu=f"{metrics['fvu']:.4f}", l0=f"{metrics['l0']:.1f}", dead=f"{metrics['dead']:.1%}")
    sae.eval()
    dead_fraction = float((tokens_since_fired >= dead_after_tokens).float().mean())
    return TrainResult(sae, history, dead_fraction)
