"""Images to record: list a folder or read a file list, then decode one image at a time.

What is read, and how (the documented behaviour):

- A folder is listed recursively (class subfolders included, symlinked folders followed
  once), sorted by relative path component by component. Every suffix that Pillow can
  decode counts as an image (``image_suffixes()``: .jpg, .png, .tif/.tiff, .webp, .bmp,
  .gif, ...); other files are skipped with a warning that names how many and their suffixes.
- A text file is a file list: one path per line, relative to the list's folder (or
  absolute); blank lines and lines starting with ``#`` are ignored. Every listed file must
  exist.
- A Python list holds paths, PIL images or arrays (HxW or HxWxC, C in 1, 3, 4).
- Each image file is recorded under its path: relative to the folder; as written in a file
  list; relative to the common folder of a Python list of paths. A list with in-memory
  images records no paths.
- Decoding gives 8-bit RGB. 16-bit images (I;16, uint16 arrays) are scaled by 255/65535.
  32-bit int (I) and float (F) images: floats within [0, 1] are scaled by 255; otherwise
  the first of [0, 255] (kept) or [0, 65535] (scaled by 255/65535) holding every value;
  else the image's own min..max is stretched to 0..255. Alpha is dropped (LA, RGBA, PA,
  palette transparency), as the models' own preprocessors do; CMYK, 1-bit, L and palette
  images convert to RGB. Multi-frame files (GIF, TIFF stacks) give their first frame.
- A file that cannot be decoded (truncated, not an image) raises :class:`InputError`
  naming the file.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePath

import numpy as np
import torch

from ..errors import InputError


@functools.cache
def image_suffixes() -> frozenset[str]:
    """Lower-case suffixes of the formats this Pillow can decode (identify-only and stub
    plugins, such as HDF5 or MPEG, excluded: they cannot give pixels)."""
    from PIL import EpsImagePlugin, Image, ImageFile

    Image.init()
    readable = set()
    for suffix, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        if factory is None or fmt in ("MPEG", "IPTC") or (isinstance(factory, type) and issubclass(
                factory, ImageFile.StubImageFile)):
            continue
        if fmt == "EPS" and not EpsImagePlugin.has_ghostscript():
            continue
        readable.add(suffix.lower())
    return frozenset(readable)


def _is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_suffixes()


def list_image_folder(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursive), sorted by relative path; warns about the
    files it skips. Raises InputError when there is none."""
    found: list[Path] = []
    skipped: collections.Counter[str] = collections.Counter()
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop: read each folder once
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        for name in filenames:
            if _is_image_file(name):
                found.append(Path(dirpath, name))
            else:
                skipped[os.path.splitext(name)[1].lower() or "(no suffix)"] += 1
    found.sort(key=lambda p: p.relative_to(folder).parts)
    described = ", ".join(f"{suffix} ({count})" for suffix, count in sorted(skipped.items()))
    if not found:
        raise InputError(f"{folder} holds no images that Pillow reads (searched its subfolders too"
                         + (f"; skipped {sum(skipped.values())} other files: {described})" if skipped else ")")
                         + "; pass a folder of .jpg/.png/.tif/... files or a text file listing them")
    if skipped:
        warnings.warn(f"{folder}: skipped {sum(skipped.values())} files that are not images Pillow reads: "
                      f"{described}", UserWarning, stacklevel=3)
    return found


def read_file_list(path: Path) -> tuple[list[Path], list[str]]:
    """A text file, one image path a line -> (files, the paths as written). Relative paths
    are relative to the list's folder. Raises InputError naming a missing file and its line."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a text file listing image paths ({exc}); pass a folder of images, "
                         "or a text file with one image path a line") from exc
    files, names = [], []
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        file = path.parent / entry
        if not file.is_file():
            raise InputError(f"{path}, line {number}: {entry} ({file}) does not exist or is not a file; fix the "
                             "list (relative paths are relative to the list's folder)")
        files.append(file)
        names.append(PurePath(os.path.normpath(entry)).as_posix())
    if not files:
        raise InputError(f"{path} lists no images: write one image path a line")
    return files, names


def _uint8_from_values(values: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """A real-valued array -> uint8, by the rule in this module's docstring."""
    if sixteen_bit:
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    floating = np.issubdtype(values.dtype, np.floating)
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("it holds NaN or infinite pixel values")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if floating and lo >= 0 and hi <= 1:
        values = values * 255
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        values = values * (255 / 65535)
    else:
        values = (values - lo) * (255 / (hi - lo))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def array_to_rgb(array: np.ndarray):
    """An HxW or HxWxC (C in 1, 3, 4) array of any real dtype -> RGB PIL image."""
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise ValueError(f"its shape is {tuple(array.shape)}; images are HxW or HxWxC arrays with C in 1, 3, 4")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise ValueError(f"its dtype is {array.dtype}; pass real-valued pixels")
    pixels = _uint8_from_values(np.asarray(array), sixteen_bit=array.dtype == np.uint16)
    return Image.fromarray(pixels[:, :, :3] if pixels.ndim == 3 else pixels).convert("RGB")


def to_rgb(image):
    """A PIL image of any mode -> 8-bit RGB, by the rule in this module's docstring."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        return array_to_rgb(np.asarray(image).astype(np.uint16))
    if mode in ("I", "F"):
        return array_to_rgb(np.asarray(image))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the palette's transparency is dropped with the alpha
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"Pillow cannot convert its mode {mode} to RGB ({exc}); convert it to RGB first") from exc


def decode_file(path: Path):
    """Read one image file fully -> 8-bit RGB PIL image; InputError naming the file if it
    cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a resize
            return to_rgb(image)  # leaving the block closes only the file, not the decoded pixels
    except MemoryError:  # the machine, not the file: never a skippable "unreadable image"
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types for damaged files
        raise InputError(f"{path}: cannot read the image ({type(exc).__name__}: {exc}); replace or remove the "
                         "file, or skip unreadable images (skip_unreadable=True, CLI --skip-unreadable)") from exc


class ImageSource(Sequence):
    """The images of a recording, decoded one at a time when indexed.

    images: a folder, a text file listing image paths, or a list of paths, PIL images or
    arrays (see this module's docstring). ``source[i]`` is image i as 8-bit RGB PIL image;
    ``names`` the paths relative to ``root`` (None when some image is not a file).
    Only the list of paths is held in memory, never the pixels of more than one image.
    """

    def __init__(self, images):
        from PIL import Image

        self.root: Path | None = None
        self.names: list[str] | None = None
        if isinstance(images, (str, os.PathLike)):
            path = Path(images)
            if path.is_dir():
                self.items: list = list_image_folder(path)
                self.root = path
                self.names = [p.relative_to(path).as_posix() for p in self.items]
            elif path.is_file():
                if _is_image_file(path.name):
                    raise InputError(f"{path} is one image file; pass the folder that holds the images, a text "
                                     "file listing image paths (one a line), or a list of files")
                self.items, self.names = read_file_list(path)
                self.root = path.parent
            else:
                raise InputError(f"{path} does not exist: pass a folder of images, a text file listing image "
                                 "paths (one a line), or a list of images")
        elif isinstance(images, (Image.Image, np.ndarray, torch.Tensor)) or not hasattr(images, "__iter__"):
            raise InputError(f"images is one {type(images).__name__}; pass a list of images (e.g. list(array) "
                             "for an [N, H, W, C] array), a folder, or a file list")
        else:
            self.items = [Path(item) if isinstance(item, (str, os.PathLike)) else item for item in images]
            paths = [item for item in self.items if isinstance(item, Path)]
            for i, item in enumerate(self.items):
                if isinstance(item, Path) and not item.is_file():
                    raise InputError(f"image {i}: {item} does not exist or is not a file")
            if paths and len(paths) == len(self.items):
                self.root = Path(os.path.commonpath([str(p.absolute().parent) for p in paths]))
                self.names = [os.path.relpath(p.absolute(), self.root).replace(os.sep, "/") for p in paths]
        if not self.items:
            raise InputError("nothing to record: the list of images is empty")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self.items[i]
        if isinstance(item, Path):
            return decode_file(item)
        if not isinstance(item, (np.ndarray, Image.Image)):
            raise InputError(f"image {i} is a {type(item).__name__}; images are paths, PIL images or HxW / HxWxC "
                             "arrays (a CHW tensor t: t.permute(1, 2, 0).numpy())")
        try:
            return array_to_rgb(item) if isinstance(item, np.ndarray) else to_rgb(item)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InputError(f"image {i} ({type(item).__name__}) cannot be used: {exc}") from exc

    def name(self, i: int) -> str:
        """How image i is recorded: its relative path, or ``#i`` for an in-memory image."""
        return self.names[i] if self.names is not None else f"#{i}"

    def fingerprint(self) -> str:
        """A hash of what is recorded: the relative paths (not the files' bytes, so a
        repaired file can be resumed) or, for in-memory images, the pixels."""
        h = hashlib.blake2b(digest_size=16)
        if self.names is not None:
            for name in self.names:
                h.update(name.encode() + b"\0")
            return h.hexdigest()
        for item in self.items:
            h.update(str(item).encode() + b"\0" if isinstance(item, Path) else _pixel_bytes(item))
        return h.hexdigest()


def _pixel_bytes(item) -> bytes:
    if isinstance(item, np.ndarray):
        return f"{item.dtype}{item.shape}".encode() + np.ascontiguousarray(item).tobytes()
    if hasattr(item, "tobytes") and hasattr(item, "mode"):  # a PIL image
        return f"{item.mode}{item.size}".encode() + item.tobytes()
    return repr(item).encode()
