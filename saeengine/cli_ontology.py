"""``saeengine ontology``: ontology recovery (LCH height and coverage of an SAE's latents
against a class hierarchy) into ontology.json and a self-contained report.html.

    saeengine ontology --sae runs/sae --features feats.npy --labels labels.txt --out onto/
    saeengine ontology --sae a/ --sae b/ --features a.npy --features b.npy --labels wnids.txt
    saeengine ontology --offline --size small --out onto-smoke/

Definitions: docs/ontology.md; the work: saeengine.eval.ontology.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_FIELDS = """\
ontology.json (definitions: docs/ontology.md):
  settings     top_n, tau, min_frequency, max_frequency, bands, nulls, seed, ...
  hierarchy    source, nodes, leaves, internal, n_roots, roots, max_depth, max_height
  n_images     images (feature rows = labels)
  layers       {layer: {n_images, d_in, d_sae, n_labels_seen,
                latents {live, in_band, kept, too_few_images},
                sae {n_latents, mean_height, median_height, height_histogram [count per
                     height 0..], no_common_hypernym, mean_node_height,
                     node_height_histogram, mean_purity, mean_subtree_purity, covered,
                     internal, coverage, attainable, coverage_attainable,
                     coverage_by_band [{depths, internal, covered, coverage, attainable,
                     coverage_attainable}], covered_nodes},
                nulls {shuffled_labels|random_directions|pca|neurons: {count, kept,
                       too_few_images, ...as sae}},
                examples [{latent, frequency, purity, modal, n_distinct, lch, lch_name,
                           height, node, node_name, node_height, subtree_purity,
                           top_labels}],
                per_latent [the same row for every kept latent] (not with --offline)}}
  --offline adds the smoke run's fields around it ("ontology" holds the above):
  experiment, smoke_test, note, size, seed, settings, n_images, images, n_labels_seen,
  top_labels, saes {layer: d_in, d_sae, fvu, l0}, seconds
report.html    beside it: the per-layer table with the nulls, height histograms, coverage
               per depth band, and a few latents' top images' labels
"""

_WNID = re.compile(r"n\d{8}\Z")


def add_parser(subparsers) -> None:
    """Add the ``ontology`` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "ontology", help="ontology recovery: LCH height and coverage of SAE latents in a class hierarchy",
        description="For each live latent of an SAE over image-level features (a CLS token or pooled embedding\n"
                    "per image): its top-N images' labels, purity, lowest common hypernym (LCH) in a hierarchy and\n"
                    "the LCH's height; per layer, the coverage of the hierarchy's internal nodes, with null\n"
                    "baselines (shuffled labels, random directions, PCA, raw neurons). Writes ontology.json and\n"
                    "report.html (each whole, atomically) under --out.\n\n"
                    "Either --offline (the EfficientNet-Lite0 smoke test: pseudo-labels from its ImageNet head on\n"
                    "offline images, against WordNet; it keeps its own top-N, tau, frequency band, bands and\n"
                    "nulls, and reads --size, --seed, --threads, --out), or --sae with --features and --labels.",
        epilog=_FIELDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offline", action="store_true",
                   help="run the offline smoke test (EfficientNet-Lite0, WordNet; no other input needed)")
    p.add_argument("--size", choices=("small", "full"), default="full",
                   help="the smoke test's size: small (the tests', under a minute) or full (the README's, a few "
                        "minutes on a CPU; default)")
    p.add_argument("--sae", action="append", type=Path, default=[], metavar="DIR",
                   help="an SAE checkpoint folder; repeat for several layers (or several SAEs)")
    p.add_argument("--features", action="append", type=Path, default=[], metavar="FILE",
                   help="image-level features [n_images, d] (.npy, or .safetensors with one tensor or one named "
                        "'features'): once for all SAEs, or once per --sae, in order")
    p.add_argument("--layer", action="append", default=[], metavar="NAME",
                   help="a name per --sae, in order (default: each SAE folder's name)")
    p.add_argument("--labels", type=Path, default=None, metavar="FILE",
                   help="one label per line, per feature row in order (names of leaves of the hierarchy)")
    p.add_argument("--hierarchy", type=Path, default=None, metavar="FILE",
                   help="an is-a file: child<TAB>parent per line, '#' comments (default: the ImageNet WordNet tree, "
                        "when every label is a wnid like n01440764)")
    p.add_argument("--top-n", type=int, default=16, help="top images per latent (default: 16)")
    p.add_argument("--tau", type=float, default=0.9,
                   help="subtree purity a node needs to count as covered, in (0.5, 1] (default: 0.9)")
    p.add_argument("--min-frequency", type=float, default=1e-5,
                   help="keep latents firing on at least this share of images (default: 1e-5)")
    p.add_argument("--max-frequency", type=float, default=1e-1,
                   help="keep latents firing on at most this share of images (default: 0.1)")
    p.add_argument("--bands", type=int, default=4, help="depth bands of the internal nodes for coverage (default: 4)")
    p.add_argument("--nulls", default="shuffled_labels,random_directions,pca,neurons",
                   help="comma-separated null baselines, or 'none' (default: all four)")
    p.add_argument("--seed", type=int, default=0, help="seed of the nulls (and of the smoke test's data and SAEs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="where the SAEs encode (default: cpu)")
    p.add_argument("--out", type=Path, default=Path("ontology-out"),
                   help="folder for ontology.json and report.html (default: ./ontology-out)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


# ----- inputs --------------------------------------------------------------------------------
def read_features(path: Path):
    """.npy or .safetensors -> a numpy array (shape checked by the ontology)."""
    import numpy as np

    from .errors import InputError

    if not path.is_file():
        raise InputError(f"--features {path}: no such file; pass a .npy or .safetensors file of [n_images, d] "
                         "features")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
        else:
            raise InputError(f"--features {path}: unknown format {suffix or '(no suffix)'}; save the features as "
                             ".npy (numpy.save) or .safetensors")
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged file: name it
        raise InputError(f"--features {path}: cannot be read ({type(err).__name__}: {err}); save it again") from err
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    if "features" in tensors:
        return tensors["features"]
    raise InputError(f"--features {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:6])}) and none "
                     "is named 'features'; save one tensor, or name it 'features'")


def read_labels(path: Path) -> list[str]:
    """One label per line (surrounding spaces stripped); InputError for an empty line."""
    from .errors import InputError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--labels {path}: cannot be read ({type(err).__name__}: {err}); pass a UTF-8 text file "
                         "with one label per line") from err
    labels = [line.strip() for line in lines]
    empty = [i + 1 for i, label in enumerate(labels) if not label]
    if empty:
        raise InputError(f"--labels {path}: line {empty[0]} is empty ({len(empty)} empty lines); give one label per "
                         "line, one line per feature row")
    return labels


def hierarchy_for(path: Path | None, labels: list[str]):
    """The is-a file's Hierarchy, or the ImageNet WordNet tree when every label is a wnid."""
    from .errors import InputError
    from .eval.hierarchy import Hierarchy
    from .eval.ontology import imagenet_tree

    if path is not None:
        return Hierarchy.read(path)
    other = next((label for label in labels if not _WNID.match(label)), None)
    if other is not None:
        raise InputError(f"label {other!r} is not a WordNet wnid (like n01440764), so the default ImageNet hierarchy "
                         "does not apply; pass --hierarchy FILE (an is-a file of child<TAB>parent lines)")
    return imagenet_tree()


def _check_counts(args, error) -> None:
    if len(args.features) not in (1, len(args.sae)):
        error(f"give --features once (for every SAE) or once per --sae: {len(args.sae)} --sae, "
              f"{len(args.features)} --features")
    if args.layer and len(args.layer) != len(args.sae):
        error(f"give one --layer per --sae: {len(args.sae)} --sae, {len(args.layer)} --layer")


def _layers(args) -> dict:
    """{layer name: (SAE, features)} from --sae, --features and --layer (counts checked)."""
    from .sae import SAE

    names = list(args.layer) or [path.resolve().name or str(path) for path in args.sae]
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # two SAEs in folders of the same name stay apart
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    features = [read_features(path) for path in args.features]
    return {name: (SAE.load(path, device=args.device), features[i if len(features) > 1 else 0])
            for i, (name, path) in enumerate(zip(unique, args.sae))}


# ----- the command ---------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Run ``saeengine ontology``; prints a line per layer and the files written, returns 0."""
    import torch

    from .cli_failures import UsageError
    from .eval.ontology import NULLS, OntologySettings, ontology
    from .eval.ontology_report import write_outputs

    def error(message):
        raise UsageError(message)

    nulls = () if args.nulls.strip().lower() == "none" else tuple(n.strip() for n in args.nulls.split(",") if n.strip())
    unknown = [n for n in nulls if n not in NULLS]
    if unknown:
        error(f"--nulls: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(NULLS)} or 'none'")
    if args.threads is not None:
        if args.threads < 1:
            error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    if args.offline:
        if args.sae or args.features or args.labels or args.hierarchy or args.layer:
            error("--offline runs the built-in smoke test; it takes no --sae, --features, --labels, --hierarchy "
                  "or --layer")
        from .eval.experiments.ontology import run_ontology_smoke

        result = run_ontology_smoke(args.size, seed=args.seed, progress=progress)
        onto = result["ontology"]
    else:
        if not args.sae or not args.features or args.labels is None:
            error("pass --offline, or --sae DIR with --features FILE and --labels FILE")
        _check_counts(args, error)
        settings = OntologySettings(top_n=args.top_n, tau=args.tau, min_frequency=args.min_frequency,
                                    max_frequency=args.max_frequency, bands=args.bands, nulls=nulls, seed=args.seed,
                                    per_latent=True).check()
        labels = read_labels(args.labels)
        hierarchy = hierarchy_for(args.hierarchy, labels)
        layers = _layers(args)
        result = onto = ontology(layers, labels, hierarchy, settings, progress=progress)
    json_path, report_path = write_outputs(result, args.out)
    for name, layer in onto["layers"].items():
        sae = layer["sae"]
        null_text = ", ".join(f"{n} {_fmt(s['coverage'])}" for n, s in layer["nulls"].items())
        print(f"layer {name}: {layer['latents']['kept']} kept of {layer['latents']['live']} live latents; mean LCH "
              f"height {_fmt(sae['mean_height'])}; coverage {_fmt(sae['coverage'])} (attainable "
              f"{_fmt(sae['coverage_attainable'])})" + (f"; nulls' coverage: {null_text}" if null_text else ""))
    print(f"wrote {json_path} and {report_path}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def interrupted(args: argparse.Namespace) -> str:
    return "interrupted; ontology.json and report.html are written whole at the end, so none was left half-written"
