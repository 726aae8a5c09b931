"""``saeengine explore``: a local web app over an encode output (or a run folder) to browse
latents, select image patches and steer them live. Modules, one job each:

- source.py   what DIR is (encode output or run folder, encoded on first open) and where the pixels come from
- data.py     the memory-mapped codes: latent table, pagination, inverted index, quantile exemplars, co-activation
- thumbs.py   thumbnails with heatmaps, cached once under DIR/explore-cache/thumbs/
- model.py    the backbone + SAE + head, loaded on first use (image page, uploads, interventions)
- uploads.py  size-limited, image-only upload decoding
- notes.py    DIR/explore-notes.json, written atomically
- explorer.py what every API call returns
- api.py      the FastAPI app (create_app)
- server.py   uvicorn on 127.0.0.1 (serve)
- export.py   the static export (export_static)

Docs: docs/explore.md.
"""

from .api import create_app
from .explorer import Explorer

__all__ = ["Explorer", "create_app"]
