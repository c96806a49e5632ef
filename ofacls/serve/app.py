"""The Starlette application of `ofacls serve` and the uvicorn server that runs it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ofacls.errors import FetchError, ImageError, InputError, ModelError, OfaclsError, UsageError, debug
from ofacls.fetch import redact
from ofacls.serve.batching import Batcher, QueueFull
from ofacls.serve.bodies import BodyTimeout, BodyTooLarge, ByteBudget, Lease, NoRoom, read_body
from ofacls.serve.guards import SameOrigin, allowed_hosts, deadline_protocol
from ofacls.serve.metrics import Metrics
from ofacls.vetting import HEAD_BYTES, check_head

if TYPE_CHECKING:
    import torch

    from ofacls.classifier import Classifier
    from ofacls.fetch import URLFetcher

log = logging.getLogger("ofacls.serve")
MAX_TOP_K = 100  # a server limit: exact search for k labels costs about k beams
RETRY_AFTER = "1"
CLIENT_GONE = 499  # nginx's status for a client that left before its answer; counted, never sent

@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = None  # None: what suits the model's device (runner.device_defaults)
    max_wait: float = 0.01  # seconds
    max_queue: int = 64
    max_body: int = 20 * 2**20
    top_k: int = 5
    decode: str = "exact"
    workers: int | None = None  # threads that decode images, and as many that fetch URLs
    allow_urls: bool = False
    allow_private_urls: bool = False  # let URLs reach loopback, private and link-local addresses
    timeout: float = 30.0
    max_download: int = 50 * 2**20
    read_timeout: float = 60.0  # for a request's headers, and then for its body
    graceful_timeout: int = 30  # seconds that a stop waits for requests in flight
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the listening address's
    quiet: bool = False

    @property
    def body_budget(self) -> int:
        """Bytes that request bodies may hold at once: a full queue of the largest bodies."""
        return self.max_queue * self.max_body


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class Service:
    """The state behind the endpoints: the model once loaded, the batcher, metrics."""

    def __init__(self, load: Callable[[], Classifier], settings: ServeSettings,
                 on_load_error: Callable[[OfaclsError], None]) -> None:
        self.load, self.settings, self.on_load_error = load, settings, on_load_error
        self.clf: Classifier | None = None
        self.metrics = Metrics()
        self.budget = ByteBudget(settings.body_budget)
        self.batcher: Batcher | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.fetcher: URLFetcher | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        import anyio

        loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, args=(loop,), name="ofacls-load", daemon=True).start()
        anyio.current_time()  # imports anyio's asyncio backend now, not in the first request
        try:
            yield
        finally:
            if self.fetcher is not None:  # fetches under way end within --timeout
                self.fetcher.close(wait=False)
            if self.batcher is not None:
                await self.batcher.stop()
            if self.pool is not None:
                self.pool.shutdown(wait=True)

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load the model off the event loop, so /healthz answers (and /readyz says 503) meanwhile."""
        try:
            clf = self.load()
        except OfaclsError as e:
            self.on_load_error(e)
            return
        except Exception as e:  # whatever torch raised: the service cannot start
            if debug():
                raise
            self.on_load_error(ModelError(f"cannot load the model: {e or type(e).__name__}"))
            return
        from PIL import Image

        Image.init()  # PIL's format plugins, imported here rather than on the event loop by a request
        loop.call_soon_threadsafe(self._ready, clf)

    def _ready(self, clf: Classifier) -> None:
        from ofacls.runner import device_defaults

        s = self.settings
        batch, workers = device_defaults(clf.device.type)
        self.pool = ThreadPoolExecutor(s.workers or workers, thread_name_prefix="ofacls-decode")
        if s.allow_urls:
            from ofacls.fetch import URLFetcher

            # threads of their own: URLs that never answer cannot hold the decoding threads
            self.fetcher = URLFetcher(s.workers or workers, timeout=s.timeout, max_bytes=s.max_download,
                                      allow_private=s.allow_private_urls)
        self.batcher = Batcher(clf.predict_pixels, max_batch=s.max_batch or batch, max_wait=s.max_wait,
                               max_queue=s.max_queue, on_batch=self.metrics.batches.observe)
        self.batcher.start()
        self.clf = clf
        log.info(f"model ready on {clf.device}")

    # -- endpoints --------------------------------------------------------------------
    async def classify(self, request: Request) -> Response:
        top_k, decode = _query(request, self.settings)
        clf, batcher, pool = self.clf, self.batcher, self.pool
        if clf is None or batcher is None or pool is None:
            raise HTTPError(503, "the model is still loading", {"Retry-After": RETRY_AFTER})
        if batcher.full():  # shed load before reading and decoding the image
            raise _queue_full()
        loop = asyncio.get_running_loop()
        lease = self.budget.lease()
        try:
            name, data = await self._image(request, lease)
            if not data:
                raise HTTPError(400, "no image in the request: send it as the body or a multipart "
                                "'file' field")
            try:
                check_head(bytes(data[:HEAD_BYTES]))  # before PIL parses a byte of it
            except InputError as e:
                raise HTTPError(415, str(e)) from None
            try:
                pixels: torch.Tensor = await loop.run_in_executor(pool, clf.pixels, data)
            except InputError as e:
                raise HTTPError(422, str(e)) from None
        finally:
            lease.release()  # the pixels wait for the model under --max-queue instead
        del data
        try:
            pred = await batcher.submit(pixels, name, top_k, decode)
        except QueueFull:
            raise _queue_full() from None
        if not pred.ok:
            raise HTTPError(500, pred.error or "classification failed")
        return JSONResponse(pred.to_dict())

    async def _image(self, request: Request, lease: Lease) -> tuple[str, bytes | bytearray]:
        """(input name, image bytes) from the raw body, a multipart `file` field, or a URL."""
        body = await self._body(request, lease)
        url = request.query_params.get("url")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await _replayed(request, bytes(body)).form(max_part_size=self.settings.max_body)
            try:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise HTTPError(400, "multipart request without a 'file' field holding a file")
                return upload.filename or "-", await upload.read()
            finally:
                await form.close()
        if ctype == "application/json" and url is None:
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
                raise HTTPError(400, "the JSON body is not valid JSON") from None
            if not (isinstance(doc, dict) and isinstance(doc.get("url"), str)):
                raise HTTPError(400, 'a JSON body must be {"url": "http(s)://..."}')
            url = doc["url"]
        if url is not None:
            return redact(url), await self._fetch(url)
        return "-", body

    async def _body(self, request: Request, lease: Lease) -> bytearray:
        s = self.settings
        length = request.headers.get("content-length")
        try:
            return await read_body(request.receive, lease, limit=s.max_body, seconds=s.read_timeout,
                                   declared=int(length) if length is not None else None)
        except BodyTooLarge:
            raise HTTPError(413, f"the body is over the {s.max_body}-byte limit (--max-body)") from None
        except NoRoom:
            raise HTTPError(503, "too many uploads in progress; retry shortly",
                            {"Retry-After": RETRY_AFTER}) from None
        except BodyTimeout:
            raise HTTPError(408, f"the body did not arrive within {s.read_timeout:g} s",
                            {"Connection": "close"}) from None

    async def _fetch(self, url: str) -> bytes:
        fetcher = self.fetcher
        if fetcher is None:
            raise HTTPError(400, "fetching URLs is off (start the server with --allow-urls)")
        if not url.lower().startswith(("http://", "https://")):
            raise HTTPError(400, "only http(s) URLs can be fetched")
        if fetcher.full():
            raise HTTPError(503, "too many URLs being fetched; retry shortly", {"Retry-After": RETRY_AFTER})
        try:
            return await fetcher.fetch(url)
        except FetchError as e:  # redacted, and with private URLs off, says nothing of the network
            raise HTTPError(422, str(e)) from None

    async def labels(self, request: Request) -> Response:
        clf = self._model()
        return JSONResponse({"labels": [{"label": n, "index": clf.class_index[n]} for n in clf.labels]})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(self, request: Request) -> Response:
        if self.clf is None:
            return JSONResponse({"status": "loading"}, 503, {"Retry-After": RETRY_AFTER})
        return JSONResponse({"status": "ready"})

    async def metrics_text(self, request: Request) -> Response:
        depth = self.batcher.depth if self.batcher else 0
        return PlainTextResponse(self.metrics.render(depth, self.clf is not None, self.budget.used),
                                 media_type="text/plain; version=0.0.4")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_doc(self.settings))

    async def page(self, request: Request) -> Response:
        html = resources.files("ofacls.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{TOP_K}}", str(self.settings.top_k)),
                            headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' "
                                     "blob: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"})

    def read_timed_out(self) -> None:
        """A connection closed for not sending its request's head (or unread body) in time."""
        self.metrics.read_timeouts += 1
        if not self.settings.quiet:
            log.info(f"connection closed: no request within {self.settings.read_timeout:g} s")

    def _model(self) -> Classifier:
        if self.clf is None:
            raise HTTPError(503, "the model is still loading", {"Retry-After": RETRY_AFTER})
        return self.clf


def _queue_full() -> HTTPError:
    return HTTPError(503, "too many requests waiting for the model; retry shortly",
                     {"Retry-After": RETRY_AFTER})


def _query(request: Request, settings: ServeSettings) -> tuple[int, str]:
    q = request.query_params
    raw = q.get("top_k", str(settings.top_k))
    try:
        top_k = int(raw)
    except ValueError:
        raise HTTPError(400, f"top_k must be a whole number, not {raw!r}") from None
    if not 1 <= top_k <= MAX_TOP_K:
        raise HTTPError(400, f"top_k must be between 1 and {MAX_TOP_K}, not {top_k}")
    decode = q.get("decode", settings.decode)
    if decode not in ("exact", "beam"):
        raise HTTPError(400, f"decode must be exact or beam, not {decode!r}")
    return top_k, decode


def _replayed(request: Request, body: bytes) -> Request:
    """A Request whose stream yields `body` again (already read, and checked for size)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


_ENDPOINTS = {"/v1/classify": "classify", "/v1/labels": "labels", "/healthz": "healthz",
              "/readyz": "readyz", "/metrics": "metrics", "/openapi.json": "openapi", "/": "page"}


class AccessLog:
    """One line per request (method, path, status, milliseconds), and the request counters.

    A client that goes away mid-body is counted and logged as 499, not as a server
    error; a request still running when a stop's --graceful-timeout is up is
    answered 503 (if it has no answer yet) rather than dying with a traceback."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, started = time.perf_counter(), 500, False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except ClientDisconnect:
            status = CLIENT_GONE
        except asyncio.CancelledError:
            # uvicorn cancels what is left when --graceful-timeout is up; this is the top of
            # the request's task, so ending it here (not re-raising) ends only this request
            if not started:
                await send_status({"type": "http.response.start", "status": 503,
                                   "headers": [(b"content-type", b"application/json"),
                                               (b"connection", b"close")]})
                await send_status({"type": "http.response.body",
                                   "body": b'{"error": "the server is stopping"}'})
        finally:
            took = time.perf_counter() - start
            endpoint = _ENDPOINTS.get(scope["path"], "other")
            m = self.service.metrics
            m.requests[(endpoint, status)] += 1
            if endpoint == "classify":
                m.latency.observe(took)
            if not self.service.settings.quiet:
                path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
                log.info(f"{scope['method']} {path} {status} {took * 1000:.1f} ms")


def _error_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPError):
        return JSONResponse({"error": str(exc)}, exc.status, exc.headers)
    if isinstance(exc, UsageError | ImageError):
        return JSONResponse({"error": str(exc)}, 400)
    detail = getattr(exc, "detail", None)  # Starlette's own HTTPException (404, 405, bad multipart)
    status = getattr(exc, "status_code", 500)
    return JSONResponse({"error": str(detail or "internal error")}, status)


def build_app(service: Service) -> Starlette:
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    s = service.settings
    routes = [Route("/v1/classify", service.classify, methods=["POST"]),
              Route("/v1/labels", service.labels), Route("/healthz", service.healthz),
              Route("/readyz", service.readyz), Route("/metrics", service.metrics_text),
              Route("/openapi.json", service.openapi), Route("/", service.page)]
    handlers: dict[Any, Any] = {HTTPError: _error_response, HTTPException: _error_response,
                                Exception: _error_response}
    hosts = allowed_hosts(s.host, list(s.allowed_hosts))
    return Starlette(routes=routes, lifespan=service.lifespan, exception_handlers=handlers,
                     middleware=[Middleware(AccessLog, service=service),
                                 Middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False),
                                 Middleware(SameOrigin)])


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads; UsageError when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def serve(load: Callable[[], Classifier], settings: ServeSettings) -> None:
    """Run the service in the foreground until SIGTERM or SIGINT, which stop it
    gracefully: no new connections, the requests in flight (queued ones included)
    answered, then return. Raises the model's load error, if loading failed."""
    import uvicorn

    failed: list[OfaclsError] = []
    server: uvicorn.Server

    def on_load_error(e: OfaclsError) -> None:
        failed.append(e)
        server.should_exit = True

    service = Service(load, settings, on_load_error)
    app = build_app(service)
    sock = listen(settings.host, settings.port)
    # h11 whatever else is installed: the read deadline is a subclass of its protocol;
    # no websockets: a connection upgraded to one would leave that deadline behind
    config = uvicorn.Config(app, log_config=None, access_log=False,
                            log_level="warning", lifespan="on", ws="none",
                            http=deadline_protocol(settings.read_timeout, service.read_timed_out),
                            timeout_graceful_shutdown=settings.graceful_timeout)
    server = uvicorn.Server(config)
    _one_line_logs()
    log.setLevel(logging.INFO)
    host, port = sock.getsockname()[:2]
    log.info(f"serving on http://{host if ':' not in host else f'[{host}]'}:{port} (loading the model)")
    # uvicorn re-raises the signal that stopped it once its handlers are gone; these
    # make that a no-op, so a graceful stop exits 0 rather than dying by the signal
    saved = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        sock.close()
    if failed:
        raise failed[0]


def _one_line_logs() -> None:
    """uvicorn's warnings and errors through ofacls' own one-line stderr handler."""
    ours = logging.getLogger("ofacls").handlers
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = list(ours)
        lg.propagate = False


def openapi_doc(settings: ServeSettings) -> dict[str, Any]:
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ofacls", "description": "ImageNet-1K classification with OFA."},
        "paths": {
            "/v1/classify": {"post": {
                "summary": "Classify one image",
                "parameters": [
                    {"name": "top_k", "in": "query", "schema": {
                        "type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": settings.top_k}},
                    {"name": "decode", "in": "query", "schema": {
                        "enum": ["exact", "beam"], "default": settings.decode}},
                    {"name": "url", "in": "query", "description": "with --allow-urls: fetch this image",
                     "schema": {"type": "string"}}],
                "requestBody": {"content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "file": {"type": "string", "format": "binary"}}}},
                    "application/json": {"schema": {"type": "object", "properties": {
                        "url": {"type": "string"}}}}}},
                "responses": {
                    "200": {"description": "the prediction", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Prediction"}}}},
                    "400": {"description": "bad query, no image or malformed JSON", **err},
                    "403": {"description": "sent from another site's page (Origin)", **err},
                    "408": {"description": "body not sent within --read-timeout", **err},
                    "413": {"description": "body over --max-body", **err},
                    "415": {"description": "not an image format the service takes", **err},
                    "422": {"description": "an image that cannot be decoded or is too large, or a URL "
                            "that cannot be fetched", **err},
                    "503": {"description": "model loading, queue full, bodies over the memory cap or "
                            "every URL fetch thread busy (see Retry-After)", **err}}}},
            "/v1/labels": {"get": {"summary": "The labels answers are chosen from"}},
            "/healthz": {"get": {"summary": "The process is alive"}},
            "/readyz": {"get": {"summary": "The model is loaded (503 until then)"}},
            "/metrics": {"get": {"summary": "Prometheus metrics"}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
            "Prediction": {"type": "object", "properties": {
                "input": {"type": "string"}, "label": {"type": "string"}, "score": {"type": "number"},
                "index": {"type": "integer"},
                "top_k": {"type": "array", "items": {"type": "object", "properties": {
                    "label": {"type": "string"}, "score": {"type": "number"},
                    "index": {"type": "integer"}}}},
                "error": {"type": ["string", "null"]}}}}},
    }
