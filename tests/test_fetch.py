"""fetch and inputs against hostile servers and odd stdin: every malformed response is
one input's one-line error, credentials never show, Retry-After is honoured within
the deadline; FIFOs are never opened, NUL lists and image bytes on stdin work, and a
list on stdin is expanded as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from httpserver import HTTPTestServer, answer, refused_url
from PIL import Image

from ofacls.errors import FetchError, InputError
from ofacls.sources.expand import BadInput, Source, expand_inputs, read_source
from ofacls.sources.fetch import REFUSED, UNREACHABLE, URLFetcher, fetch_url, is_public_address, redact

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"


def fetch_error(url: str, **kw: Any) -> str:
    with pytest.raises(FetchError) as e:
        read_source(Source(url, url, True), **kw)
    message = str(e.value)
    assert "\n" not in message and message
    return message


def expand(*inputs: str, **kw: Any) -> list[Source | BadInput]:
    return list(expand_inputs(list(inputs), **kw))


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """call(), failing (rather than hanging the suite) if it blocks past `seconds`."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as e:  # handed to the test's thread below
            result.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


# --- malformed responses ------------------------------------------------------------


MALFORMED = {
    "bad chunk size": (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + PNG,
                       "bad HTTP response: bad chunk size"),
    "header line over 64 KB": (OK_HEAD + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n" + PNG,
                               "bad HTTP response: header line longer than 64 KB"),
    "status line over 64 KB": (b"HTTP/1.1 200 " + b"O" * 70_000 + b"\r\n\r\n",
                               "bad HTTP response: status line longer than 64 KB"),
    "over 100 headers": (OK_HEAD + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n" + PNG,
                         "bad HTTP response: more than 100 headers"),
    "no status line": (b"GIF89a nothing like HTTP\r\n\r\n", "bad HTTP response: no status line"),
    "garbled status line": (b"HTTP/1.1 2x0 OK\r\n\r\n", "bad HTTP response: bad status line"),
    "nothing at all": (b"", "server closed the connection without answering"),
    "short body": (OK_HEAD + b"Content-Length: 100\r\n\r\n" + b"x" * 40,
                   "download cut short: 40 of 100 bytes"),
    "short chunked body": (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b"y" * 16 + b"\r\n",
                           "download cut short after 16 bytes"),
    "conflicting lengths": (OK_HEAD + b"Content-Length: 10\r\nContent-Length: 20\r\n\r\n" + b"z" * 20,
                            None),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_each_malformed_response_is_a_one_line_error(http_server: HTTPTestServer, case: str) -> None:
    data, message = MALFORMED[case]
    error = fetch_error(http_server.raw("/x.png", data), timeout=5)
    if message is None:  # urllib3 versions word it differently: only its kind is fixed
        assert error.startswith(("bad HTTP response", "download cut short")), error
    else:
        assert error == message


def test_a_body_cut_short_by_a_reset_is_an_error(http_server: HTTPTestServer) -> None:
    def reset(req: Any) -> None:
        req.wfile.write(OK_HEAD + b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
        req.wfile.flush()
        req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        req.close_connection = True

    http_server.route("/reset.png", reset)
    assert fetch_error(http_server.url("/reset.png"), timeout=5).startswith("download cut short: ")


def test_complete_chunked_body_is_read(http_server: HTTPTestServer) -> None:
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(PNG), PNG)
    url = http_server.raw("/chunked.png", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert read_source(Source(url, url, True)) == PNG


def test_a_host_with_a_space_in_a_list_or_a_redirect(cwd: Path, http_server: HTTPTestServer) -> None:
    Path("urls.txt").write_text("http://bad host/x.png\nhttp://a\u3000b.test/y.png\n")
    items = expand("urls.txt")
    assert [i.name for i in items] == ["http://bad host/x.png", "http://a\u3000b.test/y.png"]
    for item in items:
        assert isinstance(item, Source)
        with pytest.raises(FetchError, match=r"^bad URL: invalid host name '.*'$"):
            read_source(item)
    http_server.redirect("/hop", "http://bad host/x.png")
    assert fetch_error(http_server.url("/hop")) == "redirect to a bad URL: invalid host name 'bad host'"
    http_server.redirect("/port", "http://127.0.0.1:99999/x.png")
    assert fetch_error(http_server.url("/port")).startswith("redirect to a bad URL: ")


def test_malformed_responses_are_rows_through_the_runner(model: Path, http_server: HTTPTestServer) -> None:
    from ofacls.classifier import Classifier
    from ofacls.runner import Item, Options, iter_predictions

    urls = {http_server.raw(f"/{i}.png", data): message
            for i, (data, message) in enumerate(MALFORMED.values()) if message}
    urls[http_server.redirect("/hop", "http://bad host/x.png")] = (
        "redirect to a bad URL: invalid host name 'bad host'")
    clf = Classifier.from_pretrained(model, device="cpu")
    items = [Item(u, Source(u, u, True)) for u in urls]
    rows = list(iter_predictions(items, clf, Options(timeout=5, workers=4)))
    assert [(r.input, r.error) for r in rows] == list(urls.items())


# --- credentials --------------------------------------------------------------------


def test_credentials_are_redacted_in_names_and_messages(http_server: HTTPTestServer) -> None:
    secret = f"http://alice:s3cret@127.0.0.1:{http_server.port}"
    urls = [secret + "/404.png", refused_url().replace("http://", "http://alice:s3cret@"),
            http_server.hang("/hang.png").replace("http://", "http://alice:s3cret@"),
            "http://alice:s3cret@bad host/x.png", "ftp://alice:s3cret@host/x.png"]
    items = expand(*urls)
    assert [i.name for i in items] == [u.replace("alice:s3cret@", "***@") for u in urls]
    messages = []
    for item in items:
        assert isinstance(item, Source) and "s3cret" in item.location
        with pytest.raises(FetchError) as e:
            read_source(item, timeout=0.5 if "hang" in item.location else 10)
        messages.append(str(e.value))
    assert messages[0] == "HTTP 404 Not Found"
    assert not any("s3cret" in m or "alice" in m for m in messages), messages


def test_credentials_are_sent_to_their_host_only(http_server: HTTPTestServer) -> None:
    with HTTPTestServer() as other:
        other.serve("/img.png", PNG)
        http_server.serve("/img.png", PNG)
        http_server.redirect("/local", "/img.png")
        http_server.redirect("/away", other.url("/img.png"))
        base = f"http://alice:s3cret@127.0.0.1:{http_server.port}"
        assert read_source(Source(base + "/local", base + "/local", True)) == PNG
        assert read_source(Source(base + "/away", base + "/away", True)) == PNG
        auth = [headers.get("Authorization") for _, headers in http_server.received]
        assert auth == ["Basic YWxpY2U6czNjcmV0"] * 3  # base64("alice:s3cret")
        assert "Authorization" not in other.received[0][1]


def test_proxy_credentials_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "socks5://bob:hunter2@proxy.invalid:1080")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    message = fetch_error("http://images.invalid/cat.png")
    assert message == ("unsupported proxy 'socks5://***@proxy.invalid:1080' "
                       "(only http:// and https:// proxies)")


# --- Retry-After --------------------------------------------------------------------


def busy(status: int = 503, after: str | None = "0") -> Callable[[Any], None]:
    return answer(b"busy", status=status, content_type="text/plain",
                  headers={"Retry-After": after} if after is not None else {})


def test_retry_after_is_honoured_up_to_three_times(http_server: HTTPTestServer) -> None:
    url = http_server.sequence("/busy.png", busy(), busy(429), busy(), answer(PNG))
    assert read_source(Source(url, url, True)) == PNG
    assert len(http_server.requests) == 4
    url = http_server.sequence("/always.png", busy(429))
    assert fetch_error(url) == "HTTP 429 Too Many Requests (still, after 3 retries)"
    assert len(http_server.requests) == 4 + 4


def test_retry_after_as_an_http_date(http_server: HTTPTestServer) -> None:
    # whole seconds, as HTTP dates have: the retry is due 1-2 s from now
    url = http_server.sequence("/date.png", busy(after=formatdate(int(time.time()) + 2, usegmt=True)),
                               answer(PNG))
    assert read_source(Source(url, url, True)) == PNG
    (first, _), (second, _) = http_server.received
    assert 0.5 < second - first < 3.5


def test_retry_after_gives_up_within_the_deadline(http_server: HTTPTestServer) -> None:
    url = http_server.sequence("/slow.png", busy(after="2"))
    started = time.monotonic()
    assert fetch_error(url, timeout=3) == (
        "HTTP 503 Service Unavailable (the server asks to retry in 2 s, past the 3 s timeout)")
    assert 1.9 < time.monotonic() - started < 3
    assert len(http_server.requests) == 2
    started = time.monotonic()
    url = http_server.sequence("/later.png", busy(after=formatdate(time.time() + 3600, usegmt=True)))
    assert fetch_error(url, timeout=5).startswith("HTTP 503 Service Unavailable (the server asks to retry in")
    assert time.monotonic() - started < 4  # at once, not after the 5 s timeout


def test_no_retry_without_retry_after_or_for_other_statuses(http_server: HTTPTestServer) -> None:
    assert fetch_error(http_server.sequence("/a.png", busy(after=None))) == "HTTP 503 Service Unavailable"
    assert fetch_error(http_server.sequence("/b.png", busy(500))) == "HTTP 500 Internal Server Error"
    assert fetch_error(http_server.sequence("/c.png", busy(after="soon"))) == "HTTP 503 Service Unavailable"
    assert len(http_server.requests) == 3


def test_a_header_trickled_forever_still_times_out(http_server: HTTPTestServer) -> None:
    def trickle(req: Any) -> None:
        req.wfile.write(OK_HEAD)
        while not http_server.stopping.wait(0.05):
            try:
                req.wfile.write(b"X")
                req.wfile.flush()
            except OSError:
                return

    http_server.route("/drip", trickle)
    started = time.monotonic()
    assert fetch_error(http_server.url("/drip"), timeout=0.5) == "timed out after 0.5 s"
    assert time.monotonic() - started < 2


# --- FIFOs, sockets, devices ----------------------------------------------------------


def test_a_fifo_is_an_error_row_never_opened(cwd: Path) -> None:
    Path("real.jpg").write_bytes(PNG)
    os.mkfifo("pipe.jpg")
    os.mkfifo("list.txt")
    Path("photos").mkdir()
    os.mkfifo("photos/pipe.png")
    os.mkfifo("photos/pipe")  # not named like an image: a walk skips it
    Path("photos/a.png").write_bytes(PNG)
    fifo = "not a regular file (a named pipe)"
    assert within(5, lambda: expand("pipe.jpg", "list.txt", "*.jpg", "photos")) == [
        BadInput("pipe.jpg", fifo),
        BadInput("list.txt", fifo),
        BadInput("pipe.jpg", fifo),
        Source("real.jpg", "real.jpg", False),
        Source("photos/a.png", "photos/a.png", False),
        BadInput("photos/pipe.png", fifo),
    ]
    assert within(5, lambda: expand("photos/*", walk=False))[-1] == BadInput("photos/pipe.png", fifo)
    with pytest.raises(InputError, match=r"^not a regular file \(a named pipe\)$"):
        within(5, lambda: read_source(Source("pipe.jpg", "pipe.jpg", False)))


def test_a_socket_and_a_device_are_error_rows(cwd: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("sock.png")
        assert expand("sock.png", "/dev/null") == [
            BadInput("sock.png", "not a regular file (a socket)"),
            BadInput("/dev/null", "not a regular file (a character device)"),
        ]


def test_a_symlink_to_a_regular_file_is_read(cwd: Path) -> None:
    Path("real.png").write_bytes(PNG)
    os.symlink("real.png", "link.png")
    os.mkfifo("pipe")
    os.symlink("pipe", "pipe-link.png")
    items = expand("link.png", "pipe-link.png")
    assert items[0] == Source("link.png", "link.png", False) and read_source(items[0]) == PNG
    assert items[1] == BadInput("pipe-link.png", "not a regular file (a named pipe)")


# --- lists: NUL-separated, NUL in a line, streaming -------------------------------------


def test_nul_separated_list_takes_entries_exactly(cwd: Path) -> None:
    names = ["a.jpg", "with space.jpg", " lead.jpg", "#hash.jpg", "new\nline.jpg", "tab\t.jpg"]
    for n in names:
        Path(n).write_bytes(PNG)
    data = b"".join(n.encode() + b"\0" for n in names) + b"\0"  # an empty entry is skipped
    items = expand("-", stdin=io.BytesIO(data), null=True)
    assert items == [Source(n, n, False) for n in names]
    Path("list.txt").write_bytes(data)
    assert expand("list.txt", null=True) == items


def test_find_print0_piped_in(cwd: Path) -> None:
    for n in ["b.jpg", "a dir/c.png", "x\ny.gif"]:
        Path(n).parent.mkdir(exist_ok=True)
        Path(n).write_bytes(PNG)
    found = subprocess.run(["find", ".", "-type", "f", "-print0"], capture_output=True, check=True).stdout
    items = expand("-", stdin=io.BytesIO(found), null=True)
    assert sorted(i.name for i in items) == ["./a dir/c.png", "./b.jpg", "./x\ny.gif"]
    assert all(isinstance(i, Source) for i in items)


def test_a_nul_in_a_newline_list_is_an_error_row(cwd: Path) -> None:
    Path("a.jpg").write_bytes(PNG)
    data = b"a.jpg\nbro\0ken.jpg\na.jpg\n"
    nul = "contains a NUL byte (a NUL-separated list needs -0)"
    expected = [Source("a.jpg", "a.jpg", False), BadInput("bro\\0ken.jpg", nul),
                Source("a.jpg", "a.jpg", False)]
    assert expand("-", stdin=io.BytesIO(data)) == expected
    Path("list.txt").write_bytes(data)
    assert expand("list.txt") == expected
    # a NUL list read as lines is one entry, not a traceback
    assert expand("-", stdin=io.BytesIO(b"a.jpg\0a.jpg\0")) == [BadInput("a.jpg\\0a.jpg\\0", nul)]


@pytest.mark.parametrize("null", [False, True])
def test_a_list_on_stdin_is_expanded_as_it_arrives(cwd: Path, null: bool) -> None:
    for n in ["IMG_1.jpg", "b.jpg"]:
        Path(n).write_bytes(PNG)
    sep = b"\0" if null else b"\n"
    r, w = os.pipe()
    with io.TextIOWrapper(os.fdopen(r, "rb")) as stdin, os.fdopen(w, "wb", buffering=0) as writer:
        items = expand_inputs(["-"], stdin=stdin, null=null)
        writer.write(b"IMG_1.jpg" + sep)  # starts like a TIFF's "II": still not held up
        assert within(5, lambda: next(items)) == Source("IMG_1.jpg", "IMG_1.jpg", False)
        writer.write(b"b.jpg" + sep)
        assert within(5, lambda: next(items)) == Source("b.jpg", "b.jpg", False)
        writer.close()
        assert list(items) == []


# --- an image on stdin ----------------------------------------------------------------


def image_bytes(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_image_bytes_on_stdin_are_one_input_named_dash(fmt: str) -> None:
    data = image_bytes(fmt)
    items = expand("-", stdin=io.TextIOWrapper(io.BytesIO(data)))
    assert items == [Source("-", "-", False, data)] and isinstance(items[0], Source)
    assert read_source(items[0]) == data
    assert expand("-", stdin=io.BytesIO(data), max_bytes=len(data) - 1) == [
        BadInput("-", f"larger than the {len(data) - 1} bytes limit")]


def test_lists_that_start_like_an_image_signature_are_still_lists(cwd: Path) -> None:
    names = ["BMW.jpg", "GIF.png", "RIFF.webp", "II.jpg", "MM.jpg", "BM"]
    for n in names:
        Path(n).write_bytes(PNG)
        assert expand("-", stdin=io.BytesIO(n.encode() + b"\n")) == [Source(n, n, False)], n
    assert expand("-", stdin=io.BytesIO(b"")) == [BadInput("-", "nothing came on stdin")]


def test_image_on_stdin_through_the_runner(model: Path) -> None:
    from ofacls.classifier import Classifier
    from ofacls.runner import Item, Options, iter_predictions

    (source,) = expand_inputs(["-"], stdin=io.BytesIO(image_bytes("PNG")))
    assert isinstance(source, Source)
    clf = Classifier.from_pretrained(model, device="cpu")
    (row,) = iter_predictions([Item(source.name, source)], clf, Options(top_k=2))
    assert row.input == "-" and row.error is None and len(row.top_k) == 2


def test_an_image_over_a_tiny_cap_is_not_read_whole() -> None:
    data = image_bytes("PNG")
    too_big = [BadInput("-", "larger than the 4 bytes limit")]
    assert expand("-", stdin=io.BytesIO(data), max_bytes=4) == too_big


def test_an_unreachable_proxy_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", refused_url("").replace("http://", "http://bob:hunter2@"))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert fetch_error("http://images.invalid/cat.png") == "cannot reach the proxy: connection refused"


# --- the destination guard (allow_private=False) ----------------------------------------

LOOPBACK_SPELLINGS = ["localhost", "127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.1",
                      "[::ffff:127.0.0.1]"]
ONLY_127_0_0_2: Callable[[Any], bool] = lambda ip: ip == ip_address("127.0.0.2")  # noqa: E731


def guarded_error(url: str, **kw: Any) -> str:
    with pytest.raises(FetchError) as e:
        fetch_url(url, allow_private=False, **{"timeout": 5, **kw})
    return str(e.value)


@dataclass
class Internal:
    host: str
    port: int
    requests: list[str] = field(default_factory=list)  # the paths asked for
    hosts: list[str] = field(default_factory=list)  # their Host headers

    def url(self, path: str) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}{path}"


@contextlib.contextmanager
def internal_server(host: str, port: int = 0, *, location: str | None = None,
                    tls: ssl.SSLContext | None = None) -> Iterator[Internal]:
    """An HTTP(S) server on `host` (::1, 127.0.0.2: where HTTPTestServer does not listen)
    answering every GET with PNG, or with a redirect to `location`."""
    server = Internal(host, port)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.requests.append(self.path)
            server.hosts.append(self.headers.get("Host", ""))
            self.send_response(200 if location is None else 302)
            if location is not None:
                self.send_header("Location", location)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    try:
        httpd = Server((host, port), Handler)
    except OSError as e:
        pytest.skip(f"cannot listen on {host}: {e}")
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_a_guarded_fetch_never_reaches_loopback_however_spelled(http_server: HTTPTestServer,
                                                                host: str) -> None:
    url = f"http://{host}:{http_server.port}/cat.png"
    http_server.serve("/cat.png", PNG)
    assert guarded_error(url) == REFUSED
    assert http_server.requests == []
    assert fetch_url(url, timeout=5) == PNG  # the default (the CLI's): the same URL reaches it
    assert http_server.requests == ["/cat.png"]


def test_a_guarded_fetch_never_reaches_ipv6_loopback() -> None:
    with internal_server("::1") as internal:
        url = f"http://[::1]:{internal.port}/cat.png"
        assert guarded_error(url) == REFUSED
        assert internal.requests == []
        assert fetch_url(url, timeout=5) == PNG
        assert internal.requests == ["/cat.png"]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_a_redirect_to_loopback_is_refused(http_server: HTTPTestServer, host: str) -> None:
    http_server.serve("/cat.png", PNG)
    target = f"http://{host}:{http_server.port}/cat.png"
    # 127.0.0.2 plays a public server, which redirects to the internal one on 127.0.0.1
    with internal_server("127.0.0.2", location=target) as public:
        assert guarded_error(public.url("/hop"), allowed=ONLY_127_0_0_2) == REFUSED
        assert public.requests == ["/hop"] and http_server.requests == []
        assert fetch_url(public.url("/hop"), timeout=5) == PNG
        assert http_server.requests == ["/cat.png"]


def test_a_name_that_rebinds_after_the_check_is_connected_to_as_checked(
        http_server: HTTPTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo
    answers = iter(["127.0.0.2"])  # the first answer passes the check; every later one is internal

    def rebinding(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host == "rebind.test":
            host = next(answers, "127.0.0.1")
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    http_server.serve("/cat.png", b"internal")
    with internal_server("127.0.0.2", http_server.port) as public:
        url = f"http://rebind.test:{http_server.port}/cat.png"
        assert fetch_url(url, timeout=5, allow_private=False, allowed=ONLY_127_0_0_2) == PNG
        assert public.requests == ["/cat.png"] and http_server.requests == []


def test_a_name_with_one_private_address_among_public_ones_is_refused(
        http_server: HTTPTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def two_addresses(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host == "mixed.test":
            return real("127.0.0.1", port, *args, **kw) + real("127.0.0.2", port, *args, **kw)
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    url = http_server.serve("/cat.png", PNG).replace("127.0.0.1", "mixed.test")
    assert guarded_error(url, allowed=ONLY_127_0_0_2) == REFUSED
    assert http_server.requests == []


def test_a_guarded_fetch_tries_each_checked_address_in_turn(
        http_server: HTTPTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def two_addresses(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host == "two.test":  # nothing listens on 127.0.0.2: the first address refuses
            return real("127.0.0.2", port, *args, **kw) + real("127.0.0.1", port, *args, **kw)
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    url = http_server.serve("/cat.png", PNG).replace("127.0.0.1", "two.test")
    assert fetch_url(url, timeout=5, allow_private=False, allowed=lambda ip: True) == PNG
    assert http_server.received[0][1]["Host"] == f"two.test:{http_server.port}"


def test_guarded_errors_do_not_tell_what_is_at_an_address(http_server: HTTPTestServer) -> None:
    refused, open_port = refused_url(), http_server.serve("/cat.png", PNG)
    assert fetch_error(refused) == "connection refused"  # unguarded: the detailed reason
    assert guarded_error(refused) == guarded_error(open_port) == REFUSED
    # where loopback counts as public, whatever goes wrong on the network reads the same
    everything = {"allowed": lambda ip: True}
    assert guarded_error(refused, **everything) == UNREACHABLE
    for n, name in enumerate(["header line over 64 KB", "status line over 64 KB", "over 100 headers",
                              "no status line", "garbled status line", "nothing at all"]):
        assert guarded_error(http_server.raw(f"/{n}.png", MALFORMED[name][0]), **everything) == UNREACHABLE
    assert guarded_error(http_server.raw("/banner", b"SSH-2.0-OpenSSH_9.6\r\n"), **everything) == UNREACHABLE
    # what a reached public server answers is still named
    assert guarded_error(http_server.url("/missing"), **everything) == "HTTP 404 Not Found"
    assert guarded_error(http_server.hang("/slow"), timeout=0.3, **everything) == "timed out after 0.3 s"


def test_a_guarded_fetch_through_a_proxy_checks_the_host_first(
        http_server: HTTPTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo
    names = {"internal.test": "10.1.2.3", "public.test": "93.184.216.34"}

    def resolve(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        return real(names.get(host, host), port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setenv("http_proxy", http_server.url(""))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    http_server.serve("http://public.test/cat.png", PNG)
    assert guarded_error("http://internal.test/cat.png") == REFUSED
    assert guarded_error(f"http://127.0.0.1:{http_server.port}/cat.png") == REFUSED  # never proxied
    assert http_server.requests == []
    assert fetch_url("http://public.test/cat.png", timeout=5, allow_private=False) == PNG
    assert http_server.requests == ["http://public.test/cat.png"]


def test_a_guarded_https_fetch_keeps_the_host_name_for_tls_and_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                           "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj",
                           "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"], capture_output=True)
    if made.returncode:
        pytest.skip("openssl cannot make a test certificate here")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted for this test only
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    names: list[str | None] = []
    tls.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,func-returns-value]
    with internal_server("127.0.0.2", tls=tls) as public:
        # localhost resolves to 127.0.0.1 here: a name that resolves to 127.0.0.2 stands in
        url = f"https://localhost:{public.port}/cat.png"
        real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **kw: real(
            "127.0.0.2" if host == "localhost" else host, *a, **kw))
        assert fetch_url(url, timeout=5, allow_private=False, allowed=ONLY_127_0_0_2) == PNG
        assert names == ["localhost"] and public.hosts == [f"localhost:{public.port}"]


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(ip_address(address))


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.0.2.1",
    "::", "::1", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "::127.0.0.1", "2002:7f00:1::", "2002:a00:1::", "64:ff9b::a00:1", "64:ff9b::7f00:1"])
def test_internal_addresses(address: str) -> None:
    assert not is_public_address(ip_address(address))


def test_redact_is_exported_for_the_service() -> None:
    import ofacls.sources.fetch

    assert "redact" in ofacls.sources.fetch.__all__
    assert redact("GET https://alice:s3cret@host/x.png failed") == "GET https://***@host/x.png failed"


# --- bounded fetch threads -----------------------------------------------------------


def test_url_fetcher_bounds_its_threads_and_queue(http_server: HTTPTestServer) -> None:
    slow, cat = http_server.hang("/slow.png"), http_server.serve("/cat.png", PNG)  # guard off: loopback
    fetcher = URLFetcher(2, max_waiting=1, timeout=0.5, allow_private=True)
    try:
        futures = [fetcher.submit(slow) for _ in range(3)]
        assert fetcher.full()
        with pytest.raises(FetchError, match="^too many URLs being fetched; try again later$"):
            fetcher.submit(cat)
        for future in futures:
            with pytest.raises(FetchError, match=r"^timed out after 0\.5 s$"):
                future.result(timeout=5)
        assert within(5, lambda: not fetcher.full())
        assert asyncio.run(fetcher.fetch(cat)) == PNG
    finally:
        fetcher.close()


def test_url_fetcher_is_guarded_by_default(http_server: HTTPTestServer) -> None:
    fetcher = URLFetcher(1)
    try:
        with pytest.raises(FetchError, match=f"^{REFUSED}$"):
            asyncio.run(fetcher.fetch(http_server.serve("/cat.png", PNG)))
        assert http_server.requests == []
    finally:
        fetcher.close()
