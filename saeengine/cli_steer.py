"""``saeengine steer``: steer a local Stable Diffusion / SDXL pipeline through its text
encoder with SAE latents, sweep alpha and write an image grid per latent, sweep.json and
report.html (saeengine.steer does the work; docs/steer.md).

    saeengine steer --pipeline pipelines/sd15 --train-on corpus.txt --prompts prompts.txt --out runs/steer
    saeengine steer --pipeline pipelines/sd15 --sae runs/sae --latents 3,7 --prompts prompts.txt --out runs/steer
"""

from __future__ import annotations

import argparse
from pathlib import Path

_FIELDS = """\
output files under --out (docs/steer.md lists every field):
  latent_<j>.png  the sweep of latent j: one row per prompt, one column per alpha (alpha = 0
                  framed), every image seed-paired with the alpha = 0 image of its row
  sweep.json      format "saeengine-steer", version 1; settings (pipeline kind, encoder, layer,
                  where, cfg, steps, guidance, size, negative_prompt, width, classifier, clip);
                  prompts, seeds, alphas; latents: [{latent, max_activation (m_j),
                  direction_norm (= m_j x the SAE's norm_scale), attribute, grid, sweep: [{alpha,
                  pixel_mae, pixel_rmse, top1_change, kl, clip_prompt, clip_prompt_delta,
                  clip_attribute, clip_attribute_delta, per_prompt {metric: [P]}}]}];
                  sae {path, source: "trained" | "given", d_sae, k, fvu, l0, alive};
                  corpus {path, n_prompts, n_tokens}
  report.html     the grids, the metrics against alpha and their tables, self-contained
  train/sae/      with --train-on: the trained SAE (SAE.load reads it)
"""


def _numbers(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one value (comma-separated)")
        return values
    return parse


def add_parser(subparsers) -> None:
    """Add the ``steer`` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "steer", help="steer a diffusion pipeline through its text encoder with SAE latents (alpha sweep)",
        description="Add alpha * m_j * d_j (latent j's decoder direction scaled by its largest activation on a\n"
                    "prompt corpus) to one block of a local Stable Diffusion / SDXL pipeline's text encoder, the\n"
                    "rest of the encoder continuing from the edited value, for a sweep of alphas over a set of\n"
                    "prompts; measure each image against the alpha = 0 image of its prompt and seed (pixel\n"
                    "distance, EfficientNet-Lite0 class shift, CLIP scores with --clip), and write the grids,\n"
                    "sweep.json and report.html under --out. Nothing is downloaded.",
        epilog=_FIELDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, type=Path, help="a local diffusers pipeline folder (save_pretrained)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--sae", type=Path, help="an SAE folder (SAE.save) trained on --encoder's block --layer")
    source.add_argument("--train-on", type=Path, help="a prompt corpus (one prompt a line): record it at the layer "
                                                      "and train an SAE on its tokens (saved under OUT/train/sae)")
    p.add_argument("--prompts", required=True, type=Path, help="the prompts to steer, one a line")
    p.add_argument("--out", required=True, type=Path, help="where the grids, sweep.json and report.html go")
    p.add_argument("--corpus", type=Path, default=None,
                   help="with --sae: the corpus for m_j, each latent's max activation (default: --prompts)")
    p.add_argument("--latents", type=_numbers(int), default=None,
                   help="comma-separated latent ids (default: the --top most frequent on the corpus)")
    p.add_argument("--top", type=int, default=4, help="latents swept when --latents is not given (default: 4)")
    p.add_argument("--alphas", type=_numbers(float), default=[-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0],
                   help="comma-separated alphas; 0 is always added (default: -8,-4,-2,0,2,4,8)")
    p.add_argument("--layer", type=int, default=-2, help="the steered block (-2: the penultimate, default)")
    p.add_argument("--encoder", choices=("text_encoder", "text_encoder_2"), default="text_encoder",
                   help="the steered encoder (SDXL has two; default: text_encoder)")
    p.add_argument("--where", choices=("all", "valid", "active"), default="all",
                   help="the edited positions: all (every position, padding included; default), valid (the "
                        "prompt's tokens) or active (where the latent fires)")
    p.add_argument("--cfg", choices=("cond", "both", "opposite"), default="cond",
                   help="the steered CFG branches: cond (default), both (+alpha on the unconditional too) or "
                        "opposite (-alpha on the unconditional)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default: 7.5)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed SEED + i (default: 0)")
    p.add_argument("--negative-prompt", default=None, help="the unconditional prompt (default: the pipeline's)")
    p.add_argument("--clip", type=Path, default=None, help="a local CLIPModel folder: CLIP scores to the prompt "
                                                           "and to --attribute")
    p.add_argument("--attribute", default=None, help="the attribute text the CLIP score is measured against")
    p.add_argument("--d-sae", type=int, default=None, help="with --train-on: latents (default: 4 x the width)")
    p.add_argument("--k", type=int, default=8, help="with --train-on: active latents per token (default: 8)")
    p.add_argument("--epochs", type=int, default=20, help="with --train-on: passes over the tokens (default: 20)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default: 8)")
    p.add_argument("--device", default=None, help="torch device for the pipeline and the SAE (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(_steer_parser=p)


def _latents(args, fit) -> list[int]:
    import torch

    from .errors import InputError
    from .steer import check_latent

    if args.latents is not None:
        latents = [check_latent(fit.sae, j) for j in args.latents]
    else:
        live = torch.nonzero(fit.frequency > 0).flatten()
        order = live[torch.argsort(fit.frequency[live], descending=True, stable=True)]
        latents = [int(j) for j in order[:max(args.top, 1)]]
    dead = [j for j in latents if not float(fit.maxima[j]) > 0]
    if dead:
        raise InputError(f"latent(s) {', '.join(map(str, dead))} never fire on the corpus ({fit.n_tokens} tokens; "
                         "m_j = 0): steering along them adds nothing; pick latents that fire, or a larger corpus")
    if not latents:
        raise InputError("no latent fires on the corpus: train on more prompts or pass --latents")
    return list(dict.fromkeys(latents))


def run(args: argparse.Namespace) -> int:
    """Run ``saeengine steer``; prints the files written, returns 0."""
    from . import SAE
    from .errors import InputError
    from .steer import latent_direction, load_generator
    from .steer.sweep import alpha_sweep, sweep_alphas, write_sweep
    from .steer.train import read_prompts, summarize, train_prompt_sae

    for flag, value, low in (("--steps", args.steps, 1), ("--top", args.top, 1), ("--k", args.k, 1),
                             ("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            args._steer_parser.error(f"{flag} must be >= {low}, got {value}")
    sweep_alphas(args.alphas)  # a NaN or inf alpha fails here, before anything loads
    prompts = read_prompts(args.prompts)
    sae = None
    if args.sae is not None:
        try:
            sae = SAE.load(args.sae, device=args.device or "cpu").eval()
        except FileNotFoundError as exc:
            raise InputError(f"--sae {args.sae}: {exc}") from None
    generator = load_generator(args.pipeline, layer=args.layer, encoder=args.encoder, steps=args.steps,
                               guidance=args.guidance, size=args.size, cfg=args.cfg, where=args.where,
                               device=args.device, sae=sae, negative_prompt=args.negative_prompt,
                               batch_size=args.batch_size)
    if sae is None:
        corpus_path = args.train_on
        corpus = read_prompts(corpus_path)
        fit = train_prompt_sae(generator, corpus, d_sae=args.d_sae, k=args.k, epochs=args.epochs, seed=args.seed,
                               out_dir=args.out / "train")
        sae_info = {"path": args.out / "train" / "sae", "source": "trained"}
        generator = generator.with_latent(None, fit.sae)  # where="active" reads this SAE's latents
    else:
        corpus_path = args.corpus or args.prompts
        corpus = read_prompts(corpus_path)
        fit = summarize(sae, generator.layer_tokens(corpus))
        sae_info = {"path": args.sae, "source": "given"}
    latents = _latents(args, fit)
    directions = {j: latent_direction(fit.sae, j, float(fit.maxima[j])) for j in latents}
    result = alpha_sweep(generator, directions, prompts, alphas=args.alphas, seed=args.seed, clip=args.clip,
                         attributes=args.attribute, max_activations={j: float(fit.maxima[j]) for j in latents},
                         progress=not args.no_progress)
    extra = {"pipeline": args.pipeline.resolve(),
             "sae": {**sae_info, "d_sae": fit.sae.cfg.d_sae, "k": fit.sae.cfg.k, **fit.stats},
             "corpus": {"path": corpus_path, "n_prompts": len(corpus), "n_tokens": fit.n_tokens}}
    paths = write_sweep(result, args.out, extra=extra)
    for j in latents:
        last = result.metrics[j][-1]
        print(f"latent {j}: m_j {float(fit.maxima[j]):.4g}; at alpha {last['alpha']:+g} pixel_mae "
              f"{last['pixel_mae']:.4g}, top1_change {last.get('top1_change', float('nan')):.3g}")
    print(f"wrote {paths['json']}, {paths['report']} and {len(latents)} grid(s) under {args.out}")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    return (f"interrupted; the grids, sweep.json and report.html are written whole at the end, so none was left "
            f"half-written under {args.out}")
