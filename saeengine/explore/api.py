"""The explorer's FastAPI app: the JSON API under /api/ (docs/explore.md lists every
endpoint, its fields and errors), the front end at / and /static/*.

Errors are HTTP 4xx with {"detail": "<what is wrong and how to fix it>"}: 400 for a bad
request, 404 for a latent / image / patch / file that does not exist, 409 when the model
or the pixels the call needs are not available here, 413 for an upload over the limit.
No request text reaches the filesystem: images are integer indices or in-memory upload
ids, thumbnails are cached under names built from checked integers, and /static/ serves
only the files that exist in the package's static folder (looked up by name in a fixed
listing, not joined onto a path).
"""

import json
from pathlib import Path

from fastapi import Request  # at module level: FastAPI resolves the routes' annotations here

from ..errors import InputError, SAEEngineError
from ..eval._json import jsonable
from .data import NotFound
from .explorer import Explorer
from .model import Unavailable
from .uploads import DEFAULT_MAX_BYTES, TooLarge

STATIC = Path(__file__).with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml", ".ico": "image/x-icon",
          ".json": "application/json"}
_MAX_JSON = 1 << 20  # bytes of a JSON request body
_MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file part
_FALLBACK_PAGE = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>saeengine explore</title></head>"
                  "<body><h1>saeengine explore</h1><p>The front end is not installed "
                  "(saeengine/explore/static/index.html is missing); the JSON API is at <a href='/api/info'>/api/info"
                  "</a>.</p></body></html>")


def static_files() -> dict[str, Path]:
    """{name: path} of the front end's files (a flat folder, listed once)."""
    if not STATIC.is_dir():
        return {}
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in _TYPES}


def create_app(directory, *, compare: dict[str, str | Path] | None = None, max_upload_bytes: int = DEFAULT_MAX_BYTES,
               images=None, store: str | None = None, progress: bool = False, explorer: Explorer | None = None):
    """The app over DIR (an encode output or a run folder; see explore/source.py).

    compare: {name: another DIR} for the compare page (encodings of the same images by
    another SAE, layer or backbone). max_upload_bytes: the largest image upload accepted.
    images: the images' folder or file list when the store's recorded paths do not open
    from here. store: which store of a run folder to explore (default: the first).
    """
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request as StarletteRequest

    if isinstance(max_upload_bytes, bool) or not isinstance(max_upload_bytes, int) or max_upload_bytes < 1:
        raise InputError(f"max_upload_bytes must be an integer >= 1, got {max_upload_bytes!r}")
    ex = explorer or Explorer(directory, images=images, store=store, progress=progress)
    for name, other in (compare or {}).items():
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"--compare name {name!r}: use letters, digits, - and _ (NAME=DIR)")
        ex.compare[name] = Explorer(other, progress=progress)
    app = FastAPI(title="saeengine explore", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.explorer = ex
    files = static_files()

    def fail(exc: Exception):
        if isinstance(exc, TooLarge):
            return HTTPException(413, str(exc))
        if isinstance(exc, NotFound):
            return HTTPException(404, str(exc))
        if isinstance(exc, Unavailable):
            return HTTPException(409, str(exc))
        return HTTPException(400, str(exc))

    def call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SAEEngineError, ValueError) as exc:
            raise fail(exc) from None

    def strict(value) -> Response:
        """Strict JSON (NaN/inf -> null), serialized once by json.dumps: FastAPI's encoder
        walks every element of a list, seconds for the scatter of 2^16 latents."""
        return Response(json.dumps(jsonable(value), allow_nan=False, separators=(",", ":")),
                        media_type="application/json")

    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    def integer(name: str, value, default: int | None = None) -> int | None:
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise HTTPException(400, f"{name}={value!r} is not an integer")

    async def body(request: Request) -> dict:
        raw = bytearray()
        async for chunk in request.stream():  # counted as it arrives: never more than the limit in memory
            raw += chunk
            if len(raw) > _MAX_JSON:
                raise HTTPException(413, "the request body is over 1 MiB; send smaller JSON")
        try:
            found = json.loads(bytes(raw) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise HTTPException(400, "the request body is not JSON; send application/json") from None
        if not isinstance(found, dict):
            raise HTTPException(400, "the request body must be a JSON object")
        return found

    # ----- front end --------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index():
        page = files.get("index.html")
        return HTMLResponse(page.read_text() if page else _FALLBACK_PAGE)

    @app.get("/static/{name:path}")
    def static(name: str):
        path = files.get(name)  # a flat listing: "../x", "a/b" or an encoded slash match nothing
        if path is None:
            raise HTTPException(404, f"no static file {name[:60]!r}; the front end's files are {sorted(files)}")
        return Response(path.read_bytes(), media_type=_TYPES[path.suffix])

    # ----- browse -----------------------------------------------------------------------
    @app.get("/api/info")
    def info():
        return strict(ex.info())

    @app.get("/api/latents")
    def latents(offset: str | None = None, limit: str | None = None, sort: str = "id", order: str = "asc",
                filter: str = "all", q: str | None = None):
        return strict(call(ex.latents, offset=integer("offset", offset, 0), limit=integer("limit", limit, 100),
                           sort=sort, order=order, filter=filter, q=q))

    scatter_body: list[Response] = []

    @app.get("/api/scatter")
    def scatter():
        if not scatter_body:  # the same for the server's life: serialized once
            scatter_body.append(strict(ex.data.scatter()).body)
        return Response(scatter_body[0], media_type="application/json")

    @app.get("/api/latent/{j}")
    def latent(j: str):
        return strict(call(ex.latent, j))

    @app.put("/api/latent/{j}/note")
    async def note(j: str, request: Request):
        found = await body(request)
        if "note" not in found:
            raise HTTPException(400, "send {\"note\": \"a human name for the latent\"}")
        return strict(await run_in_threadpool(call, ex.set_note, j, found["note"]))

    @app.get("/api/thumb/{image}")
    def thumb(image: str, latent: str | None = None, sae: str | None = None):
        who = ex
        if sae not in (None, ""):
            if sae not in ex.compare:
                raise HTTPException(404, f"no SAE named {sae[:40]!r}; known: {sorted(ex.compare)}")
            who = ex.compare[sae]
        return png(call(who.thumb, image, latent))

    @app.get("/api/images")
    def images_page(offset: str | None = None, limit: str | None = None):
        return strict(call(ex.images_page, integer("offset", offset, 0), integer("limit", limit, 100)))

    # ----- the image page ---------------------------------------------------------------
    @app.get("/api/image/{image}")
    def image(image: str):
        return strict(call(ex.image, image))

    @app.post("/api/upload")
    async def upload(request: Request):
        limit = max_upload_bytes + _MULTIPART_OVERHEAD
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"the upload is {int(declared):,} bytes; the limit is {max_upload_bytes:,} "
                                     "(start the server with a larger --max-upload-mb, or send a smaller image)")
        raw = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a chunked body cannot exceed it either
            raw += chunk
            if len(raw) > limit:
                raise HTTPException(413, f"the upload is over the limit of {max_upload_bytes:,} bytes; send a "
                                         "smaller image")

        async def replay():
            return {"type": "http.request", "body": bytes(raw), "more_body": False}

        try:
            form = await StarletteRequest(request.scope, replay).form(max_files=1, max_fields=4)
        except Exception as exc:  # noqa: BLE001 - malformed multipart: the client's mistake
            raise HTTPException(400, f"the upload is not a multipart form ({exc}); send the image in the form "
                                     "field 'file'") from None
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise HTTPException(400, "no file in the form field 'file'; send the image as multipart/form-data")
        data = await file.read()
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"the image is {len(data):,} bytes; the limit is {max_upload_bytes:,}")
        return strict(await run_in_threadpool(call, ex.upload, data))

    @app.post("/api/patches")
    async def patches(request: Request):
        found = await body(request)
        return strict(await run_in_threadpool(call, ex.patches, found.get("image"), found.get("patches")))

    @app.post("/api/intervene")
    async def intervene(request: Request):
        found = await body(request)
        return strict(await run_in_threadpool(call, ex.intervene, found.get("image"), found.get("patches"),
                                              found.get("edits")))

    @app.get("/api/compare")
    def compare_(image: str | None = None, other: str | None = None):
        if image is None or other is None:
            raise HTTPException(400, "give ?image=<index>&other=<name of a --compare SAE>")
        return strict(call(ex.compare_image, image, other))

    @app.exception_handler(404)
    async def not_found(request, exc):
        detail = getattr(exc, "detail", None)
        if not detail or detail == "Not Found":
            detail = f"no such page or endpoint {request.url.path[:80]!r}; the API is listed in docs/explore.md"
        return JSONResponse({"detail": detail}, status_code=404)

    return app
