"""How the command line fails: its exit codes, the usage error of a bad ``--sweep``, and an
error printed as one line ``<prog>: error: <message>`` (``--debug``: the traceback).

A deliberate saeengine error, a bad value, a missing file, a full disk or a missing
optional package is printed as its own message; an OSError without its ``[Errno N]``; an
out-of-memory error with what needs less memory; anything else is called a likely bug,
pointing at ``--debug``.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
import warnings
from typing import Iterator

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# Failures with a message meant for the user (a bad argument, a missing file, a full disk,
# a missing optional package): printed as one line, no traceback.
_FAILURES = (ValueError, OSError, ImportError)


class UsageError(ValueError):
    """A command line that can never be right (a bad ``--sweep``); printed as argparse prints
    usage errors, exit code 2."""


def one_line(text: object) -> str:
    """``str(text)`` with its lines joined by single spaces (blank lines dropped)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report(prog: str, err: BaseException, debug: bool) -> None:
    """Print ``err`` to stderr: its traceback when ``debug``, else one line naming it."""
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        return
    from .errors import SAEEngineError

    if isinstance(err, OSError) and err.strerror and not isinstance(err, SAEEngineError):
        message = f"{err.filename}: {err.strerror}" if err.filename else err.strerror  # no "[Errno 2]"
    elif isinstance(err, (SAEEngineError, *_FAILURES)):
        message = one_line(err) or type(err).__name__
    elif isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch's CUDA OOM
        message = f"out of memory: {one_line(err) or 'MemoryError'} (a smaller --batch-size or --d-sae needs less)"
    else:
        message = (f"{type(err).__name__}: {one_line(err)} (an unexpected error, likely a bug in saeengine; "
                   f"run with --debug for the traceback)")
    print(f"{prog}: error: {message}", file=sys.stderr)


@contextlib.contextmanager
def one_line_warnings(prog: str, debug: bool) -> Iterator[None]:
    """Inside the block, a warning prints as ``<prog>: warning: <message>`` on one line
    (``--debug``: Python's own format, with the file and line that warned)."""
    if debug:
        yield
        return
    before = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {one_line(message)}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = before
