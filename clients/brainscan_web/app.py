"""The page's HTTP side: the static page, and a small JSON API over one SDK `Client`.

    GET  /                 the page (static/index.html; app.js and app.css under /static)
    GET  /api/config       disclaimer, upload limit, gateway address
    GET  /api/gateway      the gateway's models (or why it cannot be reached)
    POST /api/analyze      body: one file's bytes; ?segment=&detect=&gate=  ->  {"slices": [...]}

Uploads travel as the raw request body rather than multipart form data: Starlette
spools multipart files above 1 MB to a temporary file, and an upload must never
touch the disk. The file name stays in the browser, so no log can carry it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from brainscan.client import Client
from brainscan.errors import BrainscanError, InvalidInput
from brainscan.pictures import decode_frames
from brainscan.results import DISCLAIMER
from brainscan_web.views import PageError, error_view, slice_view, too_big

log = logging.getLogger("brainscan_web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Uploads held and drawn at once: bounds memory at about this many times the upload limit
# (the page itself sends one file at a time; more tabs or clients wait their turn).
MAX_CONCURRENT_UPLOADS = 4
# Everything comes from this origin; images are data: URLs, downloads blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class Refused(Exception):
    """Stops a request with a PageError the page shows as it is."""

    def __init__(self, error: PageError) -> None:
        super().__init__(error.message)
        self.error = error


def create_app(client: Client, *, server: str, max_upload_bytes: int, timeout_s: float = 30.0) -> FastAPI:
    """`timeout_s`: the deadline per slice (a multi-frame file gets one per frame)."""
    app = FastAPI(title="brainscan", description=DISCLAIMER, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    uploads = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse(exc.error.body(), status_code=exc.error.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error in %s", request.url.path)
        return JSONResponse(
            PageError(500, "internal", "The page hit an internal error; its log says more.").body(), status_code=500
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/api/config")
    def config() -> dict[str, object]:
        return {"disclaimer": DISCLAIMER, "max_upload_bytes": max_upload_bytes, "server": server}

    @app.get("/api/gateway")
    def gateway() -> dict[str, object]:
        try:
            info = client.model_info()
        except BrainscanError as error:
            raise Refused(error_view(error, server)) from None
        return {
            "backend": info.backend,
            "tumor_threshold": info.tumor_threshold,
            "models": [{"role": m.role, "name": m.name, "version": m.version} for m in info.models],
        }

    @app.post("/api/analyze")
    async def analyze(request: Request, segment: bool = True, detect: bool = True, gate: bool = True) -> dict[str, object]:
        async with uploads:
            data = await read_upload(request, max_upload_bytes)
            slices = await run_in_threadpool(
                analyze_upload, client, data, server=server, timeout_s=timeout_s,
                segment=segment, detect=detect, gate=gate,
            )
        return {"slices": slices}

    return app


async def read_upload(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(too_big(int(declared), limit))
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise Refused(too_big(len(body), limit))
    if not body:
        raise Refused(PageError(400, "bad_file", "The file is empty (0 bytes)."))
    return bytes(body)


def analyze_upload(
    client: Client, data: bytes, *, server: str, timeout_s: float, segment: bool, detect: bool, gate: bool
) -> list[dict[str, object]]:
    """One file through AnalyzeStream (one answer per frame), each drawn on its own frame."""
    try:
        frames = decode_frames(data)
        local_error = None
    except InvalidInput as error:  # the gateway's own answer below says it best
        frames, local_error = [], str(error)
    try:
        results = list(
            client.analyze_many(
                [data], segment=segment, detect=detect, gate=gate, timeout_s=timeout_s * max(1, len(frames))
            )
        )
    except BrainscanError as error:
        raise Refused(error_view(error, server)) from None
    if local_error is not None or len(frames) < len(results):
        raise Refused(PageError(400, "bad_file", f"This file could not be drawn: {local_error or 'frame count differs'}"))
    return [slice_view(result, frames[result.frame]) for result in results]
