"""The activation store's on-disk format: metadata, file names, dtypes, checksums.

A store is a directory::

    meta.json            StoreMetadata: what was recorded, the committed shards, the image
                         paths' committed length, the recorder's progress, the content hash,
                         and a checksum of meta.json itself
    shard-00000.bin      activations [tokens, d_in], raw little-endian, row-major
    shard-00000.src      int64 [tokens, 2]: (image index, position) of every token
    ...
    images.jsonl         optional: one JSON string per line, the path of image 0, 1, 2...
    .lock                held (flock) by the writer while it runs

Format version 2 (this one) widened the source columns from int32 to int64 (image indices
above 2^31 wrapped in version 1) and added ``images``, ``progress`` and ``checksum``.
Version 1 stores still read (int32 sources, no checksum of meta.json: there only the
content hash of a finished store catches an edit of its identity fields); they cannot be
continued by this writer.

A commit writes a shard's files under ``*.partial`` names, flushes them to disk and
renames them, appends the new image paths to images.jsonl (flushed), and only then
replaces meta.json atomically: meta.json is the commit point. A killed writer leaves every
listed shard whole; an unlisted shard file or an images.jsonl tail beyond the committed
length is an unfinished commit that a resumed writer discards. ``complete`` turns true,
and the content hash appears, when the writer closes.

``checksum`` is a blake2b digest of every other field of meta.json (canonical JSON), so any
edit of the metadata, also one that keeps the files' byte sizes (d_in and dtype swapped),
is caught on open without reading the shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_write_bytes
from .._hashing import hash_files
from ..errors import StoreCorruptError, StoreError, StoreIncompleteError  # noqa: F401  (re-exported)

FORMAT = "saeengine-activations"
VERSION = 2
META_FILE = "meta.json"
IMAGES_FILE = "images.jsonl"
SOURCE_COLUMNS = 2  # (image index, position)
# Source columns per format version: int32 wrapped above 2^31 images, hence int64 from version 2.
SOURCE_DTYPES = {1: np.dtype("<i4"), 2: np.dtype("<i8")}

# Storage dtype name -> (numpy dtype of the raw file, torch dtype seen by readers).
# numpy has no bfloat16: such shards hold its raw 16-bit patterns as uint16.
DTYPES = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
}

_HEX_DIGEST = re.compile(r"[0-9a-f]{32}")
_REPAIR = "the metadata is damaged or was edited: restore the original meta.json or re-record the store"


def digest() -> "hashlib._Hash":
    """The hash used for shards, image paths, meta.json and the content hash."""
    return hashlib.blake2b(digest_size=16)


EMPTY_DIGEST = digest().hexdigest()


def canonical_json(value) -> bytes:
    """One byte string per JSON value (sorted keys, no spaces, no NaN): what checksums hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclasses.dataclass
class ShardInfo:
    name: str          # file stem: <name>.bin and <name>.src
    tokens: int
    blake2b: str       # hex digest of the .bin then the .src bytes


@dataclasses.dataclass
class ImagesInfo:
    """The committed part of images.jsonl: ``count`` lines, ``bytes`` bytes, their digest."""

    count: int = 0
    bytes: int = 0
    blake2b: str = EMPTY_DIGEST


@dataclasses.dataclass
class StoreMetadata:
    """What a store holds. ``extra`` is free-form JSON (the recording config...);
    ``progress`` is the recorder's JSON bookkeeping as of the last commit."""

    d_in: int
    dtype: str
    backbone: str = ""
    layer: str = ""
    token_kind: str = ""
    extra: dict = dataclasses.field(default_factory=dict)
    shards: list[ShardInfo] = dataclasses.field(default_factory=list)
    complete: bool = False
    content_hash: str | None = None
    images: ImagesInfo = dataclasses.field(default_factory=ImagesInfo)
    progress: dict = dataclasses.field(default_factory=dict)
    version: int = VERSION

    @property
    def n_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0].itemsize

    @property
    def source_dtype(self) -> np.dtype:
        return SOURCE_DTYPES[self.version]

    def identity(self) -> dict:
        """The fields that say what was recorded (the content hash covers them)."""
        return {"d_in": self.d_in, "dtype": self.dtype, "backbone": self.backbone, "layer": self.layer,
                "token_kind": self.token_kind, "extra": self.extra}

    def compute_content_hash(self) -> str:
        """A digest of what the store holds: identity, every shard's digest, the image paths.
        Not the progress: a resumed recording has the same content as an uninterrupted one."""
        h = digest()
        if self.version == 1:
            h.update(json.dumps(self.identity(), sort_keys=True).encode())
        else:
            h.update(canonical_json({"identity": self.identity(), "source_dtype": self.source_dtype.name,
                                     "images": dataclasses.asdict(self.images)}))
        for shard in self.shards:
            h.update(f"{shard.tokens}:{shard.blake2b}".encode())
        return h.hexdigest()

    def _body(self) -> dict:
        return {"format": FORMAT, "version": self.version, "d_in": self.d_in, "dtype": self.dtype,
                "source_dtype": self.source_dtype.name, "backbone": self.backbone, "layer": self.layer,
                "token_kind": self.token_kind, "extra": self.extra,
                "shards": [dataclasses.asdict(s) for s in self.shards], "n_tokens": self.n_tokens,
                "images": dataclasses.asdict(self.images), "progress": self.progress, "complete": self.complete,
                "content_hash": self.content_hash}

    def to_json(self) -> str:
        if self.version != VERSION:
            raise StoreError(f"this saeengine writes store format version {VERSION} only, not {self.version}")
        body = self._body()
        body["checksum"] = _checksum(body)
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def read(cls, directory: Path) -> "StoreMetadata":
        """Parse and check meta.json: every field's type and range, the totals, the content
        hash of a finished store and (version 2) the checksum. Raises StoreError."""
        path = Path(directory) / META_FILE
        if not path.is_file():
            raise StoreError(f"{directory} is not an activation store: {META_FILE} is missing")
        try:
            body = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreCorruptError(f"{path} is not valid JSON ({exc}); {_REPAIR}") from exc
        return _parse(body, path)

    def write(self, directory: Path) -> None:
        atomic_write_bytes(Path(directory) / META_FILE, self.to_json().encode())


def _checksum(body: dict) -> str:
    h = digest()
    h.update(canonical_json({k: v for k, v in body.items() if k != "checksum"}))
    return h.hexdigest()


def _bad(path: Path, field: str, value, expected: str) -> StoreCorruptError:
    return StoreCorruptError(f"{path}: field {field!r} is {value!r}, expected {expected}; {_REPAIR}")


def _int(path: Path, body: dict, field: str, low: int, where: str = ""):
    value = body.get(field)
    if type(value) is not int or value < low:  # bool is an int subclass: excluded on purpose
        raise _bad(path, where + field, value, f"an integer >= {low}")
    return value


def _str(path: Path, body: dict, field: str, where: str = "") -> str:
    value = body.get(field)
    if not isinstance(value, str):
        raise _bad(path, where + field, value, "a string")
    return value


def _exact_keys(path: Path, body: dict, keys: set[str], where: str) -> None:
    if set(body) != keys:
        unknown, missing = sorted(set(body) - keys), sorted(keys - set(body))
        raise StoreCorruptError(f"{path}: {where or 'meta.json'} has unknown fields {unknown} and lacks "
                                f"{missing}; {_REPAIR}")


_V2_KEYS = {"format", "version", "d_in", "dtype", "source_dtype", "backbone", "layer", "token_kind", "extra",
            "shards", "n_tokens", "images", "progress", "complete", "content_hash", "checksum"}


def _parse(body, path: Path) -> StoreMetadata:
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        found = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise StoreError(f"{path} is not a saeengine activation store (format={found!r})")
    version = body.get("version")
    if type(version) is not int or version not in SOURCE_DTYPES:
        hint = "upgrade saeengine" if type(version) is int and version > VERSION else _REPAIR
        raise StoreError(f"{path} has format version {version!r}; this saeengine reads versions "
                         f"{sorted(SOURCE_DTYPES)} ({hint})")
    if version >= 2:
        _exact_keys(path, body, _V2_KEYS, "")
    d_in = _int(path, body, "d_in", 1)
    dtype = body.get("dtype")
    if dtype not in DTYPES:
        raise _bad(path, "dtype", dtype, f"one of {sorted(DTYPES)}")
    described = body if version >= 2 else {f: body.get(f, "") for f in ("backbone", "layer", "token_kind")}
    text = {f: _str(path, described, f) for f in ("backbone", "layer", "token_kind")}
    extra = body.get("extra", {})
    if not isinstance(extra, dict):
        raise _bad(path, "extra", extra, "a JSON object")
    shards = body.get("shards")
    if not isinstance(shards, list):
        raise _bad(path, "shards", shards, "a list")
    infos = []
    for i, shard in enumerate(shards):
        where = f"shards[{i}]."
        if not isinstance(shard, dict):
            raise _bad(path, f"shards[{i}]", shard, "an object with name, tokens, blake2b")
        _exact_keys(path, shard, {"name", "tokens", "blake2b"}, f"shards[{i}]")
        if shard["name"] != f"shard-{i:05d}":
            raise _bad(path, where + "name", shard["name"], f"'shard-{i:05d}' (shards are numbered in order)")
        tokens = _int(path, shard, "tokens", 1, where)
        if not isinstance(shard["blake2b"], str) or not _HEX_DIGEST.fullmatch(shard["blake2b"]):
            raise _bad(path, where + "blake2b", shard["blake2b"], "32 hex digits")
        infos.append(ShardInfo(shard["name"], tokens, shard["blake2b"]))
    complete = body.get("complete")
    if not isinstance(complete, bool):
        raise _bad(path, "complete", complete, "true or false")
    meta = StoreMetadata(d_in=d_in, dtype=dtype, extra=extra, shards=infos, complete=complete, version=version,
                         **text)
    if body.get("n_tokens") != meta.n_tokens:
        raise _bad(path, "n_tokens", body.get("n_tokens"), f"{meta.n_tokens}, the sum of the shards' tokens")
    if version >= 2:
        if body["source_dtype"] != meta.source_dtype.name:
            raise _bad(path, "source_dtype", body["source_dtype"], f"{meta.source_dtype.name!r}")
        meta.images = _parse_images(path, body["images"])
        if not isinstance(body["progress"], dict):
            raise _bad(path, "progress", body["progress"], "a JSON object")
        meta.progress = body["progress"]
    if version >= 2:  # before the content hash: an edit is best named as an edit
        try:
            expected = _checksum(body)
        except ValueError as exc:  # NaN somewhere: not what the writer wrote
            raise _bad(path, "checksum", body["checksum"], f"a checksum of valid JSON ({exc})") from exc
        if body["checksum"] != expected:
            raise StoreCorruptError(f"{path} was changed after it was written (its checksum {body['checksum']!r} "
                                    f"does not match its content {expected!r}); {_REPAIR}")
    content_hash = body.get("content_hash")
    if complete:
        if content_hash != meta.compute_content_hash():
            raise _bad(path, "content_hash", content_hash,
                       f"{meta.compute_content_hash()!r}, the hash of the metadata and shard checksums")
        meta.content_hash = content_hash
    elif content_hash is not None:
        raise _bad(path, "content_hash", content_hash, "null while the store is incomplete")
    return meta


def _parse_images(path: Path, images) -> ImagesInfo:
    if not isinstance(images, dict):
        raise _bad(path, "images", images, "an object with count, bytes, blake2b")
    _exact_keys(path, images, {"count", "bytes", "blake2b"}, "images")
    count = _int(path, images, "count", 0, "images.")
    size = _int(path, images, "bytes", 0, "images.")
    if (count == 0) != (size == 0) or size < 3 * count:  # each line holds at least '""\n'
        raise _bad(path, "images.bytes", size, f"a size that fits {count} image paths")
    if not isinstance(images["blake2b"], str) or not _HEX_DIGEST.fullmatch(images["blake2b"]):
        raise _bad(path, "images.blake2b", images["blake2b"], "32 hex digits")
    return ImagesInfo(count, size, images["blake2b"])


def shard_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return Path(directory) / f"{name}.bin", Path(directory) / f"{name}.src"


def file_digest(*paths: Path) -> str:
    """The store's digest of the files' bytes, in order (a shard's .bin then .src)."""
    return hash_files(*paths, new=digest)
