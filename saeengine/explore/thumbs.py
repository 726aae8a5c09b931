"""Thumbnails: an image with one latent's heatmap in red (saeengine.report's rendering),
or plain. Each dataset thumbnail is made once and kept as a PNG file under
``DIR/explore-cache/thumbs-<pass>/`` (<pass>: a hash of the encode pass's SAE checksum
and store hash) (written atomically: a killed server leaves no half file),
with a small in-memory LRU in front; uploads' thumbnails live in memory only.

Names are built from checked integers (``<image>-<latent>.png``, ``<image>.png``), never
from request text, so a request cannot name a file outside the cache."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .._atomic import atomic_write_bytes

SIZE = 96  # thumbnail side in pixels
_MEMORY = 512  # thumbnails kept in memory


def render(image, heat: np.ndarray | None, size: int = SIZE) -> bytes:
    """PNG bytes: ``image`` (PIL, or None for a white square) resized to size x size, under
    ``heat`` [h, w] in red (None or all zero: no overlay), as saeengine.report draws them."""
    from PIL import Image

    base = (image if image is not None else Image.new("RGB", (size, size), (255, 255, 255)))
    base = base.convert("RGB").resize((size, size), Image.BILINEAR)
    if heat is not None and float(np.max(heat)) > 0:
        alpha = Image.fromarray((255 * heat / heat.max()).astype(np.uint8)).resize((size, size), Image.NEAREST)
        red = Image.new("RGB", (size, size), (255, 40, 40))
        base = Image.composite(red, base, alpha.point(lambda a: int(a * 0.6)))
    buf = io.BytesIO()
    base.save(buf, format="PNG")
    return buf.getvalue()


class Thumbs:
    """Dataset thumbnails by (image, latent | None), cached on disk and in memory.

    ``data``: ExploreData; ``images``: image i -> PIL image (or None: heatmaps on white);
    ``cache``: the folder the PNG files go to.
    """

    def __init__(self, data, images, cache: Path, size: int = SIZE, key: str = ""):
        # one folder per encode pass (key: its SAE checksum and store hash), so a folder
        # encoded again with another SAE never serves the old heatmaps
        self.data, self.images, self.size = data, images, size
        self.folder = Path(cache) / (f"thumbs-{key}" if key else "thumbs")
        self._memory: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, image: int, latent: int | None) -> Path:
        name = f"{int(image)}.png" if latent is None else f"{int(image)}-{int(latent)}.png"
        return self.folder / name

    def pixels(self, image: int):
        return None if self.images is None else self.images[int(image)]

    def png(self, image: int, latent: int | None) -> bytes:
        """PNG bytes of dataset image ``image`` (checked by the caller) with latent's heatmap."""
        key = (int(image), None if latent is None else int(latent))
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        path = self.path(*key)
        try:
            data = path.read_bytes()
        except OSError:
            heat = None
            if latent is not None:
                heat = self.data.heat(*self.data.image_codes(key[0]), key[1])
            data = render(self.pixels(key[0]), heat, self.size)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
            except OSError:  # a read-only DIR: serve from memory only
                pass
        with self._lock:
            self._memory[key] = data
            if len(self._memory) > _MEMORY:
                self._memory.popitem(last=False)
        return data
