"""An SAE for steering: record a prompt corpus at the steered layer (every valid token of
every prompt), train a small TopK SAE on those tokens, and take m_j, each latent's largest
activation over the corpus, for the step alpha * m_j * d_j.

    fit = train_prompt_sae(generator, read_prompts("corpus.txt"), d_sae=256, k=8)
    direction = latent_direction(fit.sae, 7, fit.maxima[7])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..eval._args import count


@dataclass
class PromptSAE:
    """An SAE with its statistics on a corpus's tokens [N, d]: maxima [d_sae] float32 (m_j),
    frequency [d_sae] float64 (share of tokens where z_j > 0), stats {"fvu", "l0", "alive"},
    n_tokens N."""

    sae: object
    maxima: torch.Tensor
    frequency: torch.Tensor
    stats: dict
    n_tokens: int


def read_prompts(path) -> list[str]:
    """A text file, one prompt a line -> the prompts (stripped; empty lines and lines that
    start with "#" skipped); InputError for a missing file or one without prompts."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: pass a text file with one prompt a line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} cannot be read as UTF-8 text ({exc}); pass a text file with one prompt "
                         "a line") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"{path} holds no prompts: write one prompt a line (lines starting with # are skipped)")
    return prompts


def summarize(sae, tokens: torch.Tensor) -> PromptSAE:
    """An SAE's m_j, firing frequency and fit on tokens [N, d] of the steered layer;
    InputError when the SAE reads another width."""
    from ..eval.experiments.common import sae_summary

    if int(sae.cfg.d_in) != tokens.shape[1]:
        raise InputError(f"the SAE reads width {sae.cfg.d_in} but the steered layer has width {tokens.shape[1]}; "
                         "use an SAE trained on this encoder and layer (or --train-on a prompt corpus)")
    maxima, frequency, stats = sae_summary(sae, tokens.to(sae.W_enc.device))
    return PromptSAE(sae, maxima.float().cpu(), frequency.cpu(), stats, int(tokens.shape[0]))


def train_prompt_sae(generator, prompts: list[str], *, d_sae: int | None = None, k: int = 8, epochs: int = 20,
                     seed: int = 0, out_dir: str | Path | None = None) -> PromptSAE:
    """Record ``prompts`` at ``generator``'s steered layer (``layer_tokens``), train a TopK
    SAE (saeengine.eval.experiments.common.train_small_sae: mean-norm normalized, AuxK on,
    ``epochs`` passes) and summarize it on the same tokens.

    d_sae: latents (default 4 x the layer width); out_dir: where the SAE is saved (its
    folder ``out_dir/sae``; a temporary folder by default).
    """
    from ..eval.experiments.common import train_small_sae

    tokens = generator.layer_tokens(prompts)
    d_sae = count("d_sae", d_sae if d_sae is not None else 4 * tokens.shape[1])
    k = count("k", k)
    if k > d_sae:
        raise InputError(f"k={k} is larger than d_sae={d_sae}: pick k <= d_sae")
    if tokens.shape[0] < 2:
        raise InputError(f"the corpus gives {tokens.shape[0]} token(s) at the layer; an SAE needs at least 2 "
                         "(give more prompts)")
    sae = train_small_sae(tokens, d_sae=d_sae, k=k, epochs=count("epochs", epochs), seed=seed, out_dir=out_dir)
    return summarize(sae, tokens)
