"""The static export (``saeengine explore DIR --export OUT``): the browse pages as files, for
sharing without a server (any static host, or a browser opening OUT/index.html through a
local file server). Layout::

    OUT/index.html            the front end, with <script>window.SAE_STATIC=true</script>
    OUT/static/*              its scripts and styles
    OUT/api/info.json         /api/info (+ "static": true, "exported_latents": [...])
    OUT/api/latents.json      /api/latents with every row (paging happens in the page)
    OUT/api/scatter.json      /api/scatter
    OUT/api/images.json       /api/images with every row
    OUT/api/latent/<j>.json   /api/latent/<j> of each exported latent
    OUT/api/thumb/<i>-<j>.png image i with latent j's heatmap; <i>.png: plain
    OUT/api/<path>.js         beside each .json: ``window.SAE_DATA["<path>"] = <the JSON>;``, for
                              the page opened straight from disk (file://), where fetch() is refused

Thumbnail URLs inside the JSON are relative (``api/thumb/<i>-<j>.png``). The live-only
pages (upload, sliders, compare) are hidden by the page in static mode. The export is
built in a temporary folder beside OUT and renamed into place at the end: OUT is either
absent or complete. OUT must not exist yet (or be an earlier export, which is replaced).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import InputError
from ..eval._json import jsonable
from .api import static_files

MARKER = "saeengine-explore-export.json"
DEFAULT_LATENTS = 256  # latent pages exported by default: the most frequent alive ones
_THUMB = re.compile(r"/api/thumb/([0-9]+)(?:\?latent=([0-9]+))?")
_STATIC_FLAG = "<script>window.SAE_STATIC=true</script>"


def _relative_thumbs(value, wanted: set):
    """Rewrite every thumb URL in a response to its exported file, collecting (image, latent)."""
    if isinstance(value, dict):
        return {k: _relative_thumbs(v, wanted) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_thumbs(v, wanted) for v in value]
    if isinstance(value, str):
        found = _THUMB.fullmatch(value)
        if found:
            image, latent = int(found.group(1)), None if found.group(2) is None else int(found.group(2))
            wanted.add((image, latent))
            return f"api/thumb/{image}.png" if latent is None else f"api/thumb/{image}-{latent}.png"
    return value


def _dump(out: Path, key: str, value) -> None:
    """OUT/api/<key>.json, and its OUT/api/<key>.js twin for pages opened from file://
    (browsers refuse fetch() of file URLs; a script tag may load): the script stores the
    same object in window.SAE_DATA[key]."""
    text = json.dumps(jsonable(value), allow_nan=False, separators=(",", ":"))
    path = out / "api" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    # "</" could end a script element early if this were inlined; escaped, it stays valid JSON
    script = text.replace("</", "<\\/")
    path.with_suffix(".js").write_text(f"window.SAE_DATA = window.SAE_DATA || {{}};\n"
                                       f"window.SAE_DATA[{json.dumps(key)}] = {script};\n")


def choose_latents(explorer, limit: int | None) -> list[int]:
    """The latents given pages: every alive one when limit is None, else the ``limit``
    most frequent alive ones (ascending ids)."""
    d = explorer.data
    alive = [int(j) for j in d._order("frequency", "desc") if d.count[j] > 0]
    return sorted(alive if limit is None else alive[:limit])


def export_static(explorer, out, *, latents: int | None = DEFAULT_LATENTS, head_effects: bool = True,
                  progress: bool = True) -> Path:
    """Write the static export of ``explorer`` (an Explorer) to ``out``; returns it."""
    out = Path(out)
    if out.exists() and not (out / MARKER).is_file():
        raise InputError(f"--export {out} exists and is not an earlier explorer export; choose a new folder")
    if latents is not None and (isinstance(latents, bool) or not isinstance(latents, int) or latents < 1):
        raise InputError(f"latents must be an integer >= 1 or None (all alive), got {latents!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(explorer, tmp, latents, head_effects, progress)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(ex, out: Path, limit: int | None, head_effects: bool, progress: bool) -> None:
    files = static_files()
    page = files["index.html"].read_text() if "index.html" in files else "<!DOCTYPE html><html><head></head>" \
        "<body><p>saeengine explore: the front end was not installed.</p></body></html>"
    page = page.replace("<head>", "<head>" + _STATIC_FLAG, 1) if "<head>" in page else _STATIC_FLAG + page
    (out / "index.html").write_text(page)
    for name, path in files.items():
        if name != "index.html":
            (out / "static").mkdir(exist_ok=True)
            shutil.copyfile(path, out / "static" / name)
    chosen = choose_latents(ex, limit)
    wanted: set = set()
    info = {**ex.info(), "static": True, "compare": [], "exported_latents": chosen}
    _dump(out, "info", info)
    exported = set(chosen)
    rows = ex.latents(offset=0, limit=ex.data.d_sae, sort="id") if ex.data.d_sae <= 1000 else None
    if rows is None:  # more than a page: all rows at once, the same fields
        rows = {"total": ex.data.d_sae, "offset": 0,
                "rows": [ex.data.row(j, ex.notes.all) for j in range(ex.data.d_sae)]}
    for row in rows["rows"]:
        row["exported"] = row["id"] in exported
    _dump(out, "latents", rows)
    _dump(out, "scatter", ex.data.scatter())
    _dump(out, "images", _relative_thumbs(ex.images_page(0, ex.data.n_images) if ex.data.n_images <= 1000
                                                        else _all_images(ex), wanted))
    for j in tqdm(chosen, desc="export latents", disable=not progress):
        body = ex.latent(j, head_effect=head_effects)
        _dump(out, f"latent/{j}", _relative_thumbs(body, wanted))
    thumbs = out / "api" / "thumb"
    thumbs.mkdir(parents=True, exist_ok=True)
    for image, latent in tqdm(sorted(wanted, key=lambda t: (t[0], -1 if t[1] is None else t[1])),
                              desc="export thumbnails", disable=not progress):
        name = f"{image}.png" if latent is None else f"{image}-{latent}.png"
        (thumbs / name).write_bytes(ex.thumbs.png(image, latent))
    (out / MARKER).write_text(json.dumps({"format": "saeengine-explore-export", "source": str(ex.root),
                                          "latents": len(chosen), "thumbnails": len(wanted)}) + "\n")


def _all_images(ex) -> dict:
    rows = []
    for offset in range(0, ex.data.n_images, 1000):
        rows += ex.images_page(offset, 1000)["rows"]
    return {"total": ex.data.n_images, "rows": rows}
