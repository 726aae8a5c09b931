"""Uploaded images: size-limited, decoded as images only (Pillow, formats listed below),
their dimensions checked from the header before any pixel is decoded (a decompression
bomb never gets to allocate), fully decoded once so a truncated file fails here, and kept
in memory (the most recent MAX_UPLOADS) under a random id. Nothing is written to disk and
nothing but Pillow's image decoders touches the bytes (no pickle, no archives)."""

from __future__ import annotations

import io
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
MAX_PIXELS = 40_000_000   # width x height
MAX_SIDE = 10_000
MAX_UPLOADS = 32
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


class TooLarge(InputError):
    """An upload over the byte limit: HTTP 413."""


@dataclass
class Upload:
    image: object        # PIL RGB image
    values: np.ndarray   # [T, w] code values of its tokens at the layer
    indices: np.ndarray  # [T, w]
    positions: np.ndarray  # [T]
    probs: np.ndarray | None  # clean class probabilities [C]


def decode(data: bytes):
    """Bytes -> a PIL RGB image, or InputError saying what is wrong with them."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("the upload is empty; send an image file (PNG, JPEG, ...) in the form field 'file'")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as found:
            width, height = found.size  # from the header: nothing decoded yet
            if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
                raise InputError(f"the image is {width}x{height} pixels; the explorer takes at most {MAX_SIDE} per "
                                 f"side and {MAX_PIXELS:,} in all: resize it first")
            found.load()  # a truncated file fails here (Pillow does not accept truncated images by default)
            return found.convert("RGB")
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at open, on the header's size
        found = re.search(r"\(([0-9]+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise InputError(f"the image has {size} (a decompression bomb?); the explorer takes at most {MAX_SIDE} "
                         f"pixels per side and {MAX_PIXELS:,} in all: resize it first") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"the upload is not an image Pillow reads as one of {', '.join(FORMATS)} ({exc}); send "
                         "a PNG or JPEG file") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or damaged
        raise InputError(f"the image cannot be decoded ({type(exc).__name__}: {exc}); the file is truncated or "
                         "damaged: send it again, whole") from exc


class Uploads:
    """The uploads kept in memory, by id (16 hex characters)."""

    def __init__(self):
        self._items: OrderedDict[str, Upload] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, upload: Upload) -> str:
        key = secrets.token_hex(8)
        with self._lock:
            self._items[key] = upload
            while len(self._items) > MAX_UPLOADS:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> Upload:
        with self._lock:
            if key not in self._items:
                raise KeyError(key)
            return self._items[key]
