"""Record a backbone's activations at several layers, in one forward pass per batch, into
activation stores (one per layer), with each token's image index and position.

Streaming and resumable. Images are decoded one at a time as each batch is built, so
memory does not grow with the number of images (buffers hold at most ``shard_tokens``
rows per layer, plus one batch). A recording folder holds::

    recording.json     the settings: backbone (name and a fingerprint of its weights),
                       layers, keep, dtype, batch size, shard size, image size, the images
    <layer>/           an activation store per layer (file paths in store.image_paths)
    .lock              held while a process records into the folder

Rows are committed at batch boundaries only: when a layer's buffer reaches
``shard_tokens`` and after the last batch, its store commits them as one shard together
with the batch's image paths and {"images_done": n, "skipped": [...]}. A killed
recording rerun with ``resume=True`` continues each store after its last commit and ends
with the same stores, content hashes included, as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .._lock import exclusive_lock
from ..errors import ConfigError, InputError, StoreError
from ..store import ActivationWriter
from ..store.metadata import StoreMetadata
from .base import Backbone
from .images import ImageSource
# check_out_dir, RECORDING_FILE and RECORDING_FORMAT stay importable from here, where they were defined
from .recording_settings import RECORDING_FILE, check_arguments, check_same_settings, settings_of, write_settings
from .recording_settings import RECORDING_FORMAT as RECORDING_FORMAT
from .recording_settings import check_out_dir as check_out_dir


class _StopForward(Exception):
    """Raised by the deepest layer's hook to end a forward pass early."""


@dataclasses.dataclass
class _LayerState:
    """One layer's store while recording."""

    directory: Path
    writer: ActivationWriter | None = None
    done: int = 0                  # images committed to the store
    buffered: int = 0              # rows added since the last commit
    pending_paths: list[str] = dataclasses.field(default_factory=list)  # named before the writer exists
    skipped: list[str] = dataclasses.field(default_factory=list)
    complete: bool = False


def record_activations(backbone: Backbone, images, layers: Sequence[str], out_dir: str | Path, *,
                       keep: Sequence[str] = ("patch",), batch_size: int = 32, dtype: str = "float16",
                       shard_tokens: int = 1 << 18, progress: bool = True, stop_early: bool = True,
                       resume: bool = False, skip_unreadable: bool = False) -> dict[str, Path]:
    """Write the tokens of ``keep`` kinds at every layer in ``layers`` to out_dir/<layer>/,
    an activation store each. Returns {layer as given: store directory}.

    Kinds: cls, register, patch (vision models); bos, text, eos, pad (text encoders);
    image, text, pad (multimodal LLMs). Each token's source is (image or prompt index,
    position); stores of files also keep each image's path relative to the root.
    images: a folder (recursive, sorted by relative path), a text file listing image paths,
    a list of files, or a list of PIL images / arrays (see backbones/images.py for what is
    read and how); for text and multimodal backbones, what their ``load_inputs`` takes.
    Runs on the backbone's device, under torch.no_grad, with one forward hook per layer.
    ``stop_early`` ends each forward pass at the deepest recorded block (of models whose
    blocks run in sequence), skipping the blocks and heads nobody reads.

    ``resume=True`` continues a killed recording in ``out_dir`` (or starts one there if it
    is empty); the settings must be those it was started with (DataMismatchError names
    any difference). ``skip_unreadable=True`` skips images that cannot be decoded, with a
    warning each: they keep their index and path but have no tokens, and are listed in
    each store's progress["skipped"]. Otherwise such an image raises InputError naming it.
    """
    layer_names, keep = check_arguments(backbone, layers, keep, batch_size, dtype, shard_tokens)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume)
    items = backbone.load_inputs(images)
    n = len(items)
    if n == 0:
        raise InputError("nothing to record: no images (or prompts)")
    settings = settings_of(backbone, items, layer_names, keep, dtype, batch_size, shard_tokens)
    with exclusive_lock(out_dir, "recording folder"):
        if resume and (out_dir / RECORDING_FILE).exists():
            check_same_settings(out_dir, settings)
            states = {layer: _reopen(out_dir / layer, n, batch_size) for layer in layer_names.values()}
        else:
            states = {layer: _LayerState(out_dir / layer) for layer in layer_names.values()}
        try:
            _record(backbone, items, states, keep, int(batch_size), dtype, int(shard_tokens), settings, out_dir,
                    progress=progress, stop_early=stop_early, resume=resume, skip_unreadable=skip_unreadable)
        finally:
            for state in states.values():  # leave unfinished stores resumable, and unlocked
                if state.writer is not None and not state.complete:
                    state.writer.abort()
    return {given: out_dir / layer for given, layer in layer_names.items()}


def _record(backbone: Backbone, items, states: dict[str, _LayerState], keep: tuple[str, ...], batch_size: int,
            dtype: str, shard_tokens: int, settings: dict, out_dir: Path, *, progress: bool, stop_early: bool,
            resume: bool, skip_unreadable: bool) -> None:
    n = len(items)
    names = getattr(items, "names", None)
    caught: dict[str, torch.Tensor] = {}
    deepest = [""]  # the block whose hook ends this batch's forward pass
    first = min((s.done for s in states.values() if not s.complete), default=n)
    seen_kinds: set[str] = set()

    def catch(module, inputs, output, layer):
        caught[layer] = backbone.to_tokens(output)
        if stop_early and layer == deepest[0]:
            raise _StopForward

    hooks = [backbone.layer_module(layer).register_forward_hook(
        lambda mod, inp, out, layer=layer: catch(mod, inp, out, layer)) for layer in states]
    bar = tqdm(total=n, initial=first, desc=f"record {backbone.name}", unit="image", disable=not progress)
    try:
        for start in range(first, n, batch_size):
            stop = min(start + batch_size, n)
            active = {layer: s for layer, s in states.items() if not s.complete and s.done < stop}
            try:
                indices, inputs, skipped = _batch_inputs(backbone, items, start, stop, skip_unreadable)
            except InputError as exc:
                raise InputError(f"{exc}. The recording so far is kept in {out_dir}: rerun with resume=True "
                                 "(CLI: --resume) to continue it") from exc
            if inputs is not None:
                caught.clear()
                deepest[0] = max(active, key=backbone.layer_index)
                with torch.no_grad():
                    try:
                        backbone.forward(backbone.inputs_to(inputs, backbone.device))
                    except _StopForward:
                        pass
            for layer, state in active.items():
                if names is not None:  # a token's image index must have its path first
                    state.pending_paths += names[start:stop]
                if inputs is not None:
                    if layer not in caught:
                        raise ConfigError(f"{backbone.name}: {layer} did not run in the forward pass, so it "
                                           "cannot be recorded; pick one of the blocks the model runs")
                    tokens = caught[layer]  # [B, T, d]
                    kinds = backbone.sample_token_kinds(inputs, tokens.shape[1])
                    seen_kinds.update(*kinds)
                    if backbone.fixed_layout and not any(kind in keep for kind in kinds[0]):
                        raise ConfigError(f"keep={list(keep)} matches none of {backbone.name}'s tokens, which are "
                                          f"of kinds {sorted(set(kinds[0]))}; keep one of those")
                    if state.writer is None:
                        if not (out_dir / RECORDING_FILE).exists():
                            write_settings(out_dir, settings)
                        state.writer = _new_writer(backbone, state.directory, layer, tokens, kinds, keep, dtype,
                                                   shard_tokens, settings, resume)
                    _flush_paths(state)
                    state.buffered += _add_tokens(state.writer, tokens, kinds, keep, torch.tensor(indices))
                state.skipped += skipped
                if state.writer is not None:
                    _flush_paths(state)
                    if state.buffered >= shard_tokens or stop == n:
                        state.writer.flush(progress={"images_done": stop, "skipped": state.skipped})
                        state.buffered, state.done = 0, stop
            bar.update(stop - start)
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
    for layer, state in states.items():
        if state.complete:
            continue
        if state.writer is None:
            raise InputError(f"no image could be read: all {n} were skipped as unreadable "
                             f"(e.g. {state.skipped[:3]})")
        if state.writer.n_tokens == 0:
            raise ConfigError(f"keep={list(keep)} matched no token of the {n} inputs at {layer}; their tokens are "
                              f"of kinds {sorted(seen_kinds) or 'unknown (none read in this run)'}")
        state.writer.close()
        state.complete = True
    skipped = max((s.skipped for s in states.values()), key=len)
    if skipped:
        warnings.warn(f"{len(skipped)} of {n} images could not be read and have no tokens: {skipped[:5]}"
                      f"{' ...' if len(skipped) > 5 else ''}", UserWarning, stacklevel=3)


def _flush_paths(state: _LayerState) -> None:
    if state.pending_paths:
        state.writer.add_image_paths(state.pending_paths)
        state.pending_paths = []


# ----- resuming ----------------------------------------------------------------------------
def _reopen(directory: Path, n: int, batch_size: int) -> _LayerState:
    """The state of one layer's store in a folder being resumed."""
    if not (directory / "meta.json").exists():
        return _LayerState(directory)
    if StoreMetadata.read(directory).complete:
        return _LayerState(directory, done=n, complete=True)
    writer = ActivationWriter(directory, resume=True, auto_shard=False)
    progress = writer.progress
    done = int(progress.get("images_done", 0))
    fits = done == n or (0 <= done < n and done % batch_size == 0)
    if (not progress and writer.meta.shards) or not fits or writer.n_images not in (0, done):
        writer.abort()
        raise StoreError(f"{directory}: its progress record ({progress}) does not fit {n} images in batches of "
                         f"{batch_size}; the store was not written by this recording: record into a new folder")
    return _LayerState(directory, writer=writer, done=done, skipped=list(progress.get("skipped", [])))


def _new_writer(backbone: Backbone, directory: Path, layer: str, tokens: torch.Tensor, kinds, keep, dtype: str,
                shard_tokens: int, settings: dict, resume: bool) -> ActivationWriter:
    extra = {"sequence_length": int(tokens.shape[1]), "token_kinds": kinds[0],
             "tokens_per_image": sum(kind in keep for kind in kinds[0]),
             "image_size": getattr(backbone, "image_size", None), "batch_size": settings["batch_size"],
             "n_images": settings["images"]["count"], "images_fingerprint": settings["images"]["fingerprint"]}
    return ActivationWriter(directory, d_in=tokens.shape[2], dtype=dtype, backbone=backbone.name, layer=layer,
                            token_kind="+".join(keep), extra=extra, shard_tokens=shard_tokens, resume=resume,
                            auto_shard=False)


# ----- one batch ---------------------------------------------------------------------------
def _batch_inputs(backbone: Backbone, items, start: int, stop: int, skip_unreadable: bool):
    """(indices of the inputs that were read, preprocessed inputs or None, names skipped).

    Images are decoded and preprocessed one at a time, so only one full-size image is
    in memory at once."""
    if not isinstance(items, ImageSource):
        return list(range(start, stop)), backbone.preprocess(items[start:stop]), []
    indices, parts, skipped = [], [], []
    for i in range(start, stop):
        try:
            image = items[i]
        except InputError as exc:
            if not skip_unreadable:
                raise
            warnings.warn(f"skipped: {exc}", UserWarning, stacklevel=4)
            skipped.append(items.name(i))
            continue
        parts.append(backbone.preprocess([image]))
        indices.append(i)
    if not parts:
        return indices, None, skipped
    if isinstance(parts[0], torch.Tensor):
        return indices, torch.cat(parts), skipped
    return indices, {key: torch.cat([p[key] for p in parts]) for key in parts[0]}, skipped


def _add_tokens(writer: ActivationWriter, tokens: torch.Tensor, kinds: list[list[str]], keep, index: torch.Tensor
                ) -> int:
    """Add the kept tokens of one batch: tokens [B, T, d], kinds [B][T], index [B] (image
    index of each sample). Returns the number of rows added."""
    added = 0
    # Image models share one layout per batch: one gather for all samples.
    layouts = [kinds[0]] if all(k == kinds[0] for k in kinds) else kinds
    for b, sample_kinds in enumerate(layouts):
        positions = torch.tensor([i for i, kind in enumerate(sample_kinds) if kind in keep], dtype=torch.long)
        samples = torch.arange(tokens.shape[0]) if len(layouts) == 1 else torch.tensor([b])
        if positions.numel():
            kept = tokens[samples.to(tokens.device)][:, positions.to(tokens.device)]
            writer.add(kept.reshape(-1, kept.shape[2]), index[samples].repeat_interleave(positions.numel()),
                       positions.repeat(samples.numel()))
            added += kept.shape[0] * kept.shape[1]
    return added
