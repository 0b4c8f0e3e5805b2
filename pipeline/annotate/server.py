"""The annotation tool's web server: a FastAPI app over a ``Session``, and a uvicorn
runner for it.

Every request needs the session's token: the ``X-Token`` header, an ``Authorization:
Bearer`` header, or the cookie set when the page is first opened with ``?token=``.
A missing token gets 401, a wrong one 403, and neither gets any data. Request bodies
are limited in size; static files come only from the package's own ``static/``.
"""
from __future__ import annotations

import hmac
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.annotate.session import Conflict, Invalid, Lost, Session, Stale, Unavailable
from pipeline.annotate.store import AUTOMATIC, PROVENANCES

STATIC_DIR = Path(__file__).resolve().parent / "static"
COOKIE = "sam_annotate_token"
KEY_PATTERN = r"^sa_[0-9]{1,12}$"
Key = Annotated[str, PathParam(pattern=KEY_PATTERN)]
Name = Annotated[str, Field(min_length=1, max_length=100)]
# NaN and infinities are not JSON: a committed record must stay readable by every reader.
Finite = Annotated[float, Field(allow_inf_nan=False)]
# Every response: no framing by other sites, no content sniffing, scripts only from here
# (WebAssembly compilation allowed), and cross-origin isolation, which lets
# onnxruntime-web use threads when asked to.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; img-src 'self' blob: data:; "
        "style-src 'self'; connect-src 'self'; worker-src 'self' blob:; frame-ancestors 'none'"
    ),
}


# --- request and response models -----------------------------------------------------------
class LeaseRequest(BaseModel):
    client: Name
    after: str | None = Field(None, pattern=KEY_PATTERN)
    step: Literal[1, -1] = 1
    key: str | None = Field(None, pattern=KEY_PATTERN)


class LeaseKey(BaseModel):
    client: Name
    key: str = Field(pattern=KEY_PATTERN)
    version: int | None = Field(None, ge=0)  # renew: the state the client has


class MaskIn(BaseModel):
    uid: Name
    counts: list[Annotated[int, Field(ge=0)]] = Field(max_length=4_000_000)
    provenance: Literal[PROVENANCES + (AUTOMATIC,)]  # type: ignore[valid-type]
    clicks: int = Field(0, ge=0, le=100_000)
    strokes: int = Field(0, ge=0, le=100_000)  # brush and eraser strokes
    seconds: float = Field(0.0, ge=0, le=1e6, allow_inf_nan=False)
    annotator: str = Field("", max_length=100)
    point_coords: list[tuple[Finite, Finite]] = Field(default_factory=list, max_length=1000)
    category_id: int | None = Field(None, ge=0)  # one of the session's labels, or none


class SaveRequest(BaseModel):
    client: Name
    masks: list[MaskIn] = Field(max_length=10_000)
    done: bool = False
    version: int = Field(ge=0)  # the version of the image's state this save edits (the view's)


class MaskOut(BaseModel):
    uid: str
    counts: list[int]
    provenance: str
    clicks: int
    strokes: int = 0
    seconds: float
    annotator: str
    point_coords: list[list[float]]
    category_id: int | None = None


class ImageView(BaseModel):
    key: str
    image_id: int
    source: str
    index: int
    total: int
    width: int
    height: int
    done: bool
    committed: bool
    editable: bool
    version: int
    dropped: list[str] = []
    masks: list[MaskOut]


class SaveResult(BaseModel):
    saved: bool
    committed: bool
    version: int


class Progress(BaseModel):
    images: int
    done: int
    failed: int
    units: int
    units_committed: int
    lost: str | None = None  # why this server accepts no save any more (another took the output over)


class ModelConfig(BaseModel):
    arch: str
    family: str                      # "sam" or "sam2": how the page maps clicks and masks
    sha256: str
    img_size: int
    embedding_shape: list[int]
    feature_shapes: list[list[int]]  # what the embedding endpoint sends, in order
    mask_input_size: int
    decoder_url: str


class Label(BaseModel):
    id: int
    name: str


class AppConfig(BaseModel):
    annotator: str
    lease_s: float
    threads: int
    model: ModelConfig
    labels: list[Label] = []  # the session's label set (Shift+1..9 in the page); empty: class-free


# --- middleware ----------------------------------------------------------------------------
class BodyLimit:
    """Refuses request bodies over ``max_bytes`` (413), declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            return await _plain(send, 413, f"request body over {self.max_bytes} bytes")
        # Without a (truthful) length the body is read here, up to the limit, and replayed.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await _plain(send, 413, f"request body over {self.max_bytes} bytes")
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class TokenGate:
    """Lets through only requests that carry the token; sets the cookie on ``/?token=``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        given = (request.headers.get("x-token")
                 or _bearer(request.headers.get("authorization"))
                 or request.cookies.get(COOKIE))
        from_query = request.query_params.get("token") if scope["path"] == "/" else None
        given = given or from_query
        if not given:
            return await _plain(send, 401, "missing token: open the URL the annotate stage printed")
        if not hmac.compare_digest(given.encode("utf-8"), self.token):
            return await _plain(send, 403, "wrong token")
        if from_query and given == from_query:
            # Moves the token from the address bar into an HttpOnly cookie.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, from_query, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _bearer(value: str | None) -> str | None:
    if value and value.lower().startswith("bearer "):
        return value[7:].strip()
    return None


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode("utf-8")
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- the app -------------------------------------------------------------------------------
def create_app(session: Session, token: str, annotator: str = "annotator", max_body_bytes: int = 16_000_000,
               threads: int = 1) -> FastAPI:
    """The web app over ``session``; every route needs ``token``."""
    app = FastAPI(title="SAM annotate", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(KeyError)
    async def unknown_key(request: Request, exc: KeyError):
        return JSONResponse({"detail": f"no image {exc.args[0]!r} in this queue"}, status_code=404)

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict):
        body = {"detail": str(exc)}
        if isinstance(exc, Stale):
            body["current"] = jsonable_encoder(ImageView(**exc.current))
        return JSONResponse(body, status_code=409)

    @app.exception_handler(Lost)
    async def lost(request: Request, exc: Lost):
        return JSONResponse({"detail": str(exc), "lost": True}, status_code=503)

    @app.exception_handler(Invalid)
    async def invalid(request: Request, exc: Invalid):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        # Where and why only: echoing the input back could not even be encoded (NaN).
        errors = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", ""))}
                  for e in exc.errors()[:20]]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable):
        return JSONResponse({"detail": f"this image cannot be annotated: {exc}"}, status_code=410)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, follow_symlink=False), name="static")

    @app.get("/api/config")
    def config() -> AppConfig:
        m = session.model
        return AppConfig(annotator=annotator, lease_s=session.leases.lease_s, threads=threads, model=ModelConfig(
            arch=m.arch, family=m.family, sha256=m.sha256, img_size=m.img_size, embedding_shape=list(m.embedding_shape),
            feature_shapes=[list(shape) for shape in m.feature_shapes], mask_input_size=m.mask_input_size,
            decoder_url="/api/decoder.onnx"),
            labels=[Label(id=c["id"], name=c["name"]) for c in session.categories])

    @app.get("/api/decoder.onnx")
    def decoder() -> FileResponse:
        return FileResponse(session.model.decoder_path, media_type="application/octet-stream")

    @app.get("/api/progress")
    def progress() -> Progress:
        return Progress(**session.progress())

    @app.get("/api/images")
    def images(client: str | None = None) -> list[dict]:
        """The queue: key, file name and status of every image (the page's image list)."""
        return session.image_list(client)

    @app.post("/api/lease")
    def lease(body: LeaseRequest) -> ImageView | None:
        entry = session.lease(body.client, after=body.after, step=body.step, key=body.key)
        return None if entry is None else ImageView(**session.view(entry.key, body.client))

    @app.post("/api/renew")
    def renew(body: LeaseKey) -> dict:
        session.renew(body.key, body.client, body.version)
        return {"renewed": True}

    @app.post("/api/release")
    def release(body: LeaseKey) -> dict:
        session.release(body.key, body.client)
        return {"released": True}

    @app.get("/api/images/{key}")
    def image(key: Key, client: str | None = None) -> ImageView:
        return ImageView(**session.view(key, client))

    @app.get("/api/images/{key}/image.jpg")
    def image_jpeg(key: Key) -> Response:
        return Response(session.jpeg(key), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/images/{key}/embedding")
    def embedding(key: Key) -> Response:
        start = time.perf_counter()
        features = session.embedding(key)
        # The embedding, then (SAM 2) its high-resolution maps, back to back.
        return Response(b"".join(f.astype("<f2").tobytes() for f in features), media_type="application/octet-stream",
                        headers={"X-Embedding-Shape": ",".join(map(str, features[0].shape)),
                                 "X-Feature-Shapes": ";".join(",".join(map(str, f.shape)) for f in features),
                                 "X-Embedding-Dtype": "float16",
                                 "X-Server-Seconds": f"{time.perf_counter() - start:.3f}"})

    @app.put("/api/images/{key}")
    def save(key: Key, body: SaveRequest) -> SaveResult:
        masks = [m.model_dump() for m in body.masks]
        return SaveResult(**session.save(key, body.client, masks, body.done, body.version))

    wrapped = TokenGate(app, token)
    return BodyLimit(wrapped, max_body_bytes)


class BackgroundServer:
    """Runs an ASGI app with uvicorn in a thread; ``url`` once ``start`` returns."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        # Open keep-alive connections (a browser left open) must not hold up a stop.
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="annotate-server", daemon=True)
        self.host = host

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the annotation server did not start (is the port in use?)")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
