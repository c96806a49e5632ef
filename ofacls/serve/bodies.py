"""Reading request bodies within the service's caps: size, bytes held at once, time.

Every body is read whole before it is used (an image cannot be decoded from half
of one), so what bounds the service's memory is how many bytes all requests hold
together: `ByteBudget`. A request with a Content-Length takes its whole length
from the budget before a byte of its body is read, so a crowd of uploads that
announce large bodies and then stall are refused at once, not buffered.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.types import Receive


class BodyTooLarge(Exception):
    """The body is over the per-request limit."""


class NoRoom(Exception):
    """Taking this body would put the bytes held by all requests over the budget."""


class BodyTimeout(Exception):
    """The client did not send its whole body in time."""


class ByteBudget:
    """Bytes of request bodies held at once, across all requests. Used on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """What one request holds of the budget, given back whole by `release`."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget, self.held = budget, 0

    def take(self, n: int) -> None:
        """Hold `n` more bytes; NoRoom when the budget has not that many left."""
        if self.budget.used + n > self.budget.limit:
            raise NoRoom
        self.budget.used += n
        self.held += n

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0


async def read_body(receive: Receive, lease: Lease, *, declared: int | None, limit: int,
                    seconds: float) -> bytearray:
    """The whole body, at most `limit` bytes, sent within `seconds`, held under `lease`.

    BodyTooLarge, NoRoom (the budget is spent: retry later), BodyTimeout, or
    Starlette's ClientDisconnect when the client goes away mid-body.
    """
    import anyio

    if declared is not None:
        if declared > limit:
            raise BodyTooLarge
        lease.take(declared)
    # one bytearray grown in place: a body sent a byte per packet arrives as a
    # million chunks, and a list of them would cost a million objects to join
    body = bytearray()
    try:
        # one deadline for the whole body: a per-chunk timeout never trips for a
        # client that sends a byte every few seconds
        with anyio.fail_after(seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect
                chunk = message.get("body", b"")
                if chunk:
                    if len(body) + len(chunk) > limit:
                        raise BodyTooLarge
                    if declared is None:  # no Content-Length (chunked): held as it comes
                        lease.take(len(chunk))
                    body += chunk
                if not message.get("more_body", False):
                    return body
    except TimeoutError:
        raise BodyTimeout from None
