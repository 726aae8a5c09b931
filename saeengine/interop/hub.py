"""Hugging Face Hub ids ("org/repo") resolved from the local cache only, offline by default.

``resolve("org/repo")`` looks in the hub cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub,
else ~/.cache/huggingface/hub) for ``models--org--repo/snapshots/<commit>/`` and returns
that folder (or a subfolder: "org/repo/sub/dir"; a revision: "org/repo@rev"). Nothing is
downloaded unless ``allow_download=True`` is passed, which calls
``huggingface_hub.snapshot_download`` (network). A repo not in the cache raises
CheckpointError naming the local path looked at and both ways out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_ID = re.compile(rf"^(?P<org>{_PART})/(?P<name>{_PART})(?P<sub>(/{_PART})*)(@(?P<rev>[A-Za-z0-9._/-]+))?$")


def cache_dir() -> Path:
    """The hub cache folder huggingface_hub uses (same environment variables)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def parse_repo_id(text: str) -> tuple[str, str, str | None] | None:
    """("org/repo", subfolder ("" for none), revision or None), or None when ``text`` is
    not shaped like a hub id (a local path never reaches here: callers try it first)."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return None
    found = _REPO_ID.match(text)
    if found is None:
        return None
    return f"{found['org']}/{found['name']}", found["sub"].lstrip("/"), found["rev"]


def _snapshot(repo_dir: Path, revision: str | None) -> Path | None:
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
        return snapshots / commit if (snapshots / commit).is_dir() else None
    if revision is not None:  # a commit hash given directly
        return snapshots / revision if (snapshots / revision).is_dir() else None
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    return found[0] if len(found) == 1 else None


def resolve(repo_id: str, *, allow_download: bool = False, hookpoint: str | None = None) -> Path:
    """The local folder of a hub id (see the module docstring). ``hookpoint`` limits a
    download to that subfolder (a sparsify repo holds one per hookpoint)."""
    parsed = parse_repo_id(repo_id)
    if parsed is None:
        raise CheckpointError(f"{repo_id!r}: neither an existing local path nor a Hugging Face id 'org/repo'")
    repo, sub, revision = parsed
    repo_dir = cache_dir() / ("models--" + repo.replace("/", "--"))
    snapshot = _snapshot(repo_dir, revision)
    if snapshot is None and allow_download:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{repo_id!r}: allow_download=True needs huggingface_hub "
                                  "(pip install huggingface_hub)") from None
        inner = "/".join(part for part in (sub, hookpoint) if part)
        patterns = [f"{inner}/*"] if inner else None
        snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                          cache_dir=str(cache_dir())))
    if snapshot is None:
        where = repo_dir / "snapshots"
        extra = ""
        if where.is_dir() and any(where.iterdir()):
            extra = (f" (it holds snapshots {sorted(p.name for p in where.iterdir())} but no refs/"
                     f"{revision or 'main'}: give one as '{repo}@<commit>')")
        raise CheckpointError(f"{repo_id!r}: no such local path, and not in the local Hugging Face cache as a hub "
                              f"id: looked for {where}/<commit>/"
                              f"{extra}. Pass the local folder that holds the SAE instead, or allow a download "
                              f"with from_pretrained({repo_id!r}, allow_download=True) (network; huggingface_hub); "
                              "HF_HUB_CACHE chooses the cache")
    target = snapshot / sub if sub else snapshot
    if not target.exists():
        raise CheckpointError(f"{repo_id!r}: the cached snapshot {snapshot} has no {sub!r}; it holds "
                              f"{sorted(p.name for p in snapshot.iterdir())[:20]}")
    return target
