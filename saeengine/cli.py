"""Command line: ``saeengine demo`` (the embedded default job), ``demo-synthetic``, ``train``,
``record`` (saeengine.cli_record), ``encode`` (saeengine.cli_encode), ``eval``
(saeengine.cli_eval), the first paper's tasks ``ood``, ``ontology``, ``steer``, ``attributes``,
``modality`` and the feature explorer ``explore`` (saeengine.cli_<verb>). This module builds
the parser and dispatches; the commands are in saeengine.cli_commands, their options in
cli_options, sweeps in cli_sweeps, and how failures print in cli_failures.

Options come from the fields of the config dataclasses; each field's docstring is its help.

Manners: a failure prints one line, ``saeengine <command>: error: <message>``, and exits 1;
a usage error (argparse, a bad ``--sweep``) prints one line and exits 2; Ctrl-C exits 130
with a line saying what was kept; ``--debug`` prints the traceback instead. An exception
that saeengine did not mean to raise (a bug) says so and points at ``--debug``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import sys
from typing import Any, Callable, Sequence

from .cli_commands import (final_metrics, interrupted_demo, interrupted_record, interrupted_train, run_demo,
                           run_demo_synthetic, run_train, train_configs)
from .cli_encode import add_encode_parser, interrupted_encode, run_encode
from .cli_eval import add_eval_parser, interrupted_eval, run_eval
from .cli_failures import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, UsageError, one_line, one_line_warnings, report
from .cli_options import FALSE_WORDS, TRUE_WORDS, add_dataclass_options, parse_value, train_choices
from .cli_sweeps import RUN_NAME_FIELDS, parse_sweeps, sweep_configs, unsweepable

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "RUN_NAME_FIELDS", "UsageError",
           "add_dataclass_options", "build_parser", "final_metrics", "main", "parse_sweeps", "parse_value",
           "sweep_configs", "train_configs", "unsweepable"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line that points at ``--help``, and that
    remembers its option strings (to suggest the closest one for a typo)."""

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.__dict__.setdefault("flags", []).extend(action.option_strings)
        return action

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


@dataclasses.dataclass(frozen=True)
class _Command:
    run: Callable[[argparse.Namespace], int]
    interrupted: Callable[[argparse.Namespace], str]
    any_arguments: bool = False  # the stand-in of a command that cannot load takes any


# The papers' evaluation tasks and the feature explorer, each in saeengine/cli_<verb>.py with
# add_parser(subparsers), run(args) -> exit code and interrupted(args) -> the line printed on Ctrl-C.
TASK_COMMANDS = ("ood", "ontology", "steer", "attributes", "modality", "explore")


def _record_command() -> tuple[Callable, Callable] | ImportError | None:
    """(add_record_parser, run_record) from saeengine.cli_record; None when that module does
    not exist, the ImportError when it exists but cannot be imported (a missing package)."""
    try:
        cli_record = importlib.import_module(f"{__package__}.cli_record")
    except ModuleNotFoundError as err:
        return None if err.name == f"{__package__}.cli_record" else err
    except ImportError as err:
        return err
    return cli_record.add_record_parser, cli_record.run_record


def _unavailable(err: ImportError) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise ImportError(f"the record command cannot be loaded: {one_line(err)} (pip install 'saeengine[vision]' "
                          f"installs what it needs)")
    return run


def _add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    if "--debug" not in getattr(parser, "flags", []):
        parser.add_argument("--debug", action="store_true", default=default,
                            help="print the full traceback of an error instead of one line")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig
    from .demo_synthetic import SyntheticDemoConfig
    from .trainer import TrainConfig

    parser = _Parser(prog="saeengine", description="Fast sparse autoencoders for vision models.",
                     epilog="Errors print one line (exit code 1; 2 for a usage error; 130 when interrupted); "
                            "--debug prints the traceback.")
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, _Command] = {}

    demo = sub.add_parser("demo", help="record EfficientNet-Lite0 features of bundled images, train an SAE, "
                                       "write an HTML report",
                          description="The embedded default job, offline: record EfficientNet-Lite0 features of "
                                      "the 5000 MNIST digits and the scikit-image photos, train a TopK SAE, print "
                                      "FVU, L0 and dead %, and write an HTML report of the strongest latents.")
    add_dataclass_options(demo, DemoConfig)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    commands["demo"] = _Command(run_demo, interrupted_demo)

    synthetic = sub.add_parser("demo-synthetic", help="train a TopK SAE on a planted sparse dictionary",
                               description="Train a TopK SAE on synthetic activations built from a planted sparse "
                                           "dictionary; print FVU, L0, dead fraction and dictionary recovery.")
    add_dataclass_options(synthetic, SyntheticDemoConfig)
    synthetic.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    commands["demo-synthetic"] = _Command(run_demo_synthetic, interrupted_demo)

    train = sub.add_parser("train", help="train an SAE (or a sweep) on an activation store",
                           description="Train SAEs on a recorded activation store and print each one's final "
                                       "FVU, L0 and dead % (of the last step) and its folder. Every SAE of a "
                                       "sweep reads the same batches. Re-running the same command resumes from "
                                       "the latest checkpoint in --out-dir.")
    train.add_argument("--data", required=True, help="activation store directory (see saeengine.store)")
    train.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2",
                       help="train one SAE per value (repeat for a grid over several fields), e.g. --sweep k=16,32 "
                            "--sweep auxk=true,false; separate values with ';' when they hold commas "
                            "(matryoshka_prefixes='8,64;16,64'). Booleans are true/false/1/0/yes/no. A field "
                            "swept is not also given as a flag. Settings of the whole run, and the name, are not "
                            f"swept: {', '.join(sorted(unsweepable()))}. Each SAE is named after its values: the "
                            "default name plus -<field><value> for each field the default name does not show "
                            "(it shows " + ", ".join(RUN_NAME_FIELDS) + "), or with --name PREFIX, "
                            "PREFIX-<field><value>...")
    add_dataclass_options(train, TrainConfig, train_choices())
    from .distributed.cli_per_rank import add_per_rank_options
    from .distributed.cli_train import add_mesh_options
    add_mesh_options(train)
    add_per_rank_options(train)
    commands["train"] = _Command(run_train, interrupted_train)

    record = _record_command()
    if isinstance(record, tuple):
        add_record_parser, run_record = record
        add_record_parser(sub)
        commands["record"] = _Command(run_record, interrupted_record)
    elif isinstance(record, ImportError):
        why = one_line(record)
        sub.add_parser("record", help=f"unavailable: {why}".replace("%", "%%"),
                       description=f"saeengine record cannot be loaded: {why}")
        commands["record"] = _Command(_unavailable(record), interrupted_record, any_arguments=True)

    add_encode_parser(sub)
    commands["encode"] = _Command(run_encode, interrupted_encode)

    add_eval_parser(sub)
    commands["eval"] = _Command(run_eval, interrupted_eval)

    for verb in TASK_COMMANDS:
        module = importlib.import_module(f"{__package__}.cli_{verb}")
        module.add_parser(sub)
        commands[verb] = _Command(module.run, module.interrupted)

    for name, command_parser in sub.choices.items():
        _add_debug(command_parser, argparse.SUPPRESS)  # --debug after the command as well
        command_parser.set_defaults(_parser=command_parser, _command=commands[name])
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    command = getattr(args, "_command", None)
    if extra and not (command and command.any_arguments):
        target = getattr(args, "_parser", parser)
        # argparse names no close match for a mistyped option: this does
        hints = [f"{word}: did you mean {close[0]}?" for word in (w.split("=")[0] for w in extra if w.startswith("--"))
                 for close in [difflib.get_close_matches(word, getattr(target, "flags", []), n=1)] if close]
        hints += [f"{word}: an on/off option takes no value (--x turns it on, --no-x off)" for word in extra
                  if word.lower() in TRUE_WORDS + FALSE_WORDS]
        target.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else ""))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse's usage errors raise SystemExit(2))."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # until the arguments are parsed
    prog, args = "saeengine", None
    try:
        parser = build_parser()
        args = _parse(parser, argv)
        prog, debug = args._parser.prog, args.debug
        try:
            with one_line_warnings(prog, debug):
                return args._command.run(args)
        except UsageError as err:
            args._parser.error(str(err))
    except KeyboardInterrupt as err:
        if debug:
            report(prog, err, debug)
        try:
            said = args._command.interrupted(args) if args is not None else "interrupted"
        except Exception:  # noqa: BLE001 - never let the note of an interrupt raise
            said = "interrupted"
        print(f"{prog}: {said}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every error becomes one line (or the traceback with --debug)
        report(prog, err, debug)
        return EXIT_FAILURE
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
