"""Fetching an image URL: http and https on urllib3, bounded in time, size and redirects.

`fetch_url` returns the body's bytes or raises FetchError with a one-line reason; every
way a server can misbehave (no status line, oversized or too many headers, a bad chunk,
a body shorter than its Content-Length, a redirect to a malformed URL) is such a reason.

- `timeout` bounds the whole fetch: connecting, headers, body, redirects and Retry-After
  waits. urllib3's timeouts bound each socket operation only, which a server sending a
  byte a second never trips, so a timer shuts the fetch's sockets down when time is up.
- More than `max_bytes` is refused, from Content-Length before reading or while streaming.
- At most `max_redirects` redirects, only to http and https, never in a loop.
- 429 and 503 with a Retry-After (seconds or HTTP date) are retried up to MAX_RETRIES
  times, as long as the wait fits in what is left of `timeout`.
- http_proxy / https_proxy / no_proxy are honoured, except for loopback hosts.
- Credentials in a URL (`https://user:pass@host/`) are sent to that host as basic auth
  and never shown: `redact` makes them `***` in names and messages.
- `allow_private=False` is for fetching on someone else's behalf (the HTTP service): only
  public addresses are connected to, checked at connect time on every hop (see
  ofacls.sources.netguard), and a failed connection or malformed response says only
  `UNREACHABLE`, so errors cannot map what listens on the network. HTTP statuses, sizes
  and content types of the public servers it did reach are still named.
- `URLFetcher` runs fetches on threads of their own, a bounded number at a time, so slow
  URLs never hold the threads that decode uploaded images.

urllib3 is imported on first use: importing this module costs nothing at startup.
"""

from __future__ import annotations

import base64
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urldefrag, urljoin, urlsplit

from ofacls.errors import FetchError
from ofacls.sources.deadline import Deadline, pool_classes
from ofacls.sources.netguard import (
    REFUSED,
    AddressCheck,
    guarded_pool_classes,
    is_public_address,
    resolve_checked,
)

if TYPE_CHECKING:
    from concurrent.futures import Future

    from urllib3 import BaseHTTPResponse, PoolManager

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_REDIRECTS", "DEFAULT_TIMEOUT", "MAX_RETRIES", "REFUSED",
           "UNREACHABLE", "URLFetcher", "fetch_url", "is_public_address", "redact", "size_text"]

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 50 * 2**20
DEFAULT_MAX_REDIRECTS = 5
MAX_RETRIES = 3  # for 429 / 503 with Retry-After
UNREACHABLE = "could not fetch the URL"  # with allow_private=False: any network or protocol failure

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUSES = frozenset({429, 503})
_NOT_IMAGES = frozenset({"application/json", "application/xhtml+xml", "application/xml"})
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_CHUNK = 64 * 1024
_HEADERS = {"User-Agent": "ofacls", "Accept": "image/*, */*;q=0.5"}
# the userinfo of every URL in a text: up to the authority's last "@", as urlsplit reads it
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")
_BAD_HOST = re.compile(r"[^A-Za-z0-9._~%!$&'()*+,;=-]")
_SAFE_PATH = "/%:@!$&'()*+,;=~"


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it replaced by `***`."""
    return _USERINFO.sub(r"\1***@", text)


def size_text(n: int) -> str:
    """A byte count for messages: `97.7 KB`, `50 MB`."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def fetch_url(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
              max_redirects: int = DEFAULT_MAX_REDIRECTS, allow_private: bool = True,
              allowed: AddressCheck = is_public_address) -> bytes:
    """The body of `url` (http or https); FetchError saying why not (see the module doc).

    With `allow_private=False` a connection goes only to addresses `allowed` accepts
    (public ones unless told otherwise), redirects included, and a network error is
    just `UNREACHABLE`."""
    from http.client import HTTPException

    from urllib3.exceptions import HTTPError

    guard = None if allow_private else allowed
    with Deadline(timeout) as deadline:
        try:
            return _fetch(url, deadline, max_bytes, max_redirects, guard)
        except FetchError as e:
            raise FetchError(redact(str(e))) from None
        except (OSError, ValueError, EOFError, HTTPException, HTTPError) as e:
            if deadline.expired or _timed_out(e):
                message = deadline.message
            else:
                message = UNREACHABLE if guard is not None else _network_message(e)
            raise FetchError(redact(message)) from None


class URLFetcher:
    """fetch_url on threads of its own: at most `max_workers` fetches at a time and
    `max_waiting` more queued (by default as many again), so that URLs that never answer
    hold these threads only, never the caller's. Guarded (`allow_private=False`) unless
    told otherwise, since it is meant for fetching on others' behalf.

        fetcher = URLFetcher(4, timeout=30, allow_private=False)
        if fetcher.full():
            ...  # answer 503: too many URLs being fetched
        data = await fetcher.fetch(url)  # or fetcher.submit(url).result()
        fetcher.close()

    `timeout` bounds each fetch from the moment a thread takes it up; time spent queued
    is at most (max_waiting / max_workers + 1) timeouts."""

    def __init__(self, max_workers: int = 4, *, max_waiting: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_redirects: int = DEFAULT_MAX_REDIRECTS, allow_private: bool = False,
                 allowed: AddressCheck = is_public_address) -> None:
        import functools
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="ofacls-fetch")
        self._limit = max_workers + (max_workers if max_waiting is None else max_waiting)
        self._pending = 0
        self._lock = threading.Lock()
        self._fetch = functools.partial(fetch_url, timeout=timeout, max_bytes=max_bytes,
                                        max_redirects=max_redirects, allow_private=allow_private,
                                        allowed=allowed)

    @property
    def pending(self) -> int:
        """URLs being fetched or waiting for a thread."""
        with self._lock:
            return self._pending

    def full(self) -> bool:
        """Whether every thread is busy and the queue is full: submit would refuse."""
        with self._lock:
            return self._pending >= self._limit

    def submit(self, url: str) -> Future[bytes]:
        """A future of fetch_url(url); FetchError at once when the fetcher is full."""
        with self._lock:
            if self._pending >= self._limit:
                raise FetchError("too many URLs being fetched; try again later")
            self._pending += 1
        try:
            future = self._pool.submit(self._fetch, url)
        except BaseException:
            self._done()
            raise
        future.add_done_callback(lambda _: self._done())
        return future

    async def fetch(self, url: str) -> bytes:
        """fetch_url(url) awaited without blocking the event loop; FetchError as it does."""
        import asyncio

        return await asyncio.wrap_future(self.submit(url))

    def close(self, *, wait: bool = True) -> None:
        """Stop taking fetches; `wait`: until those under way are done (each within `timeout`)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1


# --- one fetch ---------------------------------------------------------------------


def _fetch(url: str, deadline: Deadline, max_bytes: int, max_redirects: int,
           guard: AddressCheck | None) -> bytes:
    visited: list[str] = []
    retries = 0
    while True:
        request_url, headers, proxy = _prepare(url, redirected=bool(visited), guard=guard)
        manager = _manager(proxy, guard)
        wait = None
        try:
            resp = _open(manager, request_url, headers, deadline)
            try:
                location = resp.headers.get("Location")
                if resp.status in _REDIRECTS and location:
                    target = urldefrag(urljoin(url, location.strip())).url
                    if target == url or target in visited:
                        raise FetchError("redirect loop")
                    if len(visited) >= max_redirects:
                        raise FetchError(f"too many redirects (more than {max_redirects})")
                    visited.append(url)
                    url = target
                    continue
                wait = _retry_after(resp)
                if wait is None:
                    _check_response(resp, max_bytes)
                    return _read_body(resp, deadline, max_bytes)
                if retries >= MAX_RETRIES:
                    raise FetchError(f"{_status(resp)} (still, after {MAX_RETRIES} retries)")
                if wait >= deadline.remaining():
                    raise FetchError(f"{_status(resp)} (the server asks to retry in {round(wait, 1):g} s, "
                                     f"past the {deadline.seconds:g} s timeout)")
            finally:
                resp.close()
        finally:
            manager.clear()
        retries += 1
        time.sleep(wait)


def _prepare(url: str, *, redirected: bool, guard: AddressCheck | None = None
             ) -> tuple[str, dict[str, str], str | None]:
    """(URL to ask for, request headers, proxy URL or None); FetchError for a URL not to fetch."""
    bad = "redirect to a bad URL" if redirected else "bad URL"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:  # an invalid port or IPv6 literal
        raise FetchError(f"{bad}: {str(e).lower()}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        what = "redirect to unsupported" if redirected else "unsupported"
        raise FetchError(f"{what} URL scheme '{scheme}' (only http and https)")
    if not host:
        raise FetchError(f"{bad}: no host")
    if ":" in host:  # an IPv6 literal, which urlsplit has checked
        netloc = f"[{host}]"
    else:
        try:
            netloc = host.encode("idna").decode("ascii")
        except UnicodeError:
            netloc = host
        if _BAD_HOST.search(netloc) or not netloc.strip("."):
            raise FetchError(f"{bad}: invalid host name {host[:60]!r}")
    if port is not None:
        netloc += f":{port}"
    # Encode what the user typed raw (spaces, non-ASCII) but keep existing %XX escapes.
    target = quote(parts.path or "/", safe=_SAFE_PATH)
    if parts.query:
        target += "?" + quote(parts.query, safe=_SAFE_PATH + "?")
    headers = dict(_HEADERS)
    if parts.username is not None:
        headers["Authorization"] = _basic_auth(parts.username, parts.password)
    proxy = _proxy_for(scheme, host)
    if guard is not None and proxy is not None:
        # The proxy connects and resolves on its own, so this check cannot be at connect time:
        # a proxy that must not reach private addresses has to refuse them itself as well.
        resolve_checked(host, port or (443 if scheme == "https" else 80), guard)
    return f"{scheme}://{netloc}{target}", headers, proxy


def _basic_auth(user: str, password: str | None) -> str:
    pair = f"{unquote(user)}:{unquote(password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy URL from http_proxy / https_proxy / no_proxy; loopback is never proxied,
    so local servers (and the tests) work however the environment is set up."""
    from urllib.request import (  # type: ignore[attr-defined]  # stdlib, not in typeshed
        getproxies_environment,
        proxy_bypass_environment,
    )

    if host.lower() in _LOOPBACK:
        return None
    proxies = getproxies_environment()
    proxy = proxies.get(scheme)
    if not proxy or proxy_bypass_environment(host, proxies):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    parts = urlsplit(proxy)
    try:
        parts.port  # noqa: B018  (raises for a bad port)
    except ValueError:
        raise FetchError(f"unsupported proxy {redact(proxy)!r} (bad port)") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise FetchError(f"unsupported proxy {redact(proxy)!r} (only http:// and https:// proxies)")
    return proxy


def _manager(proxy: str | None, guard: AddressCheck | None = None) -> PoolManager:
    """A pool manager for one request, whose connections the deadline can interrupt and,
    when there is a `guard`, go only to the addresses it accepts (a proxy is trusted)."""
    import urllib3

    manager: PoolManager
    classes = pool_classes()
    if proxy is None:
        manager = urllib3.PoolManager(num_pools=2)
        if guard is not None:
            classes = guarded_pool_classes(guard)
    else:
        parts = urlsplit(proxy)
        headers = {}
        if parts.username is not None:
            headers["Proxy-Authorization"] = _basic_auth(parts.username, parts.password)
        bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        manager = urllib3.ProxyManager(bare, num_pools=2, proxy_headers=headers)
    manager.pool_classes_by_scheme = classes
    return manager


def _open(manager: PoolManager, url: str, headers: dict[str, str], deadline: Deadline
          ) -> BaseHTTPResponse:
    """The response to GET `url`, its body not read yet; no retries, no redirects followed."""
    from urllib3.util import Timeout

    left = deadline.remaining()
    return manager.urlopen("GET", url, headers=headers, redirect=False, retries=False,
                           preload_content=False, decode_content=False,
                           timeout=Timeout(connect=left, read=left))


def _status(resp: BaseHTTPResponse) -> str:
    """`HTTP 404 Not Found`, with the standard phrase when the server sends none."""
    from http import HTTPStatus

    phrases = {s.value: s.phrase for s in HTTPStatus}
    return f"HTTP {resp.status} {(resp.reason or '').strip() or phrases.get(resp.status, '')}".strip()


def _retry_after(resp: BaseHTTPResponse) -> float | None:
    """Seconds to wait before asking again, for a 429 or 503 that says when; else None."""
    from datetime import timezone
    from email.utils import parsedate_to_datetime

    value = (resp.headers.get("Retry-After") or "").strip()
    if resp.status not in _RETRY_STATUSES or not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC as well
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _check_response(resp: BaseHTTPResponse, max_bytes: int) -> None:
    if not 200 <= resp.status < 300:
        raise FetchError(_status(resp))
    ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype.startswith("text/") or ctype in _NOT_IMAGES:
        raise FetchError(f"not an image: {ctype}")
    length = _content_length(resp)
    if length is not None and length > max_bytes:
        raise FetchError(f"larger than the {size_text(max_bytes)} limit ({size_text(length)})")


def _content_length(resp: BaseHTTPResponse) -> int | None:
    """The body's announced length (None when chunked, absent or malformed)."""
    value = resp.headers.get("Content-Length")
    if resp.chunked or value is None or not value.strip().isdigit():
        return None
    return int(value)


def _read_body(resp: BaseHTTPResponse, deadline: Deadline, max_bytes: int) -> bytes:
    from http.client import HTTPException

    from urllib3.exceptions import HTTPError, InvalidChunkLength

    expected = _content_length(resp)
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in resp.stream(_CHUNK, decode_content=False):
            total += len(chunk)
            if total > max_bytes:
                raise FetchError(f"larger than the {size_text(max_bytes)} limit")
            chunks.append(chunk)
    except (OSError, HTTPException, HTTPError) as e:
        if deadline.expired:
            raise FetchError(deadline.message) from None
        # an empty chunk-size line is the connection closing mid-body (urllib3 1.26)
        if any(isinstance(c, InvalidChunkLength) and getattr(c, "length", b"").strip() for c in _causes(e)):
            raise FetchError("bad HTTP response: bad chunk size") from None
        if expected is None:
            raise FetchError(f"download cut short after {total} bytes") from None
        raise FetchError(f"download cut short: {total} of {expected} bytes") from None
    if deadline.fired:  # the timer's shutdown looks like a clean end of the body
        raise FetchError(deadline.message)
    if expected is not None and total < expected:
        raise FetchError(f"download cut short: {total} of {expected} bytes")
    if not total:
        raise FetchError("empty response")
    return b"".join(chunks)


# --- messages ----------------------------------------------------------------------


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and what it wraps: urllib3 wraps socket and http.client errors once or twice."""
    chain: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and all(current is not c for c in chain):
        chain.append(current)
        reason = getattr(current, "reason", None)
        wrapped = [a for a in current.args if isinstance(a, BaseException)]
        if isinstance(reason, BaseException):
            current = reason
        elif wrapped:
            current = wrapped[-1]
        else:
            current = current.__cause__ or current.__context__
    return chain


def _timed_out(e: BaseException) -> bool:
    from urllib3.exceptions import NewConnectionError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    return any(isinstance(c, (TimeoutError, Urllib3Timeout)) and not isinstance(c, NewConnectionError)
               for c in _causes(e))


def _network_message(e: BaseException) -> str:
    """A short reason for a failed fetch, from the innermost error that tells one."""
    import http.client
    import socket
    import ssl

    from urllib3.exceptions import InvalidChunkLength, InvalidHeader, LocationValueError, ProxyError

    chain = _causes(e)
    proxy = "cannot reach the proxy: " if any(isinstance(c, ProxyError) for c in chain) else ""
    for c in reversed(chain):
        if isinstance(c, http.client.RemoteDisconnected):  # before ConnectionResetError: it is one
            return proxy + "server closed the connection without answering"
        if isinstance(c, ConnectionRefusedError):
            return proxy + "connection refused"
        if isinstance(c, ConnectionResetError):
            return proxy + "connection reset by the server"
        if isinstance(c, socket.gaierror):
            return proxy + "cannot resolve host name"
        if isinstance(c, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {c.verify_message}"
        if isinstance(c, ssl.SSLError):
            return f"TLS error: {c.reason or c}"
        if isinstance(c, http.client.LineTooLong):
            what = str(c).rpartition("when reading ")[2] or "line"
            return f"bad HTTP response: {what} longer than 64 KB"
        if isinstance(c, http.client.BadStatusLine):
            line = str(getattr(c, "line", "")).strip("'\" \r\n")
            return "bad HTTP response: " + ("bad status line" if line.startswith("HTTP/") else
                                            "no status line")
        if isinstance(c, http.client.UnknownProtocol):
            return f"bad HTTP response: unsupported protocol {getattr(c, 'version', '?')!r}"
        if isinstance(c, InvalidChunkLength):
            return "bad HTTP response: bad chunk size"
        if isinstance(c, http.client.HTTPException) and "more than 100 headers" in str(c):
            return "bad HTTP response: more than 100 headers"
        if isinstance(c, InvalidHeader):
            return f"bad HTTP response: {str(c)[:80]}"
        if isinstance(c, (LocationValueError, UnicodeError)):
            return f"bad URL: {str(c)[:80]}"
    inner = chain[-1]
    if isinstance(inner, http.client.HTTPException):
        return f"bad HTTP response ({type(inner).__name__})"
    if isinstance(inner, OSError):
        return f"{proxy}network error: {inner.strerror or str(inner) or type(inner).__name__}"
    return f"bad HTTP response ({type(inner).__name__}: {str(inner)[:80]})"
