"""What the service refuses before an endpoint sees a request: slow clients, other
hosts' names, other sites' pages.

- `DeadlineProtocol`: uvicorn's h11 protocol with a deadline on receiving a request.
  uvicorn closes a connection idle between requests (timeout_keep_alive), but
  every byte received resets that timer, so headers sent a byte at a time, or a
  body nobody reads, would hold a connection forever.
- `allowed_hosts`: the Host names that reach this service, for Starlette's
  TrustedHostMiddleware; a page on another site that resolves its own name to
  127.0.0.1 (DNS rebinding) sends its own name as Host and is refused.
- `SameOrigin`: a browser names the page that sent a request in `Origin`; any
  page but the service's own is refused, so a site the user visits cannot post
  to the service on their machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ofacls.errors import UsageError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
READ_SIZE = 16 * 1024
_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """Host header values (any port) to accept for a service listening on `host`.

    Loopback: its loopback names. A given address: that address. Every interface
    (0.0.0.0, ::): any name, since exposure was chosen, unless `extra` names some.
    `extra` (--allowed-hosts) adds names; `*.example.com` takes subdomains, `*` any.
    UsageError for a pattern TrustedHostMiddleware cannot use.
    """
    for name in extra:
        if "*" in name[1:] or (name.startswith("*") and name != "*" and not name.startswith("*.")):
            raise UsageError(f"--allowed-hosts: {name!r} is not a host name, *.domain or *")
    ours = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::", ""):
        names = [*LOOPBACK_NAMES, *extra] if extra else ["*"]
    elif host == "localhost" or _is_loopback(host):
        names = [*LOOPBACK_NAMES, ours, *extra]
    else:
        names = [ours, *extra]
    return list(dict.fromkeys(names))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SameOrigin:
    """403 for a request whose Origin header is not this service (scheme aside: behind
    a TLS proxy the page is https and the request reaches us as http). Requests
    without Origin (curl, scripts, a same-origin GET) pass."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not _same(origin, headers.get("host", "")):
                response = JSONResponse({"error": "requests from other sites' pages are refused"}, 403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _same(origin: str, host: str) -> bool:
    """Whether `origin` (scheme://host[:port], or "null") names the same host and port as `host`."""
    try:
        o = urlsplit(origin)
        h = urlsplit(f"//{host}")
        if o.scheme not in ("http", "https") or not o.hostname or o.path not in ("", "/"):
            return False
        default = 443 if o.scheme == "https" else 80
        return (o.hostname, o.port or default) == (h.hostname, h.port or default)
    except ValueError:  # a bad port or IPv6 literal
        return False


def deadline_protocol(seconds: float, on_timeout: Callable[[], None]) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol class, with a request's head and any body left unread
    after the answer bounded by `seconds` (a body the app reads has its own deadline,
    which answers 408). `on_timeout` is called for each connection closed by it."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if hasattr(transport, "max_size"):  # asyncio's plain TCP transport: bytes per read
                # (256 KiB by default) is what a request's first read can bring of its body
                # before the app has looked at it; hundreds of clients at once make that count
                transport.max_size = READ_SIZE
            self._arm()  # a connection that never sends a byte is closed too

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle and self.conn.their_state is h11.SEND_BODY:
                # a new request with a body: read no more of it until the app asks (uvicorn's
                # receive resumes reading), so one refused without reading its body costs
                # only the rest of this read, not uvicorn's buffer, times every such client
                self.flow.pause_reading()
            state = self.conn.their_state
            reading = self.cycle is not None and not self.cycle.response_complete
            if state is h11.IDLE or (state is h11.SEND_BODY and not reading):
                self._arm()  # a head on its way, or the rest of a body nobody reads
            else:
                self._disarm()  # the app reads the body under its own deadline, or all is in

        def on_response_complete(self) -> None:
            if self.conn.their_state is h11.SEND_BODY:
                # answered before the body was in (413, 503, 408): the client may finish
                # sending it, within the deadline, and only then read the answer
                self._arm()
                # what uvicorn buffered of that body no one can read any more (receive says
                # "disconnect" once answered), yet it would be kept until the connection ends
                self.cycle.body = bytearray()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.transport.write(_408)  # half a head: say why (h11 has no request to answer)
            on_timeout()
            self.transport.close()

    return DeadlineProtocol
