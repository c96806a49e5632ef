"""The deadline of a whole fetch over urllib3.

urllib3's timeouts bound each socket operation only, which a server sending a
byte a second never trips. Connections made through `pool_classes()` report
their sockets to the Deadline entered on their thread, and its timer shuts them
down when time is up; reads then end, and the fetch sees `fired`.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import TYPE_CHECKING, Any

from ofacls.errors import FetchError

if TYPE_CHECKING:
    import socket

# The deadline of the fetch running on this thread, for the connections it opens.
_watching = threading.local()


class Deadline:
    """The time limit of a whole fetch, for the connections this thread opens
    while it is entered. A timer shuts down every socket they opened when time
    is up; it holds duplicates of them, since TLS wrapping detaches the socket
    object urllib3 first connects."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.message = f"timed out after {seconds:g} s"
        self._end = time.monotonic() + seconds
        self._expired = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def fired(self) -> bool:  # the timer shut the sockets down, which reads see as a clean end
        return self._expired.is_set()

    @property
    def expired(self) -> bool:
        return self._expired.is_set() or time.monotonic() >= self._end

    def remaining(self) -> float:
        """Seconds left; FetchError when there are none."""
        left = self._end - time.monotonic()
        if left <= 0 or self._expired.is_set():
            raise FetchError(self.message)
        return left

    def watch(self, sock: socket.socket) -> None:
        dup = sock.dup()
        with self._lock:
            self._socks.append(dup)
            if self._expired.is_set():
                _shutdown(dup)

    def _expire(self) -> None:
        # under the lock, so close() cannot free a descriptor between check and use
        with self._lock:
            self._expired.set()
            for sock in self._socks:
                _shutdown(sock)

    def __enter__(self) -> Deadline:
        _watching.deadline = self
        return self

    def __exit__(self, *exc: object) -> None:
        _watching.deadline = None
        self.close()

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks.clear()


def _shutdown(sock: socket.socket) -> None:
    import socket

    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more: nothing left to interrupt


@functools.cache
def pool_classes() -> dict[str, Any]:
    """urllib3's pool classes, whose new connections report their socket to the deadline."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Watched:
        def _new_conn(self) -> socket.socket:
            sock: socket.socket = super()._new_conn()  # type: ignore[misc]
            deadline: Deadline | None = getattr(_watching, "deadline", None)
            if deadline is not None:
                deadline.watch(sock)
            return sock

    def pool(base: type, connection: type) -> type:
        watched = type(connection.__name__, (Watched, connection), {})
        return type(base.__name__, (base,), {"ConnectionCls": watched})

    return {"http": pool(HTTPConnectionPool, HTTPConnection),
            "https": pool(HTTPSConnectionPool, HTTPSConnection)}
