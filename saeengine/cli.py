"""Command line: ``saeengine demo`` (the embedded default job), ``demo-synthetic`` and ``train``.

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
        flag = f"--{f.name.replace('_', '-')}"
        help_text = f"{docs.get(f.name, '')} (default: {f.default})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=f.default, help=help_text)


def _dataclass_from_args(cls, args: argparse.Namespace):
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in fields})


def _sweep_configs(base, sweep: list[str]):
    """``--sweep k=16,32`` (repeatable): one config per combination, each named after it."""
    configs = [base]
    types = {f.name: type(f.default) for f in dataclasses.fields(base)}
    for spec in sweep:
        key, _, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if key not in types or not values:
            raise SystemExit(f"saeengine train: --sweep {spec!r} must be FIELD=V1,V2,... with a TrainConfig field")
        configs = [dataclasses.replace(c, **{key: types[key](v)}) for c in configs for v in values.split(",")]
    if sweep:
        configs = [dataclasses.replace(c, name=c.name or f"{c.run_name}") for c in configs]
    return configs


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig
    from .demo_synthetic import SyntheticDemoConfig

    parser = argparse.ArgumentParser(prog="saeengine", description="Fast sparse autoencoders for vision models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="record EfficientNet-Lite0 features of bundled images, train an SAE, "
                                       "write an HTML report",
                          description="The embedded default job, offline: record EfficientNet-Lite0 features of "
                                      "the 5000 MNIST digits and the scikit-image photos, train a TopK SAE, print "
                                      "FVU, L0 and dead %, and write an HTML report of the strongest latents.")
    add_dataclass_options(demo, DemoConfig)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    synthetic = sub.add_parser("demo-synthetic", help="train a TopK SAE on a planted sparse dictionary",
                               description="Train a TopK SAE on synthetic activations built from a planted sparse "
                                           "dictionary; print FVU, L0, dead fraction and dictionary recovery.")
    add_dataclass_options(synthetic, SyntheticDemoConfig)
    synthetic.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    from .trainer import TrainConfig

    train = sub.add_parser("train", help="train an SAE (or a sweep) on an activation store",
                           description="Train SAEs on a recorded activation store. Every SAE of a sweep reads "
                                       "the same batches. Re-running the same command resumes from the latest "
                                       "checkpoint in --out-dir.")
    train.add_argument("--data", required=True, help="activation store directory (see saeengine.store)")
    train.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2",
                       help="train one SAE per value (repeat for a grid), e.g. --sweep k=16,32,64")
    add_dataclass_options(train, TrainConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        report = run_demo(_dataclass_from_args(DemoConfig, args), progress=not args.no_progress)
        print(json.dumps(report, indent=2))
        print(f"\nFVU {report['fvu']:.4f} | L0 {report['l0']:.2f} | dead {report['dead_fraction']:.1%} | "
              f"{report['total_seconds']:.0f} s\nreport: {report['report']}")
        return 0
    if args.command == "demo-synthetic":
        from .demo_synthetic import SyntheticDemoConfig, run_synthetic_demo

        report = run_synthetic_demo(_dataclass_from_args(SyntheticDemoConfig, args), progress=not args.no_progress)
        print(json.dumps(report, indent=2))
        print(f"\nFVU {report['fvu']:.4f} | L0 {report['l0']:.2f} | dead {report['dead_fraction']:.1%} | "
              f"planted-dictionary recovery (mean max cos) {report['recovery_mean_max_cos']:.3f} | "
              f"checkpoint {report['checkpoint']}")
        return 0
    if args.command == "train":
        from .trainer import TrainConfig, train

        configs = _sweep_configs(_dataclass_from_args(TrainConfig, args), args.sweep)
        saes = train(args.data, configs)
        for cfg, sae in zip(configs, saes):
            print(f"{cfg.run_name}: {sae.cfg.d_sae} latents -> {cfg.out_dir}/{cfg.run_name}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
