"""Recording over several ranks into ONE recording folder, equal to a single-process one.

``record_distributed`` is :func:`saeengine.backbones.record_activations` run by every rank
of a torch.distributed world on its own part of the images:

1. every rank lists the images and checks the settings; one ``all_gather_object``
   compares them (backbone name and weights fingerprint, layers, keep, dtype, batch and
   shard sizes, image size, the image list's count and fingerprint, out_dir, ...): a
   ConfigError names each differing field and the ranks holding each value;
2. rank r records images ``[lo_r, hi_r)`` (contiguous, in order, whole batches of
   ``batch_size``: the batches a single process forms, so every row is the same bits)
   with the unchanged single-process code into ``<out_dir>.parts/rank-<r>-of-<W>/``, a
   resumable recording folder of its own whose stores keep every image's global path;
3. after an ``all_gather_object`` of every rank's outcome (a failing rank fails them all,
   with the same error class, none is left waiting; the last collective: the other ranks
   return None here, so none waits in a collective, whose timeout the merge could pass,
   while rank 0 merges), rank 0 merges the parts into ``<out_dir>.parts/merged/``: per
   layer, the shards a single process would have cut (its rule replayed on the parts'
   token counts: a shard is committed after the batch that fills ``shard_tokens``, and
   after the last batch) from the parts' shard files, **hard-linked** where a part shard
   is exactly such a shard and copied where the part boundaries split one (only around
   each part boundary, or everywhere when the parts' shard rhythm differs); the ``.src``
   files rewritten with global image indices; images.jsonl concatenated; meta.json with
   the single-process identity (``extra`` with the global image count and fingerprint),
   progress, shard list and content hash; recording.json with the global settings;
4. rank 0 renames ``merged/`` to ``out_dir`` (one atomic rename), then removes the parts.

The parts folder carries a marker (``.saeengine-parts.json``): a ``<out_dir>.parts`` folder
without it, or holding files of its own, is refused (InputError) and never deleted. The
merge reads the parts' sources one output shard at a time (its memory does not grow with
the recording).

The result equals the single-process recording of the same images: rows, sources, image
paths, meta.json fields (content hash included) and recording.json.

Crash safety: until the rename, ``out_dir`` does not exist (nothing reads as a
recording); the parts are never modified by the merge (links, not moves), so a kill at
any point loses at most the merge, and a rerun with ``resume=True`` continues every
rank's part from its last commit (single-process resume) and merges again. A kill after
the rename leaves the finished recording; the rerun removes the leftover parts.

All ranks must see the same filesystem at ``out_dir`` (one node, or a shared file
system): rank 0 reads every part.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch.distributed as dist

from .._atomic import atomic_write_bytes, fsync_directory
from ..errors import ConfigError, InputError, StoreError
from ..store.metadata import (IMAGES_FILE, SOURCE_COLUMNS, ImagesInfo, ShardInfo, StoreMetadata, digest,
                              file_digest, shard_paths)
from ..store.reader import check_shard_files
from ..store.writer import _write_durably
from . import comm
from .mesh import Mesh, MeshSpec, check_same_config

PARTS_SUFFIX = ".parts"
MERGED = "merged"
PARTS_MARKER = ".saeengine-parts.json"  # what makes a <out>.parts folder ours (deletable)
PART_NAME = re.compile(r"rank-(\d+)-of-(\d+)")
_OURS = re.compile(r"rank-\d+-of-\d+|merged|\.lock|" + re.escape(PARTS_MARKER) + r"|\..+\.tmp-[0-9a-f]+")
_CHUNK_ROWS = 1 << 16  # rows copied at a time when a shard must be cut from several part shards

__all__ = ["check_parts_folder", "claim_parts", "merge_parts", "named_out_dir", "part_dir", "part_ranges",
           "parts_dir", "rank_world", "record_distributed", "remove_parts", "run_record_distributed", "shard_cycle",
           "single_process_shards", "slice_inputs", "split_images"]


# ----- ranks and parts ------------------------------------------------------------------------
def rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, world size): torch.distributed's when it is initialized (given values must
    agree), else (0, 1). InputError for a world > 1 without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        actual = dist.get_rank(), dist.get_world_size()
        if (rank is not None and rank != actual[0]) or (world is not None and world != actual[1]):
            raise InputError(f"rank={rank}, world={world} were given, but torch.distributed says rank {actual[0]} "
                             f"of {actual[1]}; leave them out (None) to use torch.distributed's")
        return actual
    if (world or 1) > 1 or (rank or 0) != 0:
        launch = f"torchrun --nproc-per-node {world}" if world else "torchrun --nproc-per-node <ranks>"
        raise InputError(f"rank={rank}, world={world} need torch.distributed: launch with {launch} (or call "
                         "torch.distributed.init_process_group first), or leave rank and world out for one process")
    return 0, 1


def part_ranges(n_items: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Rank r's images ``[lo, hi)``: contiguous, in order, whole batches of ``batch_size``
    (the last may be short); the first ``n_batches % world`` ranks take one batch more.
    Ranks past the number of batches get an empty range."""
    n_batches = -(-n_items // batch_size)
    per, extra = divmod(n_batches, world)
    out, start = [], 0
    for r in range(world):
        stop = start + per + (r < extra)
        out.append((min(start * batch_size, n_items), min(stop * batch_size, n_items)))
        start = stop
    return out


def shard_cycle(tokens_per_image: dict[str, int], batch_size: int, shard_tokens: int) -> int:
    """Batches after which every layer's single-process store has just committed a shard,
    for images of a fixed number of tokens per layer: each layer commits every
    ceil(shard_tokens / (batch_size x tokens)) batches; the cycle is their lcm."""
    cycle = 1
    for tokens in tokens_per_image.values():
        cycle = math.lcm(cycle, -(-shard_tokens // (batch_size * tokens)))
    return cycle


def split_images(n_items: int, batch_size: int, world: int, cycle: int | None) -> list[tuple[int, int]]:
    """The ranks' image ranges: whole shard cycles when there are at least ``world`` of them
    (every part then starts where a single-process shard starts, so the merge links every
    shard file and copies none), else whole batches (the merge copies the shards that
    straddle a part boundary)."""
    n_batches = -(-n_items // batch_size)
    if cycle and n_batches // cycle >= world:
        return part_ranges(n_items, batch_size * cycle, world)
    return part_ranges(n_items, batch_size, world)


def _probe_tokens(backbone, items, layers: list[str], kwargs: dict) -> dict[str, int] | None:
    """Tokens per image at each layer, from a recording of image 0 alone with the
    single-process code (in a temporary folder); None when the backbone's layout is not
    fixed or image 0 cannot be read."""
    from ..backbones import record_activations

    if not getattr(backbone, "fixed_layout", False):
        return None
    first = slice_inputs(items, 0, 1)
    with tempfile.TemporaryDirectory(prefix="saeengine-probe-") as tmp:
        try:
            stores = record_activations(_PartInputs(backbone, first), first, layers, Path(tmp) / "probe",
                                        **{**kwargs, "batch_size": 1, "skip_unreadable": False}, progress=False)
        except InputError:
            return None
        tokens = {layer: int(StoreMetadata.read(path).n_tokens) for layer, path in stores.items()}
    return tokens if all(tokens.values()) else None


def named_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; InputError when it names no folder ("." or "..": the parts
    live beside it, ``<name>.parts``, and the merge ends with a rename onto it)."""
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".", ".."):
        raise InputError(f"out_dir {str(out_dir)!r} does not name a folder: the ranks' parts go beside it, into "
                         "<name>.parts; give the output folder by name (e.g. out_dir='acts', or '../acts')")
    return out_dir


def parts_dir(out_dir: Path) -> Path:
    """Where the ranks' parts and the merge in progress live: a sibling of out_dir (the
    merge ends with one rename of a folder beside out_dir onto out_dir)."""
    out_dir = named_out_dir(out_dir)
    return out_dir.with_name(out_dir.name + PARTS_SUFFIX)


def part_dir(out_dir: Path, rank: int, world: int) -> Path:
    return parts_dir(out_dir) / f"rank-{rank}-of-{world}"


def _marker(kind: str) -> dict:
    return {"format": f"saeengine-distributed-{kind}-parts", "version": 1}


def check_parts_folder(parts: Path, kind: str) -> list[int] | None:
    """The world sizes of the parts in ``parts`` (a ``kind`` = "record" / "encode" parts
    folder made by :func:`claim_parts`), None when there is no such folder. An empty folder
    is one whose claim was interrupted. InputError for a folder this code did not make (no
    marker, another kind's marker, or files of its own): it is never used nor deleted."""
    if not parts.is_dir():
        if parts.exists():
            raise InputError(f"{parts} is a file, where the ranks' parts go; move it away")
        return None
    entries = list(parts.iterdir())
    if not entries:
        return []
    marker = parts / PARTS_MARKER
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        found = None
    foreign = sorted(p.name for p in entries if not _OURS.fullmatch(p.name))
    if found != _marker(kind) or foreign:
        why = (f"it holds {foreign[:3]}" if foreign and found == _marker(kind) else
               f"it has no {PARTS_MARKER} of a distributed {kind}")
        raise InputError(f"{parts} exists but is not the parts folder of a distributed {kind} ({why}); it is left "
                         "as it is: move it away, or choose another output folder")
    return sorted({int(m.group(2)) for p in entries if (m := PART_NAME.fullmatch(p.name))})


def claim_parts(parts: Path, kind: str) -> None:
    """Create ``parts`` with its marker (every rank, before writing its part: the marker is
    in place before any part is; each rank writes the same bytes, atomically)."""
    parts.mkdir(parents=True, exist_ok=True)
    marker = parts / PARTS_MARKER
    if not marker.exists():
        atomic_write_bytes(marker, json.dumps(_marker(kind)).encode())
        fsync_directory(parts)


def remove_parts(parts: Path, kind: str) -> bool:
    """Delete ``parts`` if this code made it (:func:`check_parts_folder`); a folder that is
    not ours is left with a warning. Returns whether it was removed (or absent)."""
    try:
        check_parts_folder(parts, kind)
    except InputError as exc:
        warnings.warn(f"not removing it: {exc}", stacklevel=2)
        return False
    if parts.exists():
        marker = parts / PARTS_MARKER
        for entry in parts.iterdir():  # the marker last: a kill half-way leaves a folder still ours
            if entry != marker:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        marker.unlink(missing_ok=True)
        parts.rmdir()
    return True


class _PartInputs:
    """The backbone, seen by record_activations as if its inputs were one rank's part:
    ``load_inputs`` returns the part (already loaded); everything else is the backbone's."""

    def __init__(self, backbone, part):
        self._backbone, self._part = backbone, part

    def load_inputs(self, images):
        return self._part

    def __getattr__(self, name):
        return getattr(self._backbone, name)


def slice_inputs(items, lo: int, hi: int):
    """Images (or prompts) ``lo..hi-1`` of what backbone.load_inputs returned, recorded under
    the same paths as in the whole list (an ImageSource keeps its root and names)."""
    from ..backbones.images import ImageSource

    if isinstance(items, ImageSource):
        part = ImageSource.__new__(ImageSource)
        part.root = items.root
        part.items = items.items[lo:hi]
        part.names = None if items.names is None else items.names[lo:hi]
        return part
    return items[lo:hi]


# ----- the recording ----------------------------------------------------------------------------
def record_distributed(backbone, images, layers: Sequence[str], out_dir: str | Path, *,
                       keep: Sequence[str] = ("patch",), batch_size: int = 32, dtype: str = "float16",
                       shard_tokens: int = 1 << 18, progress: bool = True, stop_early: bool = True,
                       resume: bool = False, skip_unreadable: bool = False, rank: int | None = None,
                       world: int | None = None) -> dict[str, Path] | None:
    """:func:`~saeengine.backbones.record_activations` over the ranks of torch.distributed:
    every rank calls it with the same arguments. Rank 0 merges the parts and returns
    {layer as given: store directory} once the merged recording is in ``out_dir``; the
    other ranks return None as soon as every part is recorded (they wait in no collective
    while rank 0 merges, which can take longer than the collective timeout). One process
    (no torch.distributed, or a world of 1): exactly record_activations.

    ``resume=True`` continues an interrupted distributed recording (each rank's part from
    its last commit, then the merge), or returns a finished one with the same settings.
    Needs the same world size as the interrupted run (InputError otherwise).
    """
    asked, (rank, world) = (rank, world), rank_world()
    kwargs = dict(keep=keep, batch_size=batch_size, dtype=dtype, shard_tokens=shard_tokens, stop_early=stop_early,
                  skip_unreadable=skip_unreadable)
    if world == 1:
        from ..backbones import record_activations

        rank_world(*asked)  # InputError for a rank or world this process does not have

        return record_activations(backbone, images, layers, out_dir, progress=progress, resume=resume, **kwargs)
    # The first collective, cheap: every rank is here, so rank 0 is past the merge of an
    # earlier call and every rank sees the folders as they are now; a wrong rank or world
    # given on one rank fails every rank.
    comm.agreed(lambda: (rank_world(*asked), named_out_dir(out_dir)), "starting", label="start")
    prepared = comm.agreed(lambda: _prepare(backbone, images, layers, out_dir, resume, world, **kwargs),
                           "checking the settings", label="status")
    check_same_config(Mesh(MeshSpec(data=world, latent=1), rank, rank, 0), prepared.fields, "recording setting")
    if not prepared.done:
        comm.agreed(lambda: _record_part(backbone, prepared, rank, world, progress and rank == 0, **kwargs),
                    f"recording the parts in {parts_dir(prepared.out_dir)}", label="status")
    # The last collective: from here rank 0 works alone (the merge), the others are done.
    if rank != 0:
        return None
    _finish(prepared)
    return {given: prepared.out_dir / layer for given, layer in prepared.layer_names.items()}


@dataclasses.dataclass
class _Prepared:
    out_dir: Path
    items: object
    layer_names: dict[str, str]
    settings: dict          # the single-process recording.json settings of all the images
    ranges: list            # every rank's images [lo, hi)
    fields: dict            # what the ranks must agree on
    done: bool              # out_dir already holds the finished recording


def _prepare(backbone, images, layers, out_dir: Path, resume: bool, world: int, *, keep, batch_size, dtype,
             shard_tokens, stop_early, skip_unreadable) -> _Prepared:
    from ..backbones.recording_settings import (RECORDING_FILE, check_arguments, check_out_dir, check_same_settings,
                                                settings_of)

    out_dir = named_out_dir(out_dir)
    layer_names, keep = check_arguments(backbone, layers, keep, batch_size, dtype, shard_tokens)
    check_out_dir(out_dir, resume)
    items = backbone.load_inputs(images)
    if len(items) == 0:
        raise InputError("nothing to record: no images (or prompts)")
    settings = settings_of(backbone, items, layer_names, keep, dtype, batch_size, shard_tokens)
    done = (out_dir / RECORDING_FILE).exists()
    if done:  # resume=True (check_out_dir): the merge renamed its result here, or one process recorded here
        check_same_settings(out_dir, settings)
        unfinished = [layer for layer in layer_names.values() if not _complete(out_dir / layer)]
        if unfinished:
            raise ConfigError(f"out_dir {out_dir} holds an unfinished single-process recording (layers {unfinished} "
                              "are not complete); continue it with one process (record_activations(..., "
                              "resume=True)), or record into a new folder")
    else:
        _check_parts(out_dir, resume, world)
    ranges = []
    if not done:
        probe_kwargs = {"keep": keep, "dtype": dtype, "shard_tokens": shard_tokens, "stop_early": stop_early}
        tokens = _probe_tokens(backbone, items, list(layer_names.values()), probe_kwargs)
        cycle = None if tokens is None else shard_cycle(tokens, batch_size, shard_tokens)
        ranges = split_images(len(items), batch_size, world, cycle)
    fields = {**settings, "out_dir": str(out_dir.resolve()), "resume": resume, "stop_early": stop_early,
              "skip_unreadable": skip_unreadable, "world": world, "ranges": ranges, "done": done}
    return _Prepared(out_dir, items, layer_names, settings, ranges, fields, done)


def _complete(store_dir: Path) -> bool:
    try:
        return StoreMetadata.read(store_dir).complete
    except StoreError:
        return False


def _check_parts(out_dir: Path, resume: bool, world: int) -> None:
    parts = parts_dir(out_dir)
    worlds = check_parts_folder(parts, "record")
    if worlds is None:
        return
    if not resume:
        raise ConfigError(f"{parts} holds the parts of an interrupted distributed recording into {out_dir}; pass "
                          f"resume=True (CLI: --resume) to continue it, or delete {parts} to start over")
    if worlds and worlds != [world]:
        raise InputError(f"{parts} holds the parts of a recording by {worlds[0]} ranks, but this run has {world}; "
                         f"resume it with {worlds[0]} ranks (torchrun --nproc-per-node {worlds[0]}), or delete "
                         f"{parts} to record over again with {world}")


def _record_part(backbone, prepared: _Prepared, rank: int, world: int, progress: bool, **kwargs) -> None:
    from ..backbones import record_activations

    claim_parts(parts_dir(prepared.out_dir), "record")
    lo, hi = prepared.ranges[rank]
    if hi == lo:  # more ranks than batches: this one has nothing to record
        return
    part = slice_inputs(prepared.items, lo, hi)
    # resume=True always: a new part starts empty, an interrupted one continues (the
    # parts folder only exists with resume=True, _check_parts).
    record_activations(_PartInputs(backbone, part), part, list(prepared.layer_names.values()),
                       part_dir(prepared.out_dir, rank, world), progress=progress, resume=True, **kwargs)


def _finish(prepared: _Prepared) -> None:
    """Rank 0: merge the parts (unless out_dir holds the result already), then remove them."""
    if not prepared.done:
        merge_parts(prepared.out_dir, prepared.settings, prepared.items, prepared.ranges)
    remove_parts(parts_dir(prepared.out_dir), "record")


# ----- the merge ------------------------------------------------------------------------------
@dataclasses.dataclass
class _Part:
    """One rank's store of one layer: its images [lo, hi) of the whole list."""

    directory: Path
    lo: int
    hi: int
    meta: StoreMetadata


def merge_parts(out_dir: Path, settings: dict, items, ranges: list[tuple[int, int]]) -> None:
    """Merge the ranks' parts into ``<out_dir>.parts/merged`` and rename it to ``out_dir``.

    ``settings``: the single-process recording.json settings of ``items`` (all the images);
    ``ranges``: rank r recorded images [lo, hi) = ranges[r] into part_dir(out_dir, r, W).
    A merge killed at any point leaves the parts as they were and no ``out_dir``; running
    it again starts the merge over."""
    from ..backbones.recording_settings import write_settings

    out_dir, parts = named_out_dir(out_dir), parts_dir(out_dir)
    staging = parts / MERGED
    if staging.exists():  # an earlier merge that did not finish: its files are links or copies
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    world = len(ranges)
    names = getattr(items, "names", None)
    for layer in settings["layers"]:
        layer_parts = [_open_part(part_dir(out_dir, r, world) / layer, lo, hi)
                       for r, (lo, hi) in enumerate(ranges) if hi > lo]
        _merge_layer(layer_parts, staging / layer, settings, in_memory=names is None)
    write_settings(staging, settings)
    fsync_directory(staging)
    if out_dir.exists():  # check_out_dir allowed it: empty, or only bookkeeping (a lock file)
        for leftover in out_dir.iterdir():
            leftover.unlink()
        out_dir.rmdir()
    os.rename(staging, out_dir)  # the commit point: from here on out_dir is the finished recording
    fsync_directory(out_dir.parent)


def _open_part(directory: Path, lo: int, hi: int) -> _Part:
    meta = StoreMetadata.read(directory)
    if not meta.complete:
        raise StoreError(f"{directory} (the part of images {lo}..{hi - 1}) is not finished; rerun the recording "
                         "with resume=True (CLI: --resume) to finish it")
    check_shard_files(directory, meta)
    return _Part(directory, lo, hi, meta)


@dataclasses.dataclass(frozen=True)
class _Span:
    """One part shard as the global rows [start, stop) of the concatenated parts."""

    start: int
    stop: int
    part: _Part
    shard: ShardInfo


def _part_sources(span: _Span, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) (global, within the span) of the span's .src, image indices made global:
    [hi - lo, 2] in the store's source dtype. Only these rows are read (the merge holds one
    output shard's sources at a time, not the recording's)."""
    meta = span.part.meta
    dtype = np.dtype(meta.source_dtype)
    src = shard_paths(span.part.directory, span.shard.name)[1]
    rows = np.fromfile(src, dtype=dtype, count=(hi - lo) * SOURCE_COLUMNS,
                       offset=(lo - span.start) * SOURCE_COLUMNS * dtype.itemsize).reshape(-1, SOURCE_COLUMNS)
    if len(rows) != hi - lo:
        raise StoreError(f"{src} holds fewer rows than its meta.json says; delete {span.part.directory} and rerun "
                         "with resume=True to record that part again")
    rows[:, 0] += span.part.lo
    return rows


def single_process_shards(tokens_per_batch: np.ndarray, shard_tokens: int) -> list[int]:
    """The shard sizes record_activations writes for batches of these token counts: it
    commits after each batch that brings its buffer to ``shard_tokens`` or more, and after
    the last batch (a commit of no rows writes no shard)."""
    sizes, buffered = [], 0
    last = len(tokens_per_batch) - 1
    for b, tokens in enumerate(tokens_per_batch.tolist()):
        buffered += tokens
        if buffered and (buffered >= shard_tokens or b == last):
            sizes.append(buffered)
            buffered = 0
    return sizes


def _merge_layer(parts: list[_Part], dest: Path, settings: dict, *, in_memory: bool) -> None:
    first = parts[0].meta
    for part in parts[1:]:
        for field in ("d_in", "dtype", "backbone", "layer", "token_kind"):
            if getattr(part.meta, field) != getattr(first, field):
                raise StoreError(f"the parts disagree on {field}: {getattr(first, field)!r} in {parts[0].directory}, "
                                 f"{getattr(part.meta, field)!r} in {part.directory}; delete "
                                 f"{parts[0].directory.parents[1]} and record again")
    n_items, batch_size = settings["images"]["count"], settings["batch_size"]
    # Every part shard as a global row range [start, stop), with its files.
    spans, start = [], 0
    for part in parts:
        for shard in part.meta.shards:
            spans.append(_Span(start, start + shard.tokens, part, shard))
            start += shard.tokens
    per_batch = np.zeros(-(-n_items // batch_size), dtype=np.int64)  # tokens of each single-process batch
    for span in spans:  # one part shard's sources at a time
        per_batch += np.bincount(_part_sources(span, span.start, span.stop)[:, 0] // batch_size,
                                 minlength=len(per_batch))
    sizes = single_process_shards(per_batch, settings["shard_tokens"])
    dest.mkdir()
    by_range = {(span.start, span.stop): span for span in spans}
    infos, row = [], 0
    for i, size in enumerate(sizes):
        name = f"shard-{i:05d}"
        bin_path, src_path = shard_paths(dest, name)
        sources = np.concatenate([_part_sources(span, max(span.start, row), min(span.stop, row + size))
                                  for span in spans if span.start < row + size and span.stop > row]
                                 ).astype(first.source_dtype, copy=False)
        found = by_range.get((row, row + size))
        if found is not None:
            h = _link_verified(found.part.directory, found.shard, bin_path)
        else:
            h = _copy_rows(spans, row, row + size, bin_path, first)
        _write_synced(src_path, sources)
        h.update(sources.tobytes())
        infos.append(ShardInfo(name=name, tokens=size, blake2b=h.hexdigest()))
        row += size
    images = _concat_images(parts, dest, n_items, in_memory)
    skipped = [_global_name(name, part.lo, in_memory)
               for part in parts for name in part.meta.progress.get("skipped", [])]
    extra = {**first.extra, "n_images": n_items, "images_fingerprint": settings["images"]["fingerprint"]}
    meta = StoreMetadata(d_in=first.d_in, dtype=first.dtype, backbone=first.backbone, layer=first.layer,
                         token_kind=first.token_kind, extra=extra, shards=infos, complete=True, images=images,
                         progress={"images_done": n_items, "skipped": skipped})
    meta.content_hash = meta.compute_content_hash()
    fsync_directory(dest)
    meta.write(dest)


def _global_name(name: str, lo: int, in_memory: bool) -> str:
    """A skipped image's name in the whole list: in-memory images are named "#<index>"."""
    if in_memory and name.startswith("#") and name[1:].isdigit():
        return f"#{int(name[1:]) + lo}"
    return name


def _link_verified(part_dir_: Path, shard: ShardInfo, bin_path: Path):
    """Hard-link the part shard's .bin (a copy where the file system has no hard links);
    returns the digest of its bytes so far, after checking the part shard's own checksum
    in the same read."""
    src_bin, src_src = shard_paths(part_dir_, shard.name)
    try:
        os.link(src_bin, bin_path)
    except OSError:
        shutil.copyfile(src_bin, bin_path)
        with open(bin_path, "rb+") as fh:
            os.fsync(fh.fileno())
    merged, own = digest(), digest()
    with open(bin_path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            merged.update(chunk)
            own.update(chunk)
    own.update(src_src.read_bytes())
    if own.hexdigest() != shard.blake2b:
        raise StoreError(f"{src_bin}: checksum mismatch, the part's shard changed after it was written; delete "
                         f"{part_dir_} and rerun with resume=True to record that part again")
    return merged


def _copy_rows(spans, start: int, stop: int, bin_path: Path, meta: StoreMetadata):
    """Write rows [start, stop) of the concatenated parts into a new .bin (the part shards
    they come from verified first); returns the digest of the bytes written."""
    row_bytes = meta.d_in * meta.itemsize
    h = digest()
    with open(bin_path, "wb") as out:
        for span in spans:
            a, b, directory, shard = span.start, span.stop, span.part.directory, span.shard
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            paths = shard_paths(directory, shard.name)
            if file_digest(*paths) != shard.blake2b:
                raise StoreError(f"{paths[0]}: checksum mismatch, the part's shard changed after it was written; "
                                 f"delete {directory} and rerun with resume=True to record that part again")
            with open(paths[0], "rb") as src:
                src.seek((lo - a) * row_bytes)
                left = (hi - lo) * row_bytes
                while left:
                    chunk = src.read(min(left, _CHUNK_ROWS * row_bytes))
                    out.write(chunk)
                    h.update(chunk)
                    left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h


def _write_synced(path: Path, data: np.ndarray) -> None:
    _write_durably(path, data)  # the store writer's write + fsync (a name the crash tests patch)


def _concat_images(parts: list[_Part], dest: Path, n_items: int, in_memory: bool) -> ImagesInfo:
    """images.jsonl of the whole list: the parts' committed lines, in order."""
    counts = [p.meta.images.count for p in parts]
    if not any(counts):
        return ImagesInfo()
    if in_memory or counts != [p.hi - p.lo for p in parts]:
        raise StoreError(f"the parts name {sum(counts)} images ({counts} per part) for {n_items} images; delete "
                         f"{parts[0].directory.parents[1]} and record again")
    h, size = digest(), 0
    with open(dest / IMAGES_FILE, "wb") as out:
        for part in parts:
            with open(part.directory / IMAGES_FILE, "rb") as src:
                data = src.read(part.meta.images.bytes)
            out.write(data)
            h.update(data)
            size += len(data)
        out.flush()
        os.fsync(out.fileno())
    return ImagesInfo(count=sum(counts), bytes=size, blake2b=h.hexdigest())




# ----- the command line ---------------------------------------------------------------------------
def run_record_distributed(args, load_backbone) -> int:
    """``torchrun --nproc-per-node N -m saeengine record ...``: the process group from
    torchrun's environment (saeengine.distributed.launch: NCCL and cuda:LOCAL_RANK with
    GPUs, gloo and the CPU without), every rank records its part, rank 0 merges and prints
    what saeengine record prints. ``load_backbone(args)``: cli_record's model loading."""
    from ..cli_record import place_backbone, report_recorded
    from .launch import distributed, world_from_env

    with distributed(f"data={world_from_env()}", args.device) as mesh:
        backbone = place_backbone(load_backbone(args), mesh.device, args)
        stores = record_distributed(backbone, args.images, args.layers, args.out_dir, keep=args.keep,
                                    batch_size=args.batch_size, dtype=args.dtype, shard_tokens=args.shard_tokens,
                                    progress=not args.no_progress, resume=args.resume,
                                    skip_unreadable=args.skip_unreadable)
        if mesh.rank != 0:
            return 0
        report_recorded(stores, backbone.name, args.out_dir, f" on {mesh.world_size} ranks")
    return 0
