"""``saeengine record``: record a backbone's activations over a folder (or a file list) of
images into activation stores, one per layer; ``--resume`` continues a killed recording.

    saeengine record photos/ --layers blocks.5,blocks.10 --out-dir acts/
    saeengine record list.txt --backbone transformers --model /models/dinov2-small \\
        --layers blocks.11 --keep patch,register --out-dir acts/ --resume

Weights come only from local files: EfficientNet-Lite0 from the packaged ImageNet weights
(or ``--weights FILE``), the other families from ``--model`` (a local folder, or a model
name with ``--weights FILE``). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import InputError

# The image families the CLI builds, and what each needs: (takes --model, needs --model, takes --weights).
FAMILIES = {
    "efficientnet-lite0": (False, False, True),
    "transformers": (True, True, False),
    "timm": (True, True, True),
    "open_clip": (True, True, True),
}


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_record_parser(subparsers) -> None:
    """Add the ``record`` command to an argparse subparsers object."""
    from .store.metadata import DTYPES

    p = subparsers.add_parser(
        "record", help="record a backbone's activations over a folder of images into activation stores",
        description="Record the activations of a vision backbone at one or more layers over a folder of images "
                    "(searched recursively, sorted by relative path) or a text file listing image paths (one a "
                    "line), into one activation store per layer under --out-dir. Images are decoded one at a "
                    "time, so memory does not grow with their number. Rerun a killed recording with --resume.")
    p.add_argument("images", help="a folder of images (subfolders included) or a text file with one image path "
                                  "a line (relative to the file's folder)")
    p.add_argument("--backbone", choices=sorted(FAMILIES), default="efficientnet-lite0",
                   help="the model family (default: efficientnet-lite0, with its packaged ImageNet weights)")
    p.add_argument("--model", default=None,
                   help="transformers: a local model folder; timm, open_clip: the model name (with --weights)")
    p.add_argument("--weights", default=None,
                   help="a local weight file (efficientnet-lite0: default the packaged ImageNet weights; timm, "
                        "open_clip: the checkpoint of --model)")
    p.add_argument("--layers", required=True, type=_names,
                   help="comma-separated blocks to record, e.g. blocks.5,blocks.10 (blocks.-1 is the last)")
    p.add_argument("--keep", type=_names, default=["patch"],
                   help="comma-separated token kinds to record: patch, cls, register (default: patch)")
    p.add_argument("--out-dir", required=True, type=Path, help="where the stores go, one folder per layer")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage dtype (default: float16)")
    p.add_argument("--shard-tokens", type=int, default=1 << 18,
                   help="tokens per shard; a killed recording resumes from the last finished shard "
                        "(default: 262144)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize images to this square side (default: the backbone's own)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true",
                   help="continue the recording in --out-dir (it must have the same settings)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip images that cannot be decoded (with a warning each) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(_record_parser=p)


def _load_backbone(args: argparse.Namespace):
    from .backbones import load_backbone

    takes_model, needs_model, takes_weights = FAMILIES[args.backbone]
    parser = args._record_parser
    if args.model is not None and not takes_model:
        parser.error(f"--backbone {args.backbone} takes no --model (pass its weight file with --weights)")
    if needs_model and args.model is None:
        parser.error(f"--backbone {args.backbone} needs --model (a local folder, or a model name with --weights)")
    if args.weights is not None and not takes_weights:
        parser.error(f"--backbone {args.backbone} takes no --weights; pass the local model folder with --model")
    if args.weights is not None and not Path(args.weights).is_file():
        raise InputError(f"--weights {args.weights}: no such file; pass a local weight file (nothing is downloaded)")
    try:
        if args.backbone == "efficientnet-lite0":
            return load_backbone(args.backbone, args.weights)
        if args.backbone == "transformers":
            return load_backbone(args.backbone, args.model)
        return load_backbone(args.backbone, args.model, weights=args.weights)
    except InputError:
        raise
    except (RuntimeError, OSError) as exc:  # the families' loading errors, as one line
        raise InputError(f"--backbone {args.backbone}: {exc}") from exc


def run_record(args: argparse.Namespace) -> int:
    """Run ``saeengine record``; prints each store written (tokens, images) and returns 0."""
    import torch

    from .backbones import record_activations
    from .backbones.record import check_out_dir

    for flag, value in (("--batch-size", args.batch_size), ("--shard-tokens", args.shard_tokens)):
        if value < 1:
            args._record_parser.error(f"{flag} must be >= 1, got {value}")
    if args.image_size is not None and args.image_size < 1:
        args._record_parser.error(f"--image-size must be >= 1, got {args.image_size}")
    from .distributed.launch import world_from_env

    check_out_dir(args.out_dir, args.resume)  # before loading a model for nothing
    if (world_from_env() or 1) > 1:  # under torchrun: each rank records its part, rank 0 merges
        from .distributed.record import run_record_distributed

        return run_record_distributed(args, _load_backbone)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    backbone = place_backbone(_load_backbone(args), device, args)
    stores = record_activations(backbone, args.images, args.layers, args.out_dir, keep=args.keep,
                                batch_size=args.batch_size, dtype=args.dtype, shard_tokens=args.shard_tokens,
                                progress=not args.no_progress, resume=args.resume,
                                skip_unreadable=args.skip_unreadable)
    report_recorded(stores, backbone.name, args.out_dir)
    return 0


def place_backbone(backbone, device, args: argparse.Namespace):
    """``backbone`` on ``device`` with --image-size applied (the single-process and the
    torchrun recordings); InputError naming --device when the device cannot take it."""
    import torch

    try:
        backbone.model.to(torch.device(device))
    except (RuntimeError, AssertionError) as exc:  # no such device, or torch built without CUDA
        raise InputError(f"--device {args.device}: {exc}") from exc
    if args.image_size is not None:
        backbone.image_size = args.image_size
    return backbone


def report_recorded(stores: dict, backbone_name: str, out_dir, where: str = "") -> None:
    """What saeengine record prints: each layer's store, then one summary line (``where``:
    e.g. " on 4 ranks")."""
    from .store import ActivationStore

    images = skipped = 0
    for layer, path in stores.items():
        store = ActivationStore(path)
        images, skipped = store.n_images, len(store.meta.progress.get("skipped", []))
        print(f"{layer}: {store.n_tokens} tokens of {store.n_images} images, d_in {store.d_in} "
              f"({store.meta.dtype}) -> {path}")
    print(f"recorded {images} images ({skipped} skipped as unreadable) at {len(stores)} layers of "
          f"{backbone_name}{where} into {out_dir}")
