"""``saeengine encode``: one ordered pass of a trained SAE over an activation store, writing
every token's code, per-latent statistics, exemplars and reconstruction metrics to a
folder (saeengine.eval.encode). A killed or interrupted pass continues when the same
command runs again.

    saeengine encode --sae runs/topk-k32 --data acts/blocks.10 --out encoded/blocks.10
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path


def _files_help() -> str:
    from .eval.encoded import CSR, EXEMPLARS, FIXED, HOLDS, INDICES, INDPTR, SOURCES, STATS, SUMMARY, VALUES

    rows = [(SUMMARY, HOLDS[SUMMARY] + "; written last: a folder without it is unfinished"),
            (VALUES, f"fixed width (TopK): float32 [N, k], {HOLDS[(FIXED, VALUES)]}; variable width (ReLU, "
                     f"JumpReLU, BatchTopK): float32 [entries], {HOLDS[(CSR, VALUES)]}"),
            (INDICES, f"int32, {HOLDS[(FIXED, INDICES)]} ([N, k]); variable width: [entries]"),
            (INDPTR, f"variable width only: int64 [N + 1], {HOLDS[(CSR, INDPTR)]}"),
            (SOURCES, f"int64 [N, 2], {HOLDS[SOURCES]}"),
            (STATS, HOLDS[STATS]),
            (EXEMPLARS, HOLDS[EXEMPLARS]),
            ("resume.safetensors", "while unfinished only: the last commit, from which a rerun continues")]
    return "output files in --out:\n" + "\n".join(
        textwrap.fill(text, 100, initial_indent=f"  {name:<26}", subsequent_indent=" " * 28) for name, text in rows)


def add_encode_parser(subparsers) -> None:
    """Add the ``encode`` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "encode", help="encode an activation store with a trained SAE: codes, latent statistics, exemplars, metrics",
        description="One ordered pass of a trained SAE over an activation store, in batches of whole images, "
                    "writing every token's sparse code with its (image, position), per-latent statistics, top-k "
                    "exemplar images per latent (patch max, image sum, CLS), and the reconstruction metrics "
                    "(summary.json). Memory does not grow with the number of tokens. The pass commits regularly: "
                    "rerun the same command after a crash or Ctrl-C to continue it; a finished folder of the same "
                    "SAE and store is reused.",
        epilog=_files_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, type=Path,
                   help="the trained SAE: a saeengine checkpoint folder (SAE.save), or another "
                   "library's SAE that SAE.from_pretrained reads (SAELens, sparsify, saev, "
                   "dictionary_learning, overcomplete; docs/interop.md)")
    p.add_argument("--data", required=True, type=Path, help="the activation store folder (saeengine record)")
    p.add_argument("--out", required=True, type=Path, help="the output folder (new, empty, or an earlier encode's)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per batch, about: batches hold whole images (default: 8192)")
    p.add_argument("--top-k", type=int, default=128, help="exemplar images kept per latent and rule (default: 128)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto",
                   help="op backend of encode and decode: auto (the fastest plan), torch, triton, cuda")
    p.add_argument("--no-resume", action="store_true",
                   help="start over, replacing an encoding already in --out (default: continue or reuse it)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(_encode_parser=p)


def run_encode(args: argparse.Namespace) -> int:
    """Run ``saeengine encode``; prints the pass's summary and returns 0."""
    from .eval.encode import encode_store

    for flag, value in (("--batch-tokens", args.batch_tokens), ("--top-k", args.top_k)):
        if value < 1:
            args._encode_parser.error(f"{flag} must be >= 1, got {value}")
    from .distributed.launch import world_from_env

    if (world_from_env() or 1) > 1:  # under torchrun: each rank encodes its rows, rank 0 merges
        from .distributed.encode import run_encode_distributed

        return run_encode_distributed(args)
    device = None if args.device == "auto" else args.device
    encoded = encode_store(args.sae, args.data, args.out, batch_tokens=args.batch_tokens, top_k=args.top_k,
                           device=device, backend=args.backend, resume=not args.no_resume,
                           progress=not args.no_progress)
    report_encoded(encoded, args.out)
    return 0


def report_encoded(encoded, out, where: str = "") -> None:
    """What saeengine encode prints: the counts and metrics, then the files (``where``:
    e.g. " on 4 ranks")."""
    m, counts = encoded.metrics, encoded.summary["counts"]

    def number(key: str, form: str) -> str:
        return "n/a" if m.get(key) is None else format(m[key], form)

    print(f"encoded {counts['tokens']} tokens of {counts['images']} images with {counts['d_sae']} latents{where} | "
          f"FVU {number('fvu', '.4f')} | L0 {number('l0', '.2f')} | dead {number('dead_fraction', '.1%')} | "
          f"dense {number('dense_fraction', '.1%')}")
    print(f"wrote {', '.join(sorted(encoded.summary['files']))} to {out} (summary.json says what each holds)")


def interrupted_encode(args: argparse.Namespace) -> str:
    """What an interrupted ``saeengine encode`` kept, and how to continue."""
    from .eval.encoded import RESUME, SUMMARY

    out = Path(getattr(args, "out", "--out"))
    again = "the same command without --no-resume" if getattr(args, "no_resume", False) else "the same command"
    if (out / SUMMARY).exists():
        return f"interrupted; the finished encoding in {out} is kept"
    try:
        from safetensors import safe_open

        with safe_open(str(out / RESUME), "pt") as f:
            done = json.loads(f.metadata()["progress"])
        rows, total = done["rows"], done["identity"]["store"]["n_tokens"]
    except Exception:  # noqa: BLE001 - no commit yet (or unreadable): say so, never raise here
        return f"interrupted before the first commit; nothing was kept in {out}, and {again} starts over"
    return f"interrupted; {out} keeps the first {rows} of {total} tokens, and {again} continues from there"
