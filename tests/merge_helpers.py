"""Shared by the record and encode command-line tests under torchrun's environment: rank 0's
merge made slower than the collective timeout (no rank may wait in a collective while rank 0
merges), and the command's arguments parsed as the CLI parses them."""

from __future__ import annotations

import argparse
import os
import time

MERGE_SLOWER_S = 5.0  # longer than the collective timeout below
TIMEOUT_S = "4"


def slow_merges(module) -> None:
    """In this (spawned) process: SAEENGINE_DIST_TIMEOUT_S=TIMEOUT_S, and
    ``module.merge_parts`` MERGE_SLOWER_S slower (as slow as a merge of a big output)."""
    os.environ["SAEENGINE_DIST_TIMEOUT_S"] = TIMEOUT_S
    real = module.merge_parts

    def slow(*args):
        time.sleep(MERGE_SLOWER_S)
        return real(*args)

    module.merge_parts = slow


def cli_args(add_parser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the subcommand parser that ``add_parser(subparsers)`` adds."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(argv)
