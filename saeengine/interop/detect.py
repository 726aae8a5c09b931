"""Which format a path holds: each format module's cheap ``detect`` (file names and, at
most, a small JSON's keys; no tensor is read), asked in turn.

Formats, by the ``format=`` name of :func:`saeengine.SAE.from_pretrained`:
"saeengine" (this library's own checkpoint), "saelens", "sparsify" (this package's
:mod:`.saelens`, :mod:`.sparsify`), "saev", "dictionary_learning", "overcomplete"
(:mod:`.saev`, :mod:`.dictionary_learning`, :mod:`.overcomplete`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

from ..checkpoint_format import CONFIG_FILE, FORMAT, WEIGHTS_FILE
from ..errors import CheckpointError

FORMATS = ("saeengine", "saelens", "sparsify", "saev", "dictionary_learning", "overcomplete")


class _Native:
    """saeengine's own checkpoint (saeengine.checkpoint) in the format-module protocol."""

    NAME = "saeengine"

    @staticmethod
    def detect(path: Path) -> bool:
        config = path / CONFIG_FILE
        if not (path.is_dir() and config.is_file() and (path / WEIGHTS_FILE).is_file()):
            return False
        try:
            return json.loads(config.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    @staticmethod
    def may_be(path: Path) -> bool:
        """A damaged saeengine checkpoint (its file names, unreadable config), or one of its
        files: loading it gives the checkpoint's own precise error."""
        if path.is_file():
            return path.name in (CONFIG_FILE, WEIGHTS_FILE)
        return path.is_dir() and ((path / CONFIG_FILE).exists() or (path / WEIGHTS_FILE).exists())

    @staticmethod
    def load(path: Path, *, hookpoint=None, device="cpu"):
        from ..checkpoint import load_sae

        if hookpoint is not None:
            raise CheckpointError(f"{path}: a saeengine checkpoint holds one SAE; drop hookpoint={hookpoint!r}")
        return load_sae(path, device).eval()  # from_pretrained gives inference SAEs (BatchTopK thresholds)

    @staticmethod
    def save(sae, directory: Path) -> Path:
        from ..checkpoint import save_sae

        return save_sae(sae, directory)


def format_module(name: str):
    """The module (or object) implementing format ``name``; CheckpointError for an
    unknown name, or one whose module is not installed in this build."""
    if name == "saeengine":
        return _Native
    if name not in FORMATS:
        raise CheckpointError(f"format={name!r} is unknown; choose one of {('auto',) + FORMATS}")
    try:
        return importlib.import_module(f"saeengine.interop.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"saeengine.interop.{name}":
            raise
        raise CheckpointError(f"format={name!r}: its reader (saeengine.interop.{name}) is not part of this "
                              "saeengine build") from None


def available() -> list[tuple[str, ModuleType | type]]:
    """(name, module) of every format whose reader is present."""
    found = []
    for name in FORMATS:
        try:
            found.append((name, format_module(name)))
        except CheckpointError:
            continue
    return found


def detect_formats(path: Path) -> list[str]:
    """The formats whose ``detect`` accepts ``path`` (a folder or a file)."""
    path = Path(path)
    return [name for name, module in available() if module.detect(path)]


def _listing(path: Path) -> str:
    if path.is_dir():
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        return f"it holds {names[:20]}{' ...' if len(names) > 20 else ''}"
    return "it is a file"


def detect_format(path: Path) -> str:
    """The one format of ``path``; CheckpointError when none or several match (the
    message lists them and the ``format=`` to pass)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    found = detect_formats(path)
    if len(found) == 1:
        return found[0]
    if not found and _Native.may_be(path):
        return "saeengine"  # its loader names the missing, truncated or edited file
    if not found:
        raise CheckpointError(f"{path}: no known SAE format found ({_listing(path)}); the formats read are "
                              f"{list(FORMATS)}. Pass the folder that the library saved (for sparsify, its "
                              "run folder or one hookpoint's), or format= to see that format's own error")
    raise CheckpointError(f"{path}: ambiguous: it holds files of several formats {found} ({_listing(path)}); "
                          f"pass one explicitly, e.g. SAE.from_pretrained(path, format={found[0]!r}), or "
                          "keep one SAE per folder")
