"""A small HTTP server on 127.0.0.1 for tests: well-behaved and misbehaving routes.

    with HTTPTestServer() as server:
        server.serve("/cat.png", png_bytes)                   # 200, image/png
        server.serve("/missing", b"", status=404)
        server.serve("/page", b"<html>", content_type="text/html")
        server.redirect("/old", "/cat.png")
        server.hang("/slow")                                  # never answers
        server.trickle("/drip")                               # endless body, a byte at a time
        server.endless("/big")                                # endless body, fast
        server.raw("/bad", b"HTTP/1.1 200 OK\r\nTransfer-...")  # these bytes, as they are
        server.sequence("/busy", answer(b"", status=503), answer(png_bytes))  # in turn
        url = server.url("/cat.png")                          # http://127.0.0.1:PORT/cat.png

Routes match the request path (query ignored), or the full request target, so
the server can also stand in for an HTTP proxy. Unknown paths get a 404.
`server.requests` lists the targets asked for, `server.received` each request's
headers and the time it came (time.monotonic()). Stopping the server releases
every handler still hanging or trickling, so tests never leave threads behind.

Use the class directly, or the `http_server` fixture: add
`from httpserver import http_server  # noqa: F401` to conftest.py to share it.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

Handler = Callable[[BaseHTTPRequestHandler], None]


class HTTPTestServer:
    """A threaded HTTP/1.0 server on 127.0.0.1, on a free port, with routes you register."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[str] = []
        self.received: list[tuple[float, dict[str, str]]] = []
        self.stopping = threading.Event()
        server = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                server.received.append((time.monotonic(), dict(self.headers.items())))
                route = server.routes.get(self.path) or server.routes.get(urlsplit(self.path).path)
                if route is None:
                    _send(self, 404, b"no such route", "text/plain")
                else:
                    route(self)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # --- routes -------------------------------------------------------------------

    def route(self, path: str, handler: Handler) -> str:
        """Answer `path` with handler(request); returns the route's URL."""
        self.routes[path] = handler
        return self.url(path)

    def serve(
        self,
        path: str,
        body: bytes,
        *,
        status: int = 200,
        content_type: str | None = "image/png",
        headers: dict[str, str] | None = None,
        content_length: bool = True,
    ) -> str:
        """Answer with fixed bytes (any status; no Content-Type if None)."""
        return self.route(path, answer(body, status=status, content_type=content_type,
                                       headers=headers, content_length=content_length))

    def raw(self, path: str, data: bytes) -> str:
        """Answer with `data` exactly (status line, headers, body, or none of them),
        then close the connection: for responses no well-behaved server sends."""

        def handler(req: BaseHTTPRequestHandler) -> None:
            _write(req, data)
            req.close_connection = True

        return self.route(path, handler)

    def sequence(self, path: str, *handlers: Handler) -> str:
        """Answer the n-th request for `path` with the n-th handler, the last one from then on."""
        queue = list(handlers)
        lock = threading.Lock()

        def handler(req: BaseHTTPRequestHandler) -> None:
            with lock:
                current = queue.pop(0) if len(queue) > 1 else queue[0]
            current(req)

        return self.route(path, handler)

    def redirect(self, path: str, location: str, *, status: int = 302) -> str:
        """Redirect to `location` (relative or absolute, any scheme)."""
        return self.serve(
            path, b"", status=status, content_type=None, headers={"Location": location}
        )

    def hang(self, path: str) -> str:
        """Read the request, then never answer (until the server stops)."""

        def handler(req: BaseHTTPRequestHandler) -> None:
            self.stopping.wait()

        return self.route(path, handler)

    def trickle(
        self,
        path: str,
        *,
        interval: float = 0.05,
        chunk: bytes = b"\x00",
        content_length: int | None = None,
    ) -> str:
        """A 200 image/png whose body never ends, `chunk` every `interval` seconds:
        each read gets data well within any socket timeout, yet the download never
        finishes. `content_length` sends a (lying) Content-Length."""

        def handler(req: BaseHTTPRequestHandler) -> None:
            headers = {} if content_length is None else {"Content-Length": str(content_length)}
            _start(req, 200, "image/png", headers)
            while not self.stopping.wait(interval):
                if not _write(req, chunk):
                    return

        return self.route(path, handler)

    def endless(self, path: str, *, content_length: int | None = None) -> str:
        """A 200 image/png whose body never ends, as fast as the client reads."""

        def handler(req: BaseHTTPRequestHandler) -> None:
            headers = {} if content_length is None else {"Content-Length": str(content_length)}
            _start(req, 200, "image/png", headers)
            block = b"\x00" * 65536
            while not self.stopping.is_set():
                if not _write(req, block):
                    return

        return self.route(path, handler)

    # --- life cycle ---------------------------------------------------------------

    def start(self) -> HTTPTestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HTTPTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def refused_url(path: str = "/x.png") -> str:
    """A URL on 127.0.0.1 where nothing listens, so connecting is refused."""
    return f"http://127.0.0.1:{_refusing_socket().getsockname()[1]}{path}"


@functools.cache
def _refusing_socket() -> socket.socket:
    """A socket this process keeps bound and never listens on: connecting to its port
    is refused, and no other process can take the port meanwhile (a port merely
    found free could be)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def answer(
    body: bytes,
    *,
    status: int = 200,
    content_type: str | None = "image/png",
    headers: dict[str, str] | None = None,
    content_length: bool = True,
) -> Handler:
    """A handler answering with fixed bytes (for `HTTPTestServer.sequence`)."""

    def handler(req: BaseHTTPRequestHandler) -> None:
        _send(req, status, body, content_type, headers, content_length=content_length)

    return handler


def _start(
    req: BaseHTTPRequestHandler,
    status: int,
    content_type: str | None,
    headers: dict[str, str] | None = None,
) -> None:
    req.send_response(status)
    if content_type is not None:
        req.send_header("Content-Type", content_type)
    for key, value in (headers or {}).items():
        req.send_header(key, value)
    req.end_headers()


def _send(
    req: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    content_type: str | None,
    headers: dict[str, str] | None = None,
    *,
    content_length: bool = True,
) -> None:
    headers = dict(headers or {})
    if content_length:
        headers.setdefault("Content-Length", str(len(body)))
    _start(req, status, content_type, headers)
    _write(req, body)


def _write(req: BaseHTTPRequestHandler, data: bytes) -> bool:
    """Send data; False once the client has gone."""
    try:
        req.wfile.write(data)
        req.wfile.flush()
        return True
    except OSError:
        return False


__all__ = ["HTTPTestServer", "answer", "refused_url"]
