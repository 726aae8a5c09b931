"""``saeengine eval``: evaluate an encode output folder into eval.json and a self-contained
report.html (saeengine.eval.run_eval.evaluate does the work).

    saeengine eval --encoded runs/enc --experiments classification,segmentation
    saeengine eval --encoded runs/enc --backbone efficientnet-lite0 --images photos/
"""

from __future__ import annotations

import argparse
from pathlib import Path

_EXPERIMENTS = ("classification", "segmentation", "model-comparison")  # = run_eval.EXPERIMENTS (tested)

_FIELDS = """\
eval.json (every field with its meaning and source: docs/eval-report.md):
  format       "saeengine-eval"          version      1
  encoded      the --encoded folder (absolute)
  metrics      the encode pass's reconstruction metrics, as in its summary.json (n_tokens,
               mse, nmse, fvu, explained_variance, l0, l1, cosine, l2_ratio,
               relative_reconstruction_bias); null where undefined
  latents      from the per-latent statistics: d_sae, n_tokens, alive, dead, dense (frequency
               > 1e-2), dead_fraction, dense_fraction, frequency_quantiles {q: value} (numpy
               linear quantiles over all latents), shown {rule: band|most_frequent, latents}
  downstream   null; with --backbone, the SAE spliced into it at the store's layer:
               backbone, layer, n_images, kl_sae, kl_zero, kl_mean (KL of the head's class
               distribution, clean vs SAE / zero- / mean-ablation), kl_recovered_zero,
               kl_recovered_mean, top1_agreement_sae, _zero, _mean
  experiments  {name: the experiment's result dict} for each of --experiments
  report       "report.html", beside eval.json: the metric table with definitions, the log10
               frequency vs mean value scatter, the frequency histogram, exemplar grids with
               heatmaps and an activation histogram per shown latent, and the tables above
"""


def _experiment_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in _EXPERIMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown experiment {', '.join(map(repr, unknown))}; choose from "
                                         f"{', '.join(_EXPERIMENTS)} (comma-separated)")
    return names


def add_eval_parser(subparsers) -> None:
    """Add the ``eval`` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval", help="evaluate an encode output: eval.json and a self-contained HTML report",
        description="Evaluate an encode output folder (saeengine encode): summarize its metrics and latent\n"
                    "statistics, render the exemplars of a set of latents with their heatmaps, optionally splice\n"
                    "the SAE into its backbone for downstream metrics and run the offline experiments, and write\n"
                    "eval.json and report.html (each written whole, atomically) under --out.",
        epilog=_FIELDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoded", required=True, type=Path, help="an encode output folder (holds summary.json)")
    p.add_argument("--out", type=Path, default=None, help="where eval.json and report.html go (default: "
                                                          "ENCODED-eval, beside the encode folder)")
    p.add_argument("--experiments", type=_experiment_names, default=[],
                   help=f"comma-separated experiments to run: {', '.join(_EXPERIMENTS)} (default: none)")
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="the experiments' size: small (minutes on a CPU) or full (the README's numbers)")
    p.add_argument("--backbone", default=None, choices=("efficientnet-lite0",),
                   help="splice the SAE into this backbone for the downstream metrics (needs the images)")
    p.add_argument("--images", default=None,
                   help="the store's images in its order: the folder or file list it was recorded from "
                        "(default: the store's recorded paths, when they are files from here)")
    p.add_argument("--downstream-images", type=int, default=512,
                   help="the downstream metrics run on this many images, evenly spaced in store order; 0: all "
                        "(their pixels are held in memory at once; default: 512)")
    p.add_argument("--latents", type=int, default=24, help="latents shown with exemplars (default: 24)")
    p.add_argument("--per-latent", type=int, default=8, help="exemplars per latent and rule (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(_eval_parser=p)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``saeengine eval``; prints the metrics line and the files written, returns 0."""
    from .eval.run_eval import default_out_dir, evaluate

    for flag, value, low in (("--latents", args.latents, 0), ("--per-latent", args.per_latent, 1),
                             ("--downstream-images", args.downstream_images, 0)):
        if value < low:
            args._eval_parser.error(f"{flag} must be >= {low}, got {value}")
    out = args.out if args.out is not None else default_out_dir(args.encoded)
    result = evaluate(args.encoded, out, experiments=args.experiments, size=args.size, backbone=args.backbone,
                      images=args.images, n_latents=args.latents, per_latent=args.per_latent,
                      progress=not args.no_progress, downstream_images=args.downstream_images or None)
    metrics, latents = result["metrics"], result["latents"]
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("fvu", "l0", "cosine") if isinstance(metrics.get(k), float))
    print(f"{shown}; {latents['dead']} dead and {latents['dense']} dense of {latents['d_sae']} latents")
    for name in result["experiments"]:
        print(f"experiment {name}: done")
    print(f"wrote {out / 'eval.json'} and {out / result['report']}")
    return 0


def interrupted_eval(args: argparse.Namespace) -> str:
    return "interrupted; eval.json and report.html are written whole at the end, so none was left half-written"
