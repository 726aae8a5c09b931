"""Drop-in loading and export of other libraries' SAEs.

:func:`from_pretrained` (also :meth:`saeengine.SAE.from_pretrained`) reads a folder, a
file or a Hugging Face id ("org/repo", from the local cache only unless
``allow_download=True``), detects its format (:mod:`.detect`) and converts it exactly:
the saeengine SAE reproduces the peer's codes (the same active latents, values and
reconstructions within fp32 rounding), or a CheckpointError names the file, the field and
what to do. Nothing is ever loaded approximately. :func:`save` writes a peer's layout.

Format modules (one per library) expose ``NAME``, ``detect(path) -> bool``,
``load(path, *, hookpoint, device) -> SAE`` and, for the exportable ones,
``save(sae, directory) -> Path``. docs/interop.md has the table of formats, their
architectures and what is refused.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .detect import FORMATS, detect_format, detect_formats, format_module

__all__ = ["FORMATS", "detect_format", "detect_formats", "format_module", "from_pretrained", "save"]


def _local_path(path_or_repo, allow_download: bool, hookpoint: str | None = None) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    from . import hub

    text = str(path_or_repo)
    if hub.parse_repo_id(text) is None:
        raise CheckpointError(f"{text}: does not exist: not a directory, a file, or a Hugging Face id 'org/repo'; "
                              "pass the SAE's folder (SAE.save's, or the one another library saved)")
    return hub.resolve(text, allow_download=allow_download, hookpoint=hookpoint)


def from_pretrained(path_or_repo, *, format: str = "auto", hookpoint: str | None = None, device="cpu",
                    allow_download: bool = False):
    """An SAE from any supported format (see the module docstring).

    path_or_repo: a local folder or file, or a hub id "org/repo[/subfolder][@revision]".
    format: "auto" (detect) or one of :data:`FORMATS`.
    hookpoint: which SAE of a multi-SAE folder (sparsify's run folders: the hookpoint's
        subfolder name, e.g. "layers.3"); None when the folder holds one.
    device: where the SAE's tensors go.
    allow_download: let a hub id missing from the cache be downloaded (network).

    Returns the SAE in eval mode (inference: BatchTopK thresholds); ``sae.train()`` to train it.
    """
    path = _local_path(path_or_repo, allow_download, hookpoint)
    name = detect_format(path) if format == "auto" else format
    module = format_module(name)
    return module.load(path, hookpoint=hookpoint, device=device)


def save(sae, directory, format: str = "saeengine") -> Path:
    """Write ``sae`` in ``format``'s own layout to ``directory``; CheckpointError when
    that format cannot hold it (the message says why)."""
    module = format_module(format)
    if not hasattr(module, "save"):
        raise CheckpointError(f"format={format!r} is read-only in saeengine (no export); export to 'saeengine', "
                              "'saelens' or 'sparsify'")
    return module.save(sae, Path(directory))
