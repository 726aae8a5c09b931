"""``saeengine modality``: shared vision-language latents of a LLaVA-style model, per layer
(saeengine.eval.modality_record records, modality_layers measures, modality_synthetic is the
planted demo; definitions in docs/modality.md).

    saeengine modality --model llava-dir --pairs pairs.jsonl --layers 4,8 --out runs/modality
    saeengine modality --synthetic --out runs/modality-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

_FIELDS = """\
modality.json (strict JSON, NaN -> null; every field: docs/modality.md):
  format, version  "saeengine-modality", 1
  source      the model folder, pairs file, layers and prompt template (or "synthetic")
  thresholds  low, high (the shared band of the modality score), min_rate, min_share, seed
  layers      a row per layer: layer, sae (its folder, or how it was made), d_sae, k,
              n_tokens, n_image_tokens, n_text_tokens, n_caption_tokens, n_pairs, fvu, l0,
              live, dead, image, text, shared, rare_mixed (latents per category),
              shared_fraction (shared / live), shared_fraction_of_all (shared / d_sae),
              auroc (matched vs mismatched pairs), matched_mean, mismatched_mean (mean
              Jaccard), image_set_size_mean, caption_set_size_mean; with --synthetic also
              concepts_found {n_concepts, found, threshold, best_cosine}
  latents     {layer: {p_img, p_txt, score, category}}, one entry per latent each
  grounding   {layer: {matched, mismatched (Jaccard per pair), derangement}}
  report      "report.html" beside it: the table, and per layer the modality-score
              histogram, the p_img vs p_txt scatter and the Jaccard histograms
Recording (not --synthetic): OUT/recording/<blocks.i>/ activation stores; trained SAEs
go to OUT/saes/<blocks.i>/sae (reusable as --sae OUT/saes).
"""


def _layers(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated block indices (e.g. 4,8), got {text!r}")
    if not layers:
        raise argparse.ArgumentTypeError("--layers names no layer; give block indices such as 4,8")
    return layers


def add_parser(subparsers) -> None:
    """Add the ``modality`` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "modality", help="shared vision-language latents of a LLaVA-style model: modality.json and report.html",
        description="Record a LLaVA-style model's residual stream at --layers over (image, caption) pairs, train an\n"
                    "SAE per layer (or load --sae), and measure each latent's firing rate on image and on text\n"
                    "tokens, its modality score p_img / (p_img + p_txt), the shared latents and their fraction, and\n"
                    "the AUROC of matched vs mismatched pairs by the overlap of their active latents. --synthetic\n"
                    "runs the planted-direction demo instead (no model). Writes modality.json and report.html\n"
                    "(each whole, atomically) under --out.",
        epilog=_FIELDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a local LLaVA-style model folder (with its processor)")
    p.add_argument("--pairs", type=Path, default=None,
                   help='a .jsonl file, one {"image": path, "caption": text} per line; image paths are relative '
                        "to the file's folder")
    p.add_argument("--layers", type=_layers, default=None,
                   help="comma-separated language-model block indices, e.g. 4,8 (negative: from the end)")
    p.add_argument("--synthetic", action="store_true", help="the planted-direction demo (no --model / --pairs)")
    p.add_argument("--sae", type=Path, default=None,
                   help="SAEs to use: a folder with one SAE folder per layer (named blocks.i or i, the SAE itself "
                        "or its sae/ subfolder), or for one layer the SAE folder itself (default: train one per layer)")
    p.add_argument("--d-sae", type=int, default=None, help="latents of each trained SAE (default: 4 x the width; "
                                                           "--synthetic: 64)")
    p.add_argument("--k", type=int, default=None, help="TopK of each trained SAE (default: 16; --synthetic: 2)")
    p.add_argument("--epochs", type=int, default=20, help="training passes over the tokens (default: 20)")
    p.add_argument("--template", default="<image>\n{caption}",
                   help="the prompt, with <image> and {caption} (default: '<image>\\n{caption}')")
    p.add_argument("--low", type=float, default=0.1, help="shared band's low end of the modality score (0.1)")
    p.add_argument("--high", type=float, default=0.9, help="shared band's high end (0.9)")
    p.add_argument("--min-rate", type=float, default=1e-4, help="a shared latent fires at least this often on each "
                                                                "kind (1e-4)")
    p.add_argument("--min-share", type=float, default=0.0,
                   help="a latent is in a pair's active set when it fires on at least this share of the pair's "
                        "image (caption) tokens; 0: on any one (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the SAE training, the derangement and the demo")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default: 8)")
    p.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    p.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the model's weights' dtype (default: float32)")
    p.add_argument("--out", type=Path, required=True, help="the output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue (or reuse, when complete) the recording in OUT/recording of a run with the same "
                        "model, pairs, layers and batch size")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _check(args) -> None:
    from .cli_failures import UsageError

    if args.synthetic:
        extra = [flag for flag, value in (("--model", args.model), ("--pairs", args.pairs), ("--layers", args.layers),
                                          ("--sae", args.sae)) if value is not None]
        if extra:
            raise UsageError(f"--synthetic makes its own data: drop {', '.join(extra)}")
    else:
        missing = [flag for flag, value in (("--model", args.model), ("--pairs", args.pairs),
                                            ("--layers", args.layers)) if value is None]
        if missing:
            raise UsageError(f"give {', '.join(missing)} (or --synthetic for the demo)")
    for flag, value, low in (("--d-sae", args.d_sae, 1), ("--k", args.k, 1), ("--epochs", args.epochs, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")


def sae_for(folder: Path, layer: str, n_layers: int):
    """The SAE of ``layer`` ("blocks.i") under an --sae folder (see --sae's help)."""
    from .errors import InputError
    from .sae import SAE

    index = layer.split(".")[1]
    for name in (layer, index):
        for candidate in (folder / name, folder / name / "sae"):
            if (candidate / "sae.safetensors").is_file():
                return SAE.load(candidate), str(candidate)
    if n_layers == 1 and (folder / "sae.safetensors").is_file():
        return SAE.load(folder), str(folder)
    raise InputError(f"--sae {folder} holds no SAE for {layer}: put it in {folder / layer} (or {folder / index}), "
                     "or leave --sae out to train one")


def run(args: argparse.Namespace) -> int:
    """Run ``saeengine modality``; prints a line per layer and the files written."""
    from .eval.modality_layers import analyze
    from .eval.modality_record import examples_from_pairs, load_llava, read_pairs, record_pairs
    from .eval.modality_synthetic import synthetic_demo
    from .eval.modality_report import write_outputs
    from .errors import InputError

    _check(args)
    progress = not args.no_progress
    thresholds = dict(low=args.low, high=args.high, min_rate=args.min_rate, min_share=args.min_share)
    if args.synthetic:
        result = synthetic_demo(seed=args.seed, d_sae=args.d_sae or 64, k=args.k or 2, epochs=args.epochs,
                                progress=progress, **thresholds)
        source = {"name": "synthetic", "kind": "planted shared directions vs disjoint control (synthetic_pairs)",
                  "seed": args.seed}
    else:
        pairs = read_pairs(args.pairs)
        model, processor = load_llava(args.model, device=args.device, dtype=args.model_dtype, progress=progress)
        if processor is None:
            raise InputError(f"{args.model} holds no processor (preprocessor_config.json / processor_config.json): "
                             "save the model's processor into the folder (processor.save_pretrained), or build the "
                             "inputs in Python with saeengine.eval.modality_record.examples_from_ids")
        examples = examples_from_pairs(processor, pairs, args.template)
        data = record_pairs(model, examples, args.layers, args.out / "recording", batch_size=args.batch_size,
                            progress=progress, resume=args.resume)
        saes = {}
        if args.sae is not None:
            saes = {layer: sae_for(args.sae, layer, len(data.layers)) for layer in data.layers}
        result = analyze(data, saes={layer: sae for layer, (sae, _) in saes.items()}, d_sae=args.d_sae,
                         k=args.k or 16, epochs=args.epochs, seed=args.seed, sae_dir=args.out / "saes",
                         progress=progress, **thresholds)
        for row in result["layers"]:
            if row["layer"] in saes:
                row["sae"] = saes[row["layer"]][1]
        source = {"name": args.model.name, "model": str(args.model.resolve()), "pairs": str(args.pairs.resolve()),
                  "n_pairs": len(pairs), "layers": list(data.layers), "template": args.template}
    paths = write_outputs(result, args.out, source)
    for row in result["layers"]:
        auroc = row["auroc"]
        print(f"{row['layer']}: {row['shared']} shared of {row['live']} live latents (fraction "
              f"{row['shared_fraction']:.3g}), matched-vs-mismatched AUROC {auroc:.3g}")
    print(f"wrote {paths['json']} and {paths['report']}")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    return ("interrupted; modality.json and report.html are written whole at the end, so none was left "
            "half-written (a partial recording stays in OUT/recording)")
