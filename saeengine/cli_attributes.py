"""``saeengine attributes``: automated attribute discovery [P]. Steer a diffusion pipeline's
text encoder along SAE latents, describe the seed-paired images, and keep the attributes
that change more than under random directions of the same norm; attributes.json and a
self-contained attributes.html (saeengine.eval.attributes does the work).

    saeengine attributes --pipeline models/sd15 --sae runs/sae-te --latents 3,17 \\
        --prompts prompts.txt --describers stats,label --out attrs
    saeengine attributes --toy --out attrs-toy
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import InputError

_FIELDS = """\
attributes.json (every field: docs/attributes.md):
  format "saeengine-attributes", version 1, report "attributes.html"
  source      --toy: {generator: "toy", width, planted}; else {pipeline, sae, layer, encoder,
              steps, guidance, size, cfg, where: "all", m_j_from: "the prompts' tokens"}
  settings    alpha, n_prompts, prompts, seeds, n_null, null_seed, significance,
              min_consistency, detection_quantile, width, describers
  attributes  {attribute: {kind (linear|circular|categorical|presence), describer}}
  n_images    images generated in all
  latents     ranked: rank, latent, norm (||m_j d_j||), name (top kept attribute, or null),
              kept [attribute names], n_tested, bonferroni_level, attributes [per attribute:
              attribute, describer, kind, n_pairs, mean_change, std_change, paired_d, effect
              ((m - mu0)/s0 against the null), p_value, consistency, detection_threshold,
              beats_null_max, sign, null_spread_zero, kept, null {n, mean, std,
              max_deviation, means}; categorical also gained/lost [{class, id, net}]]
"""


def _latent_list(text: str) -> list[int]:
    try:
        latents = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated latent ids such as 0,5,17") from None
    if not latents:
        raise argparse.ArgumentTypeError(f"{text!r}: name at least one latent id")
    return latents


def add_parser(subparsers) -> None:
    """Add the ``attributes`` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "attributes", help="automated attribute discovery: what steering an SAE latent changes in the images",
        description="For each latent: seed-paired images at alpha = 0 and alpha = +a over the prompts, steered\n"
                    "along m_j d_j at a text-encoder layer (all tokens); describers measure the images (stats:\n"
                    "brightness, saturation, hue, edge density, colourfulness; label: EfficientNet-Lite0's\n"
                    "ImageNet top-1; vlm=PATH: a local vision-language model's captions); an attribute is kept\n"
                    "when its change beats random directions of the same norm. m_j is the latent's largest\n"
                    "activation on the prompts' tokens. --toy runs the built-in toy generator with planted\n"
                    "brightness and hue directions. Writes attributes.json and attributes.html under --out\n"
                    "(each whole, atomically).",
        epilog=_FIELDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the output folder (created)")
    p.add_argument("--toy", action="store_true", help="the toy generator demo (latents 0 = brightness, 1 = hue, "
                                                      "2 and 3 = random controls); needs no pipeline or SAE")
    p.add_argument("--pipeline", type=Path, default=None, help="a local diffusers Stable Diffusion / SDXL folder")
    p.add_argument("--sae", type=Path, default=None, help="an SAE folder (SAE.save) trained on the steered layer")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--latents", type=_latent_list, default=None, help="comma-separated latent ids, e.g. 0,5")
    which.add_argument("--top", type=int, default=None,
                       help="the N latents firing on most of the prompts' tokens (ties: larger m_j)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="a text file, one prompt a line (# comments); --toy: default its 12 built-in prompts")
    p.add_argument("--alpha", type=float, default=4.0, help="steering strength a: h' = h + a m_j d_j (default: 4)")
    p.add_argument("--nulls", type=int, default=8, help="random directions per direction norm (>= 2; default: 8)")
    p.add_argument("--describers", default="stats", help="comma-separated: stats, label, vlm=PATH (default: stats)")
    p.add_argument("--significance", type=float, default=0.05,
                   help="family-wise level per latent, Bonferroni over its attributes (default: 0.05)")
    p.add_argument("--min-consistency", type=float, default=0.5,
                   help="share of pairs a kept attribute must be detected in (default: 0.5)")
    p.add_argument("--layer", type=int, default=-2, help="the text-encoder block steered (default: -2, penultimate)")
    p.add_argument("--encoder", default="text_encoder", help="text_encoder, or text_encoder_2 in SDXL")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--cfg", choices=("cond", "both"), default="cond",
                   help="steer the conditional branch only, or both CFG branches (default: cond)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's; toy: 32)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation call (default: 8)")
    p.add_argument("--examples", type=int, default=4, help="image pairs shown per latent (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i; the nulls use SEED too")
    p.add_argument("--device", default=None, help="torch device of the pipeline and describers (default: CPU)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(_attributes_parser=p)


def _toy(args, parser) -> tuple:
    from .eval.attributes_toy import TOY_LATENTS, TOY_PROMPTS, ToyGenerator, toy_directions

    if args.pipeline is not None or args.sae is not None:
        parser.error("--toy runs the built-in toy generator: leave out --pipeline and --sae")
    if args.top is not None:
        parser.error("--top picks latents by how often they fire on the prompts; the toy has no SAE, use --latents")
    generator = ToyGenerator(size=args.size or 32, seed=args.seed)
    planted = toy_directions(generator, seed=args.seed + 1)
    latents = args.latents if args.latents is not None else sorted(planted)
    for j in latents:
        if j not in planted:
            raise InputError(f"latent {j} is out of range: the toy has latents 0 .. {len(planted) - 1} "
                             "(0 brightness, 1 hue, 2 and 3 random)")
    prompts = _read_prompts(args.prompts) if args.prompts is not None else list(TOY_PROMPTS)
    source = {"generator": "toy", "width": generator.width,
              "planted": {str(j): TOY_LATENTS[j] for j in latents}}
    return generator, {j: planted[j] for j in latents}, prompts, source


def _read_prompts(path: Path) -> list[str]:
    from .steer.train import read_prompts

    return read_prompts(path)


def _pipeline(args, parser) -> tuple:
    import torch

    from .sae import SAE
    from .steer import latent_direction, load_generator
    from .steer.generator import check_latent
    from .steer.train import summarize

    for flag, value in (("--pipeline", args.pipeline), ("--sae", args.sae), ("--prompts", args.prompts)):
        if value is None:
            parser.error(f"{flag} is required (or run the demo with --toy)")
    if args.latents is None and args.top is None:
        parser.error("name the latents: --latents 0,5 or --top N")
    if not args.sae.is_dir():
        raise InputError(f"--sae {args.sae}: no such folder; pass a folder written by SAE.save (or saeengine train)")
    prompts = _read_prompts(args.prompts)
    generator = load_generator(args.pipeline, layer=args.layer, encoder=args.encoder, steps=args.steps,
                               guidance=args.guidance, size=args.size, cfg=args.cfg, where="all",
                               device=args.device, batch_size=args.batch_size, progress=False)
    sae = SAE.load(args.sae)
    fit = summarize(sae, generator.layer_tokens(prompts))  # m_j and firing frequency on the prompts' tokens
    if args.top is not None:
        if args.top < 1:
            parser.error(f"--top must be >= 1, got {args.top}")
        order = sorted(range(sae.cfg.d_sae), key=lambda j: (-float(fit.frequency[j]), -float(fit.maxima[j])))
        latents = [j for j in order if float(fit.maxima[j]) > 0][:args.top]
        if not latents:
            raise InputError("no latent of this SAE fires on the prompts' tokens; check that the SAE was trained "
                             "on this encoder and layer")
    else:
        latents = [check_latent(sae, j) for j in args.latents]
    with torch.no_grad():
        directions = {j: latent_direction(sae, j, float(fit.maxima[j])) for j in latents}
    source = {"pipeline": str(args.pipeline.resolve()), "sae": str(args.sae.resolve()), "layer": args.layer,
              "encoder": args.encoder, "steps": args.steps, "guidance": args.guidance, "size": args.size,
              "cfg": args.cfg, "where": "all", "m_j_from": "the prompts' tokens",
              "m_j": {str(j): float(fit.maxima[j]) for j in latents},
              "frequency": {str(j): float(fit.frequency[j]) for j in latents}}
    return generator, directions, prompts, source


def run(args: argparse.Namespace) -> int:
    """Run ``saeengine attributes``; prints each latent's name and the files written, returns 0."""
    import math

    from .eval.attributes import discover_attributes
    from .eval.attributes_report import write_attributes
    from .eval.describers import build_describers, parse_describers

    parser = args._attributes_parser
    if not math.isfinite(args.alpha):
        raise InputError(f"--alpha {args.alpha} is not finite; pass a finite number such as 4")
    for flag, value, low in (("--nulls", args.nulls, 2), ("--batch-size", args.batch_size, 1),
                             ("--examples", args.examples, 0), ("--steps", args.steps, 1)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    parse_describers(args.describers)  # a bad name fails before any model loads
    generator, directions, prompts, source = _toy(args, parser) if args.toy else _pipeline(args, parser)
    describers = build_describers(args.describers, device=args.device)
    seeds = [args.seed + i for i in range(len(prompts))]
    discovery = discover_attributes(generator, directions, prompts, seeds, args.alpha, describers,
                                    n_null=args.nulls, null_seed=args.seed, significance=args.significance,
                                    min_consistency=args.min_consistency, batch_size=args.batch_size,
                                    n_examples=args.examples, progress=not args.no_progress)
    paths = write_attributes(args.out, discovery, source)
    for row in discovery.result["latents"]:
        kept = ", ".join(row["kept"]) or "nothing beats the null"
        print(f"#{row['rank']} latent {row['latent']}: {row['name'] or '-'} (kept: {kept})")
    print(f"wrote {paths['json']} and {paths['html']}")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    return ("interrupted; attributes.json and attributes.html are written whole at the end, so none was left "
            "half-written")
