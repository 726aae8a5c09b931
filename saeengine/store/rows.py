"""Turning the rows given to ``ActivationWriter.add`` into checked storage arrays: activations
[n, d_in] (tensor or array, any device) into a CPU array of the store's dtype, refusing NaN,
inf and values the dtype would overflow to inf (NonFiniteError); image indices and
positions [n] into the int64 source columns, refusing floats, negatives, values beyond
int64 and image indices that have no path (InputError)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError, NonFiniteError
from .metadata import DTYPES, SOURCE_COLUMNS, StoreMetadata


def checked_rows(acts, image_index, position, meta: StoreMetadata, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """acts [n, d_in], image_index [n], position [n] -> (activations [n, d_in] in the raw
    storage dtype, sources [n, 2] of meta.source_dtype), both fresh CPU arrays.
    ``n_images``: the image paths named so far (0: none, so any image index is allowed).
    Raises InputError or NonFiniteError; the caller buffers nothing then."""
    rows = activation_rows(acts, meta.d_in)
    n = rows.shape[0]
    limit = int(np.iinfo(meta.source_dtype).max)
    sources = np.empty((n, SOURCE_COLUMNS), dtype=meta.source_dtype)
    for col, (name, values) in enumerate((("image_index", image_index), ("position", position))):
        sources[:, col] = source_column(name, values, n, limit)
    if n and n_images and int(sources[:, 0].max()) >= n_images:
        raise InputError(f"image_index {int(sources[:, 0].max())} has no image path: {n_images} paths were "
                         "added; call add_image_paths() for an image before adding its tokens")
    return storage_array(rows, meta.dtype, sources), sources


def activation_rows(acts, d_in: int) -> torch.Tensor:
    """[n, d_in] floating tensor (any device) or array -> a detached tensor. Raises InputError."""
    if isinstance(acts, np.ndarray):
        if acts.dtype.kind != "f":
            raise InputError(f"activations must be floating point, got a numpy {acts.dtype} array; "
                             "convert them with .astype(np.float32)")
        acts = torch.from_numpy(acts)
    if not isinstance(acts, torch.Tensor):
        raise InputError(f"activations must be a torch.Tensor or numpy array [n, {d_in}], got {type(acts).__name__}")
    if acts.dim() != 2 or acts.shape[1] != d_in:
        raise InputError(f"activations must be [n, {d_in}] (the store's d_in), got {tuple(acts.shape)}")
    if not acts.is_floating_point():
        raise InputError(f"activations must be floating point, got {acts.dtype}; convert them with .float()")
    return acts.detach()


def source_column(name: str, values, n: int, limit: int) -> np.ndarray:
    """image_index or position: [n] integers in [0, limit]. Raises InputError."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values).reshape(-1)
    if array.shape[0] != n:
        raise InputError(f"{name} has {array.shape[0]} entries for {n} activation rows; give one {name} per row")
    if n == 0:
        return array.astype(np.int64)
    if array.dtype.kind not in "iu":
        what = ("too large for int64, or not numbers" if array.dtype.kind == "O"
                else f"e.g. {array[0]!r}; a float would be truncated")
        raise InputError(f"{name} must be integers, got {array.dtype} ({what}); pass an integer array")
    low, high = array.min(), array.max()
    if low < 0:
        first = int(np.argmax(array < 0))
        raise InputError(f"{name} must be >= 0, got {low} ({int((array < 0).sum())} negative entries, first at row "
                         f"{first})")
    if high > limit:
        raise InputError(f"{name} {high} is too large: the store's source columns hold at most {limit}")
    return array.astype(np.int64)


def wider_dtypes(dtype: str) -> list[str]:
    top = torch.finfo(DTYPES[dtype][1]).max
    wider = [name for name, (_, t) in DTYPES.items() if torch.finfo(t).max > top]
    return sorted(wider, key=lambda name: DTYPES[name][0].itemsize)  # the smallest that fits first


def storage_array(rows: torch.Tensor, dtype: str, sources: np.ndarray) -> np.ndarray:
    """A tensor [n, d] (any device) -> a fresh CPU numpy array in the store's raw dtype;
    refuses non-finite values and values the dtype would turn into inf (NonFiniteError)."""
    np_dtype, torch_dtype = DTYPES[dtype]
    stored = rows.to(torch_dtype)  # on the caller's device: a GPU casts fast and sends half the bytes
    if rows.numel():
        low, high = torch.aminmax(stored)  # one fast pass; NaN and inf propagate
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            refuse_non_finite(rows.cpu(), stored.cpu(), dtype, sources)
    stored = stored.to("cpu").contiguous()
    if stored.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr():
        stored = stored.clone()  # never buffer a view of the caller's memory: they may reuse it
    if dtype == "bfloat16":
        stored = stored.view(torch.int16)
    return stored.numpy().view(np_dtype)


def refuse_non_finite(rows: torch.Tensor, stored: torch.Tensor, dtype: str, sources: np.ndarray) -> None:
    """Raise NonFiniteError naming how many rows are bad, the first one's source, the fix."""
    given_bad = ~torch.isfinite(rows).all(dim=1)
    bad = given_bad if bool(given_bad.any()) else ~torch.isfinite(stored).all(dim=1)
    first = int(bad.nonzero()[0, 0])
    where = (f"{int(bad.sum())} of {rows.shape[0]} rows (first: row {first}, image {sources[first, 0]}, "
             f"position {sources[first, 1]})")
    if bool(given_bad.any()):
        raise NonFiniteError(f"the activations hold NaN or inf in {where}; the store refuses non-finite values "
                             "(they would poison training). Find what produced them (e.g. an fp16 overflow in "
                             "the backbone: run it in float32) or drop those rows before add()")
    peak = float(rows[bad].abs().max())
    wider = wider_dtypes(dtype)
    fix = f"record with dtype={' or '.join(repr(w) for w in wider)}" if wider else "scale the activations down"
    raise NonFiniteError(f"the activations overflow {dtype} in {where}: max |value| {peak:.6g} is above "
                         f"{dtype}'s largest {torch.finfo(DTYPES[dtype][1]).max:.6g}, so they would be stored as "
                         f"inf; {fix}")
