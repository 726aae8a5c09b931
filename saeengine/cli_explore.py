"""``saeengine explore``: a local web app over an encode output or a run folder
(saeengine.explore does the work; docs/explore.md).

    saeengine explore runs/enc                      # http://127.0.0.1:8765/
    saeengine explore runs/demo --open              # make demo's folder: encoded on first open
    saeengine explore runs/enc --compare deeper=runs/enc-blocks9
    saeengine explore runs/enc --export share/      # static pages, no server
"""

from __future__ import annotations

import argparse
from pathlib import Path

_EPILOG = """\
DIR is an encode output (saeengine encode --out) or a run folder (an SAE checkpoint with its
activation store, e.g. make demo's runs/demo: encoded once into DIR/explore-cache/encoded/).
The explorer writes only under DIR: explore-notes.json (the latents' notes) and explore-cache/
(the latent index and the thumbnails).

The JSON API (every field and error: docs/explore.md):
  GET  /api/info                 d_sae, n_tokens, n_images, grid, has_head, head, compare, layer, backbone, title
  GET  /api/latents              ?offset&limit&sort=id|frequency|mean|max&order=asc|desc
                                 &filter=all|alive|dead|dense&q=<id>
  GET  /api/scatter              ids, log10_frequency, log10_mean of the alive latents
  GET  /api/latent/{j}           stats, histogram, exemplars by rule, quantiles, coactivating, head_effect, note
  PUT  /api/latent/{j}/note      {note}
  GET  /api/thumb/{image}        PNG (?latent=j: with its heatmap)
  GET  /api/images               ?offset&limit
  GET  /api/image/{image}        grid, thumb, the head's top classes
  POST /api/upload               multipart field "file" (size-limited; images only)
  POST /api/patches              {image, patches}: the selected patches' top latents
  POST /api/intervene            {image, patches|null, edits: [{latent, scale}]}: probabilities before/after
  GET  /api/compare              ?image&other=NAME: both SAEs' latents and the nearest across them

Security: binds 127.0.0.1 unless --host says otherwise (a warning names what a non-loopback
address exposes); no request path reaches the filesystem outside DIR; uploads are limited to
--max-upload-mb and decoded as images only.
"""


def _compare(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--compare {text!r}: give NAME=DIR (e.g. deeper=runs/enc-blocks9)")
    return name, Path(path)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port {text!r} is not an integer") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--port {port}: give 1..65535, or 0 for a free port")
    return port


def _megabytes(text: str) -> float:
    try:
        mb = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-upload-mb {text!r} is not a number") from None
    if not 0 < mb <= 1024:
        raise argparse.ArgumentTypeError(f"--max-upload-mb {mb:g}: give a size in (0, 1024] MB")
    return mb


def add_parser(subparsers) -> None:
    from .explore.server import DEFAULT_HOST, DEFAULT_PORT

    p = subparsers.add_parser(
        "explore", help="a local web app to browse latents, select image patches and steer them live",
        description="Serve a feature explorer over an encode output or a run folder: the latents table and\n"
                    "scatter, one page per latent (exemplars with heatmaps, quantile samples, histogram,\n"
                    "co-activating latents, the head's classes, a note), the image page (patches, sliders that\n"
                    "set latents to s x max and show the head's probabilities), and a compare page. Offline: the\n"
                    "front end is plain HTML/JS served by this server. With --export, write static pages instead.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, metavar="DIR", help="an encode output folder or a run folder")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine "
                                                         "only; anything else is reachable from the network)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: a free one)")
    p.add_argument("--open", action="store_true", help="open the page in a web browser")
    p.add_argument("--compare", type=_compare, action="append", default=[], metavar="NAME=DIR",
                   help="another encode output of the same images (another SAE, layer or backbone) for the "
                        "compare page; repeatable")
    p.add_argument("--export", type=Path, default=None, metavar="OUT",
                   help="write the browse pages as static files to OUT (new folder) instead of serving")
    p.add_argument("--export-latents", type=int, default=256, metavar="N",
                   help="latent pages in the export: the N most frequent alive latents (default 256; 0: all alive)")
    p.add_argument("--images", default=None, metavar="FOLDER_OR_LIST",
                   help="the images, in the store's order, when its recorded paths do not open from here")
    p.add_argument("--store", default=None, metavar="NAME",
                   help="which activation store of a run folder to explore (default: the first; names are "
                        "listed when it is wrong)")
    p.add_argument("--max-upload-mb", type=_megabytes, default=16.0, help="largest image upload (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from .explore.api import create_app
    from .explore.explorer import Explorer

    progress = not args.no_progress
    explorer = Explorer(args.dir, images=args.images, store=args.store, progress=progress)
    if args.export is not None:
        from .explore.export import export_static

        if args.export_latents < 0:
            from .errors import InputError

            raise InputError(f"--export-latents {args.export_latents}: give N >= 1, or 0 for every alive latent")
        out = export_static(explorer, args.export, latents=args.export_latents or None, progress=progress)
        print(f"explore: wrote the static pages to {out} (open {out / 'index.html'}, or serve the folder: "
              f"python -m http.server -d {out})")
        return 0
    from .explore.server import serve

    app = create_app(args.dir, compare=dict(args.compare), max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                     explorer=explorer, progress=progress)
    explorer.warm()  # the latent index, built once and cached: the pages never wait for it
    serve(app, host=args.host, port=args.port, open_browser=args.open)
    return 0


def interrupted(args: argparse.Namespace) -> str:
    if getattr(args, "export", None) is not None:
        return (f"interrupted; the export is built in a temporary folder and renamed at the end, so {args.export} "
                "was left as it was")
    return ("interrupted; notes are written whole on every change and the cache files atomically, so nothing was "
            "left half-written")
