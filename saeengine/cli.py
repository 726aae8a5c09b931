"""Command line: ``saeengine demo`` (the embedded default job); more commands join here.

Options come from the fields of the config dataclasses; each field's docstring is its help.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
from typing import Sequence


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (a string literal right after the field) of a dataclass."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=f.default,
                            help=f"{docs.get(f.name, '')} (default: {f.default})")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig

    parser = argparse.ArgumentParser(prog="saeengine", description="Fast sparse autoencoders for vision models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a TopK SAE on a planted sparse dictionary and report recovery",
                          description="Train a TopK SAE on synthetic activations built from a planted sparse "
                                      "dictionary; print FVU, L0, dead fraction and dictionary recovery.")
    add_dataclass_options(demo, DemoConfig)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        fields = {f.name for f in dataclasses.fields(DemoConfig)}
        cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields})
        report = run_demo(cfg, progress=not args.no_progress)
        print(json.dumps(report, indent=2))
        print(f"\nFVU {report['fvu']:.4f} | L0 {report['l0']:.2f} | dead {report['dead_fraction']:.1%} | "
              f"planted-dictionary recovery (mean max cos) {report['recovery_mean_max_cos']:.3f} | "
              f"checkpoint {report['checkpoint']}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
