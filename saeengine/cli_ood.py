"""``saeengine ood``: OOD detection with SAE scores and dense baselines, into ood.json,
ood_scores.npz and a self-contained report.html (saeengine.eval.ood_run does the work).

    saeengine ood --offline --size full --threads 1 --out benchmarks/results/2026-12-01-ood-offline
    saeengine ood --sae runs/sae --id-train acts/train/blocks.10 --id-test acts/test/blocks.10 \\
        --near-ood sketch=acts/sketch/blocks.10 --far-ood noise=acts/noise/blocks.10 --out ood-out

Stores (``saeengine record``) are read whole into memory as float32. An image's label is
the folder that holds it (the last folder of its recorded path): record a folder with one
subfolder per class (``train/3/img001.png`` is class "3"; a file list works the same way). Every ID image needs one; an OOD store is
labelled (and then also tests the generalization probes) when every image's subfolder is
an ID class, and unlabelled otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import InputError

_FIELDS = """\
ood.json (every field: docs/ood-run.md):
  format "saeengine-ood", version 1, mode ("offline" | "stores"), date, commit, torch, threads
  datasets     {name: {n, group, labelled, source}}
  kinds        {kind: one feature kind's run}: level (image | token), d_in, d_sae, n_classes,
               n_id_train, n_id_test, tokens_per_image, sets {name: {n, group, labelled}},
               scores (sae.reconstruction, sae.max_latent, sae.energy, sae.knn,
               sae.class_profile, dense.msp, dense.energy, dense.mahalanobis, dense.knn),
               metrics {score: {set: {auroc, fpr95, aupr_in, aupr_out, n_id, n_ood}}},
               best {set: {metric: [scores]}}, group_means {score: {near|far: {auroc, fpr95}}},
               id_score_means, generalization {sets, probes {sae_codes|dense: {d, train,
               id_test, sets {name: {accuracy, ratio, n}}}}}, settings, seconds
  offline only: experiment, size, seed, settings, image_size, spatial_layer, sae, far_ood_check
  files        {"report": "report.html", "scores": "ood_scores.npz"} (per-image scores,
               arrays named "<kind>/<score>/<set>", set "id" = the ID test set)
Higher score = more OOD; AUROC with OOD positive, FPR95 with ID kept at 95%.
"""


def _named_store(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=STORE (a set name, '=', an activation store "
                                         "folder), e.g. noise=acts/noise/blocks.10")
    if name == "id":
        raise argparse.ArgumentTypeError(f"{text!r}: 'id' names the ID test set; choose another OOD set name")
    return name, Path(path)


def add_parser(subparsers) -> None:
    """Add the ``ood`` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "ood", help="OOD detection with SAE scores and dense baselines: ood.json and an HTML report",
        description="Score an in-distribution test set and named OOD sets with every SAE score (reconstruction\n"
                    "error, max latent, latent energy, kNN in code space, class activation profile) and dense\n"
                    "baseline (max softmax and energy of a linear probe, Mahalanobis, kNN), measure AUROC, FPR95,\n"
                    "AUPR-in and AUPR-out per score and set, and compare probes on SAE codes vs dense features on\n"
                    "the labelled shifted sets. --offline runs the built-in experiment (EfficientNet-Lite0, ID =\n"
                    "MNIST); otherwise give an SAE and activation stores recorded by `saeengine record`. Writes\n"
                    "ood.json, ood_scores.npz and report.html under --out (each whole, atomically).",
        epilog=_FIELDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the output folder (created)")
    p.add_argument("--offline", action="store_true",
                   help="run the built-in offline experiment (MNIST vs sklearn digits, rotated MNIST, LFW faces, "
                        "scikit-image photos, noise; pooled and blocks.10 features)")
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="--offline: small (seconds, the tests') or full (minutes, the README's numbers)")
    p.add_argument("--sae", type=Path, default=None, help="the SAE checkpoint folder (SAE.save) of the stores' layer")
    p.add_argument("--id-train", type=Path, default=None,
                   help="store of the ID training images (fits the scorers and probes); class subfolders required")
    p.add_argument("--id-test", type=Path, default=None, help="store of the ID test images (class subfolders)")
    for flag, group in (("--ood", "no group"), ("--near-ood", "near"), ("--far-ood", "far")):
        p.add_argument(flag, action="append", type=_named_store, default=[], metavar="NAME=STORE",
                       help=f"an OOD set ({group}): its name and store; repeatable")
    # The offline experiment has its own settings per --size (saeengine.eval.experiments.ood.SIZES).
    p.add_argument("--knn-k", type=int, default=50, help="stores: k of both kNN scores (default: 50)")
    p.add_argument("--max-fit-rows", type=int, default=20000,
                   help="stores: at most this many ID training tokens fit the SAE scorer (seeded draw; default: 20000)")
    p.add_argument("--probe-epochs", type=int, default=100,
                   help="stores: L-BFGS iterations of the probes (default: 100)")
    p.add_argument("--no-generalization", action="store_true", help="stores: skip the generalization probes")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws, the SAEs (--offline) and the probes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(_ood_parser=p)


# ----- stores -----------------------------------------------------------------------------
def store_features(path: Path):
    """A store -> (features [n, d] (one token per image) or [n, T, d] float32 in image order,
    per-image class folder names (str, or None for an image without a subfolder), the
    layer name). InputError when images hold different numbers of tokens."""
    import numpy as np
    import torch

    from .store import ActivationStore

    if not Path(path).is_dir():
        raise InputError(f"{path}: no such store folder; pass a folder written by `saeengine record` (one per layer)")
    store = ActivationStore(path)
    rows = np.arange(store.n_tokens, dtype=np.int64)
    if rows.size == 0:
        raise InputError(f"{path}: the store holds no tokens; record some images first")
    image, position = store.sources(rows)
    order = np.lexsort((position, image))
    x = torch.cat([store.get(order[i:i + 65536]).float() for i in range(0, order.size, 65536)])
    image = image[order]
    uniq, counts = np.unique(image, return_counts=True)
    if counts.min() != counts.max():
        raise InputError(f"{path}: images hold different numbers of tokens ({counts.min()}..{counts.max()}); record "
                         "every image at one size (--image-size) so each has the same token grid")
    t = int(counts[0])
    x = x.view(uniq.size, t, -1)
    if t == 1:
        x = x[:, 0]
    paths = store.image_paths
    names = []
    for i in uniq:
        parts = Path(paths[int(i)]).parts if int(i) < len(paths) else ()
        names.append(parts[-2] if len(parts) >= 2 and parts[-2] not in ("", ".", "..") else None)
    return x, names, store.meta.layer or "features"


def _class_ids(names: list, classes: list[str], what: str, path: Path, required: bool):
    """Class folder names -> int64 ids into ``classes``; None (unlabelled) when not required
    and some image has no ID class."""
    import numpy as np

    index = {c: i for i, c in enumerate(classes)}
    bad = [n for n in names if n not in index]
    if bad:
        if not required:
            return None
        raise InputError(f"{what} store {path}: {len(bad)} images have no ID class folder (e.g. {bad[0]!r}; ID "
                         f"classes: {classes[:10]}); record the images from a folder with one subfolder per class")
    return np.asarray([index[n] for n in names], dtype=np.int64)


def _store_document(args) -> dict:
    from . import SAE
    from .eval.ood_run import FORMAT, VERSION, OODSet, run_ood

    train_x, train_names, layer = store_features(args.id_train)
    if any(n is None for n in train_names):
        raise InputError(f"ID train store {args.id_train}: images without a class subfolder; record the ID "
                         "training images from a folder with one subfolder per class (root/<class>/<image>)")
    classes = sorted(set(train_names))
    train_y = _class_ids(train_names, classes, "ID train", args.id_train, True)
    test_x, test_names, _ = store_features(args.id_test)
    test_y = _class_ids(test_names, classes, "ID test", args.id_test, True)
    sets, datasets = {}, {"id_train": {"n": int(train_x.shape[0]), "group": "id", "labelled": True,
                                       "source": str(args.id_train)},
                          "id_test": {"n": int(test_x.shape[0]), "group": "id", "labelled": True,
                                      "source": str(args.id_test)}}
    for group, items in (("", args.ood), ("near", args.near_ood), ("far", args.far_ood)):
        for name, path in items:
            if name in sets:
                raise InputError(f"OOD set name {name!r} is given twice; give each --ood set its own name")
            x, names, _ = store_features(path)
            y = _class_ids(names, classes, f"OOD set {name!r}", path, False)
            sets[name] = OODSet(x, y, group)
            datasets[name] = {"n": int(x.shape[0]), "group": group, "labelled": y is not None, "source": str(path)}
    sae = SAE.load(args.sae)
    result = run_ood(train_x, train_y, test_x, test_y, sets, sae, knn_k=args.knn_k, max_fit_rows=args.max_fit_rows,
                     probe_epochs=args.probe_epochs, generalization=not args.no_generalization, seed=args.seed,
                     progress=not args.no_progress)
    return {"format": FORMAT, "version": VERSION, "mode": "stores", "title": f"{layer} ({args.sae})",
            "sae_dir": str(args.sae), "classes": classes, "datasets": datasets, "kinds": {layer: result}}


# ----- the command --------------------------------------------------------------------------
def _check(args) -> None:
    parser = args._ood_parser
    store_flags = {"--sae": args.sae, "--id-train": args.id_train, "--id-test": args.id_test}
    oods = args.ood + args.near_ood + args.far_ood
    if args.offline:
        given = [f for f, v in store_flags.items() if v is not None] + (["--ood"] if oods else [])
        if given:
            parser.error(f"--offline runs the built-in experiment and takes no {', '.join(given)}; drop them, or "
                         "drop --offline to score your own stores")
    else:
        missing = [f for f, v in store_flags.items() if v is None] + ([] if oods else ["--ood NAME=STORE"])
        if missing:
            parser.error(f"give --offline, or every one of --sae, --id-train, --id-test and at least one --ood "
                         f"(missing: {', '.join(missing)})")
    for flag, value, low in (("--knn-k", args.knn_k, 1), ("--max-fit-rows", args.max_fit_rows, 1),
                             ("--probe-epochs", args.probe_epochs, 1), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")


def _print_table(doc: dict) -> None:
    for kind, result in doc["kinds"].items():
        sets = list(result["sets"])
        width = max(len(s) for s in result["scores"])
        print(f"{kind}: AUROC / FPR95 per OOD set")
        print(" " * width + "  " + "  ".join(f"{s:>15.15}" for s in sets))
        for score in result["scores"]:
            m = result["metrics"][score]
            cells = "  ".join(f"{m[s]['auroc']:6.3f} / {m[s]['fpr95']:5.3f}" for s in sets)
            print(f"{score:<{width}}  {cells}")


def run(args: argparse.Namespace) -> int:
    """Run ``saeengine ood``; prints the AUROC / FPR95 table and the files written."""
    import datetime as _dt

    import torch

    from .eval.ood_report import write_ood
    from .validation import current_commit

    _check(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stamp = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": current_commit(),
             "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.offline:
        from .eval.experiments.ood import run_ood_experiment

        doc = run_ood_experiment(args.size, seed=args.seed, progress=not args.no_progress, keep_arrays=True)
    else:
        doc = _store_document(args)
    doc = {**doc, **stamp}
    paths = write_ood(args.out, doc)
    _print_table(doc)
    print(f"wrote {paths['json']}, {paths['report']} and {paths['scores']}")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    return "interrupted; ood.json and report.html are written whole at the end, so none was left half-written"
