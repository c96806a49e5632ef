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
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ofacls.errors import FetchError, ImageError, InputError, ModelError, OfaclsError, UsageError, debug
from ofacls.prediction import Prediction
from ofacls.serve.batching import Batcher, QueueFull
from ofacls.serve.bodies import BodyTimeout, BodyTooLarge, ByteBudget, Lease, NoRoom, read_body
from ofacls.serve.guards import SameOrigin, allowed_hosts, deadline_protocol
from ofacls.serve.metrics import Metrics
from ofacls.sources.fetch import redact
from ofacls.sources.vetting import HEAD_BYTES, check_head

if TYPE_CHECKING:
    import torch

    from ofacls.calibration import Calibration
    from ofacls.classifier import Classifier
    from ofacls.sources.fetch import URLFetcher

log = logging.getLogger("ofacls.serve")
MAX_TOP_K = 100  # a server limit: exact search for k labels costs about k beams
RETRY_AFTER = "1"
T = TypeVar("T")
CLIENT_GONE = 499  # nginx's status for a client that left before its answer; counted, never sent

@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = None  # None: what suits the model's device (runner.device_defaults)
    max_wait: float = 0.01  # seconds
    max_queue: int = 64
    max_body: int = 20 * 2**20
    max_images: int = 32  # images in one request
    model: str = "ofacls"  # the model's name as clients see it: its id, or its folder's name
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
    # gives answers their prediction set (exact decoding, the service's own labels)
    calibration: Calibration | None = None

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
        self.fetch_threads = 1

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
            from ofacls.sources.fetch import URLFetcher

            # threads of their own: URLs that never answer cannot hold the decoding threads
            self.fetch_threads = s.workers or workers
            self.fetcher = URLFetcher(self.fetch_threads, timeout=s.timeout, max_bytes=s.max_download,
                                      allow_private=s.allow_private_urls)
        self.batcher = Batcher(clf.predict_pixels, max_batch=s.max_batch or batch, max_wait=s.max_wait,
                               max_queue=s.max_queue, on_batch=self.metrics.batches.observe)
        self.batcher.start()
        self.clf = clf
        log.info(f"model ready on {clf.device}")

    # -- endpoints --------------------------------------------------------------------
    async def classify(self, request: Request) -> Response:
        """One image (raw body, one multipart `file`, {"url"} or ?url=): its prediction, or an
        error status. Several (repeated `file` parts, {"images": [...]}): {"results": [...]},
        in order, each failed image an entry with its `error`."""
        top_k, decode, wanted = _query(request, self.settings)
        clf, batcher, pool = self.clf, self.batcher, self.pool
        if clf is None or batcher is None or pool is None:
            raise HTTPError(503, "the model is still loading", {"Retry-After": RETRY_AFTER})
        if batcher.full():  # shed load before reading and decoding the images, or tokenising
            raise _queue_full()
        trie = None
        if wanted is not None:  # tokenised off the event loop; the last few sets are kept
            try:
                trie = await asyncio.get_running_loop().run_in_executor(pool, clf.label_set, wanted)
            except UsageError as e:
                raise HTTPError(400, str(e)) from None
        # a calibration holds for the labels and decoding it was made with: the service's own
        calibration = self.settings.calibration if wanted is None and decode == "exact" else None
        lease = self.budget.lease()
        try:
            sources, many = await self._sources(request, lease)
            try:
                batcher.reserve(len(sources))  # before fetching or decoding any of them
            except QueueFull:
                raise _queue_full() from None
            try:
                # a request's URLs take at most the fetch threads' worth at once, so one
                # request cannot fill the fetch queue by itself and have its own URLs refused
                fetching = asyncio.Semaphore(self.fetch_threads)
                pixels = await _unless_gone(request, asyncio.gather(
                    *(_settled(self._pixels(clf, pool, src, fetching, lease)) for src in sources)))
            finally:
                batcher.release(len(sources))  # taken up again below, with no await between
        finally:
            lease.release()  # the pixels wait for the model under --max-queue instead
        names = [src.name for src in sources]
        del sources
        try:
            futures = iter(batcher.submit_all([(p, name) for p, name in zip(pixels, names)
                                               if not isinstance(p, HTTPError)], top_k, decode,
                                              trie, calibration))
        except QueueFull:
            raise _queue_full() from None
        answers = await _unless_gone(request, asyncio.gather(
            *(_settled(_predicted(next(futures))) if not isinstance(p, HTTPError) else _done(p)
              for p in pixels)))
        if not many:
            answer = answers[0]
            if isinstance(answer, HTTPError):
                raise answer
            return JSONResponse(answer.to_dict())
        return JSONResponse({"results": [
            Prediction.failed(name, str(a)).to_dict() if isinstance(a, HTTPError) else a.to_dict()
            for a, name in zip(answers, names)]})

    async def _pixels(self, clf: Classifier, pool: ThreadPoolExecutor, src: Source,
                      fetching: asyncio.Semaphore, lease: Lease) -> torch.Tensor:
        """One image's pixels; HTTPError (415, 422, ...) saying why it has none. A
        downloaded image's bytes count in the request's `lease` until it is decoded."""
        loop = asyncio.get_running_loop()
        data = src.data
        if src.url is not None:
            async with fetching:
                data = await self._fetch(src.url)
            try:
                lease.take(len(data))
            except NoRoom:
                raise HTTPError(503, "too many images being read or decoded; retry shortly",
                                {"Retry-After": RETRY_AFTER}) from None
        elif src.base64 is not None:
            try:
                data = await loop.run_in_executor(pool, _unbase64, src.base64)
            except ValueError:
                raise HTTPError(400, "the base64 is not valid base64") from None
        if not data:
            raise HTTPError(400, "empty image")
        try:
            check_head(bytes(data[:HEAD_BYTES]))  # before PIL parses a byte of it
        except InputError as e:
            raise HTTPError(415, in_our_words(str(e))) from None
        try:
            return await loop.run_in_executor(pool, clf.pixels, data)
        except InputError as e:
            raise HTTPError(422, in_our_words(str(e))) from None

    async def _sources(self, request: Request, lease: Lease) -> tuple[list[Source], bool]:
        """The request's images, and whether it is a request for several (answered as a list)."""
        body = await self._body(request, lease)
        url = request.query_params.get("url")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if url is not None:
            if body:
                raise HTTPError(400, "?url= names the image: the request must have no body")
            return [Source(redact(url), url=url)], False
        if ctype == "multipart/form-data":
            return await self._form(request, body)
        if ctype == "application/json":
            return self._json(body)
        if not body:
            raise HTTPError(400, "no image in the request: send it as the body, as multipart 'file' "
                            'fields or as JSON {"images": [...]}')
        return [Source("-", data=body)], False

    async def _form(self, request: Request, body: bytearray) -> tuple[list[Source], bool]:
        from starlette.exceptions import HTTPException

        s = self.settings
        try:  # one more than allowed: Starlette's own refusal beyond that is only a fallback
            form = await _replayed(request, bytes(body)).form(max_files=s.max_images + 1,
                                                             max_part_size=s.max_body)
        except HTTPException as e:
            if "too many files" in str(e.detail).lower():
                raise _too_many(s.max_images) from None
            raise HTTPError(400, f"malformed multipart body: {e.detail}") from None
        try:
            unknown = sorted({k for k in form if k != "file"})
            if unknown:
                raise HTTPError(400, f"unknown multipart field {', '.join(map(repr, unknown))} "
                                "(images go in 'file' fields)")
            uploads = form.getlist("file")
            if not uploads:
                raise HTTPError(400, "multipart request without a 'file' field holding a file")
            if len(uploads) > s.max_images:
                raise _too_many(s.max_images)
            files = [u for u in uploads if isinstance(u, UploadFile)]
            if len(files) < len(uploads):
                raise HTTPError(400, "a multipart 'file' field holds text, not a file")
            return [Source(u.filename or "-", data=await u.read()) for u in files], len(files) > 1
        finally:
            await form.close()

    def _json(self, body: bytearray) -> tuple[list[Source], bool]:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise HTTPError(400, "the JSON body is not valid JSON") from None
        shape = 'a JSON body must be {"images": [{"base64": "..."} or {"url": "..."}, ...]} or {"url": "..."}'
        if not isinstance(doc, dict) or len(doc) != 1 or not ({"url", "images"} & doc.keys()):
            extra = sorted(set(doc) - {"url", "images"}) if isinstance(doc, dict) else []
            raise HTTPError(400, f"unknown key {', '.join(map(repr, extra))}: {shape}" if extra else shape)
        if "url" in doc:
            if not isinstance(doc["url"], str):
                raise HTTPError(400, shape)
            return [Source(redact(doc["url"]), url=doc["url"])], False
        images = doc["images"]
        if not isinstance(images, list) or not images:
            raise HTTPError(400, f"'images' must be a list of one or more images: {shape}")
        if len(images) > self.settings.max_images:
            raise _too_many(self.settings.max_images)
        return [_entry(i, e) for i, e in enumerate(images)], True

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

    async def info(self, request: Request) -> Response:
        """What a client (the page) shows and defaults to; answers while the model loads."""
        s = self.settings
        cal = s.calibration
        return JSONResponse({"model": s.model, "ready": self.clf is not None, "top_k": s.top_k,
                             "decode": s.decode, "max_images": s.max_images,
                             "calibration": None if cal is None else {
                                 "coverage": cal.coverage, "threshold": cal.threshold,
                                 "images": cal.images, "score": cal.score}})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(self, request: Request) -> Response:
        if self.clf is None:
            return JSONResponse({"status": "loading"}, 503, {"Retry-After": RETRY_AFTER})
        return JSONResponse({"status": "ready"})

    async def metrics_text(self, request: Request) -> Response:
        depth = self.batcher.depth if self.batcher else 0
        fetches = self.fetcher.pending if self.fetcher else 0
        return PlainTextResponse(self.metrics.render(depth, self.clf is not None, self.budget.used, fetches),
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


@dataclass(frozen=True)
class Source:
    """One image of a request as it came: its bytes, a URL to fetch, or base64 text."""

    name: str  # its `input` in the answer: the file name, a redacted URL, or "-"
    data: bytes | bytearray | None = None
    url: str | None = None
    base64: str | None = None


def _entry(i: int, entry: object) -> Source:
    """images[i] of a JSON body: {"base64": "..."} or {"url": "..."}."""
    if not isinstance(entry, dict) or len(entry) != 1 or not isinstance(next(iter(entry.values())), str):
        raise HTTPError(400, f'images[{i}] must be {{"base64": "..."}} or {{"url": "..."}}')
    ((key, value),) = entry.items()
    if key == "base64":
        return Source("-", base64=value)
    if key == "url":
        # JSON can carry lone surrogates, which no answer could encode: the name shows
        # them escaped, and the URL fails as that image's own error
        return Source(redact(value.encode("utf-8", "backslashreplace").decode("utf-8")), url=value)
    raise HTTPError(400, f'images[{i}] has the unknown key {key!r} (use "base64" or "url")')


def _unbase64(text: str) -> bytes:
    import base64
    import binascii

    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(str(e)) from None


def _too_many(most: int) -> HTTPError:
    return HTTPError(413, f"more than {most} images in one request (--max-images)")


async def _settled(work: Awaitable[T]) -> T | HTTPError:
    """What `work` returns, or the HTTPError it raised: one image's failure is its own."""
    try:
        return await work
    except HTTPError as e:
        return e


async def _done(value: T) -> T:
    return value


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """What `work` returns, or ClientDisconnect as soon as the client hangs up (its
    body read, nothing else comes from it but that): `work` is cancelled, so its
    images still waiting for the model leave their batch (their futures cancelled)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            # how it ends (cancelled, or an answer no one waits for) is no one's to report
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
    if task in done:
        return task.result()
    raise ClientDisconnect


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _predicted(future: asyncio.Future[Prediction]) -> Prediction:
    pred = await future
    if not pred.ok:
        raise HTTPError(500, pred.error or "classification failed")
    return pred


# an upload is no file: the image checks' "empty file" said as the service's client sees it
_OUR_WORDS = {"empty file": "empty image"}


def in_our_words(message: str) -> str:
    """An image check's message as the service says it."""
    return _OUR_WORDS.get(message, message)


QUERY = ("top_k", "decode", "labels", "url")  # what /v1/classify's query may hold
MAX_REQUEST_LABELS = 1000  # labels one request may choose among (each costs a trie branch)


def _query(request: Request, settings: ServeSettings) -> tuple[int, str, list[str] | None]:
    """top_k, decode and labels (a,b,c; None: the service's) from the query; 400 naming
    any parameter unknown, repeated or malformed (one misspelt is not quietly answered
    with the default)."""
    q = request.query_params
    unknown = sorted({k for k in q if k not in QUERY})
    if unknown:
        raise HTTPError(400, f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))} (known: {', '.join(QUERY)})")
    repeated = sorted({k for k, _ in q.multi_items() if len(q.getlist(k)) > 1})
    if repeated:
        raise HTTPError(400, f"query parameter {', '.join(map(repr, repeated))} given more than once")
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
    labels = None
    if "labels" in q:
        labels = [n.strip() for n in q["labels"].split(",") if n.strip()]
        if not labels:
            raise HTTPError(400, "labels names no labels (give labels=a,b,c)")
        if len(labels) > MAX_REQUEST_LABELS:
            raise HTTPError(400, f"labels names {len(labels):,} labels, more than {MAX_REQUEST_LABELS:,}")
    return top_k, decode, labels


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


_ENDPOINTS = {"/v1/classify": "classify", "/v1/labels": "labels", "/v1/info": "info", "/healthz": "healthz",
              "/readyz": "readyz", "/metrics": "metrics", "/openapi.json": "openapi", "/": "page"}


class AccessLog:
    """One line per request (time, client, method, path, status, milliseconds), and the
    request counters.

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
        when = _utc_now()

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
            if endpoint == "classify" and scope["method"] == "POST":  # a 405 classified nothing
                m.latency.observe(took)
            if not self.service.settings.quiet:
                path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
                log.info(f"{when} {_client(scope)} {scope['method']} {path} {status} {took * 1000:.1f} ms")


def _utc_now() -> str:
    """ISO 8601 UTC to the millisecond: 2026-01-31T12:00:00.123Z."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _client(scope: Scope) -> str:
    """The peer as address:port ([v6]:port); "-" when the server does not know it."""
    client = scope.get("client")
    if not client:
        return "-"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
              Route("/v1/labels", service.labels), Route("/v1/info", service.info),
              Route("/healthz", service.healthz),
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
    server = _server_class()(config, settings)
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


def _server_class() -> type[Any]:
    """uvicorn's Server, stopped in one way whatever the signal (see `Stopping`)."""
    import uvicorn

    class Stopping(uvicorn.Server):
        """The first SIGTERM or Ctrl-C stops gracefully (uvicorn's own drain, bounded by
        --graceful-timeout); a second Ctrl-C ends that wait now: the requests still in
        flight are cancelled, and so answered 503 by AccessLog, and then the application
        shuts down as on any stop. uvicorn's own second Ctrl-C ("force quit") skips that
        shutdown and leaves the lifespan task to be cancelled with a traceback."""

        def __init__(self, config: uvicorn.Config, settings: ServeSettings) -> None:
            super().__init__(config)
            self.settings = settings
            self.loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            quiet = self.settings.quiet
            if not self.should_exit:
                self.should_exit = True
                if not quiet:
                    log.info(f"stopping: requests in flight have up to {self.settings.graceful_timeout} s"
                             + (" (Ctrl-C again: answer them 503 now)" if sig == signal.SIGINT else ""))
            elif sig == signal.SIGINT and self.loop is not None:
                if not quiet:
                    log.info("stopping now: requests in flight are answered 503")
                # from a signal handler, only call_soon_threadsafe may touch the loop
                self.loop.call_soon_threadsafe(self._cancel_requests)

        def _cancel_requests(self) -> None:
            for task in list(self.server_state.tasks):
                task.cancel()

    return Stopping


def _one_line_logs() -> None:
    """uvicorn's warnings and errors through ofacls' own one-line stderr handler."""
    ours = logging.getLogger("ofacls").handlers
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = list(ours)
        lg.propagate = False


def openapi_doc(settings: ServeSettings) -> dict[str, Any]:
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    prediction = {"$ref": "#/components/schemas/Prediction"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ofacls", "description": "ImageNet-1K classification with OFA."},
        "paths": {
            "/v1/classify": {"post": {
                "summary": "Classify one image, or several (answered as {\"results\": [...]}, in order)",
                "parameters": [
                    {"name": "top_k", "in": "query", "schema": {
                        "type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": settings.top_k}},
                    {"name": "decode", "in": "query", "schema": {
                        "enum": ["exact", "beam"], "default": settings.decode}},
                    {"name": "labels", "in": "query", "description": "a,b,c: choose among these "
                     "(the model's labels, or any text); default: the service's", "schema": {
                        "type": "string"}},
                    {"name": "url", "in": "query", "description": "with --allow-urls: fetch this image",
                     "schema": {"type": "string"}}],
                "requestBody": {"content": {
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "file": {"type": "array", "maxItems": settings.max_images,
                                 "items": {"type": "string", "format": "binary"}}}}},
                    "application/json": {"schema": {"oneOf": [
                        {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}},
                        {"type": "object", "required": ["images"], "properties": {"images": {
                            "type": "array", "minItems": 1, "maxItems": settings.max_images,
                            "items": {"oneOf": [
                                {"type": "object", "required": ["base64"],
                                 "properties": {"base64": {"type": "string"}}},
                                {"type": "object", "required": ["url"],
                                 "properties": {"url": {"type": "string"}}}]}}}}]}}}},
                "responses": {
                    "200": {"description": "one image: its prediction; several (two or more 'file' "
                            "parts, or 'images'): each one's, failures with their 'error'",
                            "content": {"application/json": {"schema": {"oneOf": [
                                prediction, {"type": "object", "properties": {"results": {
                                    "type": "array", "items": prediction}}}]}}}},
                    "400": {"description": "unknown, repeated or bad query parameter, no image, or a "
                            "malformed multipart or JSON body", **err},
                    "403": {"description": "sent from another site's page (Origin)", **err},
                    "408": {"description": "body not sent within --read-timeout", **err},
                    "413": {"description": "body over --max-body, or more images than --max-images", **err},
                    "415": {"description": "not an image format the service takes", **err},
                    "422": {"description": "an image that cannot be decoded or is too large, or a URL "
                            "that cannot be fetched", **err},
                    "503": {"description": "model loading, queue full, bodies over the memory cap or "
                            "every URL fetch thread busy (see Retry-After)", **err}}}},
            "/v1/labels": {"get": {"summary": "The labels answers are chosen from"}},
            "/v1/info": {"get": {"summary": "The model's name, whether it is loaded, the defaults "
                                 "(top_k, decode) and --max-images"}},
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
