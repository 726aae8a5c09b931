"""The activation store's on-disk format: metadata, file names, dtypes, atomic writes.

A store is a directory::

    meta.json            StoreMetadata: what was recorded, the finished shards, the content hash
    shard-00000.bin      activations [tokens, d_in], raw little-endian, row-major
    shard-00000.src      int32 [tokens, 2]: (image index, position) of every token
    ...

A shard's files are written under ``*.partial`` names, flushed to disk, renamed, and only
then listed in meta.json (itself replaced atomically). A killed writer therefore leaves
every listed shard whole; anything unlisted is an unfinished shard that a resumed writer
discards. ``complete`` turns true, and the content hash appears, when the writer closes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_write_bytes

FORMAT = "saeengine-activations"
VERSION = 1
META_FILE = "meta.json"
SOURCE_COLUMNS = 2  # (image index, position)

# Storage dtype name -> (numpy dtype of the raw file, torch dtype seen by readers).
# numpy has no bfloat16: such shards hold its raw 16-bit patterns as uint16.
DTYPES = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
}


class StoreError(RuntimeError):
    """A store on disk is missing, damaged or does not match its metadata."""


class StoreIncompleteError(StoreError):
    """The writer of this store did not finish (killed, or still running)."""


@dataclasses.dataclass
class ShardInfo:
    name: str          # file stem: <name>.bin and <name>.src
    tokens: int
    blake2b: str       # hex digest of the .bin then the .src bytes


@dataclasses.dataclass
class StoreMetadata:
    """What a store holds. ``extra`` is free-form JSON (the recording config, image list...)."""

    d_in: int
    dtype: str
    backbone: str = ""
    layer: str = ""
    token_kind: str = ""
    extra: dict = dataclasses.field(default_factory=dict)
    shards: list[ShardInfo] = dataclasses.field(default_factory=list)
    complete: bool = False
    content_hash: str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"store dtype {self.dtype!r} is not supported; use one of {sorted(DTYPES)}")
        if int(self.d_in) < 1:
            raise ValueError(f"store d_in must be >= 1, got {self.d_in}")
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]

    @property
    def n_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0].itemsize

    def identity(self) -> dict:
        """The fields that say what was recorded (the content hash covers them)."""
        return {"d_in": self.d_in, "dtype": self.dtype, "backbone": self.backbone, "layer": self.layer,
                "token_kind": self.token_kind, "extra": self.extra}

    def compute_content_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self.identity(), sort_keys=True).encode())
        for shard in self.shards:
            h.update(f"{shard.tokens}:{shard.blake2b}".encode())
        return h.hexdigest()

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self), "n_tokens": self.n_tokens}
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def read(cls, directory: Path) -> "StoreMetadata":
        path = Path(directory) / META_FILE
        if not path.is_file():
            raise StoreError(f"{directory} is not an activation store: {META_FILE} is missing")
        try:
            body = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} is not valid JSON ({exc}); the store's metadata is damaged") from exc
        if body.get("format") != FORMAT:
            raise StoreError(f"{path} is not a saeengine activation store (format={body.get('format')!r})")
        if body.get("version") != VERSION:
            raise StoreError(f"{path} has format version {body.get('version')}; this saeengine reads {VERSION}")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in fields})

    def write(self, directory: Path) -> None:
        atomic_write_bytes(Path(directory) / META_FILE, self.to_json().encode())


def shard_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return Path(directory) / f"{name}.bin", Path(directory) / f"{name}.src"


def file_digest(*paths: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
