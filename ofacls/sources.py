"""What to classify: files, folders, globs, URLs, list files and stdin, as Sources.

`expand_inputs` turns what the user typed into a stream with exactly one item
per thing to classify: a `Source` to read, or a `BadInput` naming an input that
cannot be (a missing path, a symlink loop, a glob that matches nothing), so the
caller writes one error row for it and the batch goes on. `read_source` turns a
Source into bytes, raising `InputError` / `FetchError` with a one-line reason.

Rules, chosen so a shell user is never surprised:

- A Source's `name` is the path or URL exactly as given. Files found by walking
  a folder or expanding a glob are named by the folder or pattern's base as
  given, joined with the path below it (`photos/sub/a.jpg` for `photos`,
  `./photos/x.png` for `./photos`).
- Order is deterministic: inputs in the order given; below a folder, entries
  sorted by name at each level, depth first; glob matches in the same order.
- Duplicates are kept: every input given gets its own rows, so `a.jpg a.jpg`
  gives two rows. Only within one folder walk or glob is a file yielded once.
- An existing path is taken literally even if it contains `*?[`; anything else
  with those characters is a glob (`**` spans folders). Folders a glob matches
  are walked, except that the walks do not enter the folders the glob's own
  matches were found in (so `tree/*` with a link `tree/sub/up -> ..` yields
  each image once).
- `predict` (`walk=False`) classifies files, never folders: a folder named
  directly is refused (`ofacls batch` walks folders), folders a glob matches are
  skipped, and a trailing `**` matches the files at every depth below, as in
  bash with globstar (`photos/**` is every visible file under photos).
- Folders: images recognised by extension (IMAGE_EXTENSIONS, any case); other
  files, hidden files and hidden folders are skipped; symlinked folders are
  followed, but no real folder is visited twice, which also survives loops. A
  symlink that loops on itself (`a -> a`) is reported; a dangling symlink is
  reported when its name looks like an image, and skipped otherwise.
- List files (`*.txt` given on the command line, and `-` for stdin): one path or
  URL per line; surrounding whitespace, blank lines and lines starting with `#`
  are ignored, CRLF and a UTF-8 BOM are tolerated. Relative paths resolve
  against the current directory (as with paths typed on the command line), and
  the row's `input` is the line as written. A line may name a file, a folder
  (walked), a glob or a URL, but not another list file.
- An input that yields nothing (empty folder, glob without matches, empty list)
  still gets one BadInput, so no input silently vanishes from the output.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, TextIO

from ofacls.errors import FetchError, InputError

if TYPE_CHECKING:
    import http.client
    import socket

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
LIST_EXTENSION = ".txt"

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 50 * 2**20
DEFAULT_MAX_REDIRECTS = 5

_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|data:)", re.IGNORECASE)
_GLOB_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Source:
    """One thing to classify."""

    name: str  # exactly what the output row's `input` shows
    location: str  # path or URL to read
    is_url: bool


@dataclass(frozen=True)
class BadInput:
    """An input that names nothing readable; the caller writes it as an error row."""

    name: str  # exactly what the output row's `input` shows
    error: str  # one line, e.g. "no such file or directory"


def is_url(text: str) -> bool:
    """Whether an input is a URL (any scheme; read_source refuses all but http(s))."""
    return bool(_URL.match(text))


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions folders are filtered by."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def parse_list(text: str) -> list[str]:
    """The entries of a list file: one per line, blanks and `#` comments dropped."""
    entries = []
    for line in text.removeprefix("\ufeff").split("\n"):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line)
    return entries


def expand_inputs(
    inputs: Sequence[str], *, stdin: TextIO | None = None, walk: bool = True
) -> Iterator[Source | BadInput]:
    """Every input as Sources to read, or a BadInput saying why it has none.

    `-` reads a list from `stdin` (default sys.stdin; read once: a second `-`
    is a BadInput). With `walk=False` (for `predict`) folders are not walked:
    see the module docstring. Lazy: a huge folder streams rather than being listed
    up front (glob matches are collected and sorted first).
    """
    stdin_used = False
    for arg in inputs:
        if arg == "-":
            if stdin_used:
                yield BadInput("-", "stdin was already read by an earlier '-'")
                continue
            stdin_used = True
            text = _read_text(stdin or sys.stdin)
            yield from _expand_list("-", text, walk=walk)
        else:
            yield from _expand(arg, walk=walk, lists=True)


def read_source(
    source: Source,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
) -> bytes:
    """The bytes of a file or URL; InputError (FetchError for URLs) saying why not.

    URLs: only http and https (also as redirect targets); `timeout` bounds the
    whole download, redirects included, so a server that trickles bytes forever
    still times out; more than `max_bytes` is refused (early, from
    Content-Length, when the server sends one); text and HTML are refused.
    Files are read whole: the size cap applies only to pipes and devices, since
    a regular file's size is known and large TIFFs are legitimate.
    """
    if source.is_url:
        return _fetch(source.location, timeout, max_bytes, max_redirects)
    return _read_file(source.location, max_bytes)


# --- expanding inputs --------------------------------------------------------------


def _expand(arg: str, *, walk: bool, lists: bool) -> Iterator[Source | BadInput]:
    """One command-line argument or list line."""
    if is_url(arg):
        yield Source(arg, arg, True)
        return
    try:
        os.lstat(arg)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and _GLOB_MAGIC.search(arg):
            yield from _expand_glob(arg, walk=walk)
        else:
            yield BadInput(arg, _os_message(e))
        return
    try:
        st = os.stat(arg)
    except OSError as e:
        yield BadInput(arg, _os_message(e, path=arg))
        return
    if stat.S_ISDIR(st.st_mode):
        if walk:
            yield from _nonempty(arg, _walk(arg, set()), "no images found in this folder")
        else:
            yield BadInput(arg, "is a directory (ofacls batch walks folders)")
    elif stat.S_ISREG(st.st_mode) and arg.lower().endswith(LIST_EXTENSION):
        if not lists:
            yield BadInput(arg, "a list file cannot name another list file")
            return
        try:
            with open(arg, "rb") as f:
                text = _decode(f.read())
        except OSError as e:
            yield BadInput(arg, _os_message(e, path=arg))
            return
        yield from _expand_list(arg, text, walk=walk)
    else:
        # Named explicitly, so read whatever the extension: a PNG called .jpeg or
        # a file without extension must still classify.
        yield Source(arg, arg, False)


def _expand_list(name: str, text: str, *, walk: bool) -> Iterator[Source | BadInput]:
    items = (item for line in parse_list(text) for item in _expand(line, walk=walk, lists=False))
    yield from _nonempty(name, items, "the list names no inputs")


def _nonempty(
    name: str, items: Iterable[Source | BadInput], error: str
) -> Iterator[Source | BadInput]:
    """`items`, or one BadInput when there are none, so every input shows up in the output."""
    empty = True
    for item in items:
        empty = False
        yield item
    if empty:
        yield BadInput(name, error)


def _walk(
    root: str, seen: set[tuple[int, int]], *, seen_names: set[str] | None = None
) -> Iterator[Source | BadInput]:
    """Images below folder `root` (named and located as `root` joined with the path below).

    `seen` holds the (device, inode) of every folder already walked: a symlink to
    one of them (a loop, or a second link to the same place) is not entered again.
    An explicit stack, not recursion, so deep trees cannot exhaust Python's stack.
    """
    try:
        st = os.stat(root or ".")
    except OSError as e:
        yield BadInput(root, _os_message(e, path=root))
        return
    if (st.st_dev, st.st_ino) in seen:
        return
    seen.add((st.st_dev, st.st_ino))
    stack = [_listing(root)]
    while stack:
        try:
            entry = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if isinstance(entry, BadInput):
            yield entry
            continue
        dir_path, name = entry
        path = os.path.join(dir_path, name)
        try:
            st = os.stat(path)
        except OSError as e:
            # A loop link gives no hint whether it meant a file or a folder, so it
            # is always reported; a dangling link only when it looks like an image.
            if e.errno == errno.ELOOP or is_image_name(name):
                yield BadInput(path, _os_message(e, path=path))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                stack.append(_listing(path))
        elif stat.S_ISREG(st.st_mode) and is_image_name(name):
            if seen_names is not None:
                if path in seen_names:
                    continue
                seen_names.add(path)
            yield Source(path, path, False)


def _listing(folder: str) -> Iterator[tuple[str, str] | BadInput]:
    """(folder, name) for the visible entries of a folder, sorted by name."""
    try:
        names = _names(folder, hidden=False, strict=True)
    except OSError as e:
        yield BadInput(folder, _os_message(e, path=folder))
        return
    for name in names:
        yield folder, name


def _expand_glob(pattern: str, *, walk: bool) -> Iterator[Source | BadInput]:
    """A quoted glob, expanded like bash with globstar: `*`, `?`, `[...]` within a
    name, `**` across any number of folders. Hidden names match only a pattern
    part that starts with `.`. Each match is then taken like an argument of its
    own (folders walked, files read whatever their extension, a matched `.txt`
    read as an image, not a list), except that a trailing `**` matches folders
    only, so `photos/**` means "all images below". With `walk=False` matched
    folders are skipped instead, and a trailing `**` matches files too, as in bash.
    """
    start = _GLOB_MAGIC.search(pattern)
    assert start is not None
    base = pattern[: pattern.rfind("/", 0, start.start()) + 1]  # as given, with its "/"
    parts = [p for p in pattern[len(base) :].split("/") if p]
    if not walk and parts[-1] == "**" and not pattern.endswith("/"):
        parts.append("*")  # our `**` matches folders only; bash's also every file below
    dirs_only = pattern.endswith("/") or parts[-1] == "**"
    matches = sorted(set(_glob_parts(base, parts, dirs_only, set())), key=lambda p: p.split("/"))
    seen_dirs = _match_folders(matches, base) if walk else set()
    seen_files: set[str] = set()  # `a/**` style patterns reach a file both ways
    items: list[Source | BadInput] = []
    for path in matches:
        try:
            st = os.stat(path or ".")
        except OSError as e:
            items.append(BadInput(path, _os_message(e, path=path)))
            continue
        if stat.S_ISDIR(st.st_mode):
            if walk:  # else skipped: in predict a glob selects files
                items.extend(_walk(path, seen_dirs, seen_names=seen_files))
        elif path not in seen_files:
            seen_files.add(path)
            items.append(Source(path, path, False))
    yield from _nonempty(pattern, items, "no images match this pattern")


def _match_folders(matches: list[str], base: str) -> set[tuple[int, int]]:
    """(device, inode) of the folders a glob's matches were found in, to count as walked.

    Otherwise a matched folder's walk that links back into one (`tree/sub/up ->
    ..` for `tree/*`) yields those matches again under a longer name. Folders
    that are matches themselves (`p/**` matches p/ and p/sub/) are left out, as
    they are to be walked; paths, not inodes, decide that, so a link `p/self ->
    .` matched by `p/*` does not exempt p.
    """

    def norm(path: str) -> str:
        return os.path.normpath(path or ".")

    matched = {norm(p) for p in matches}
    parents = {norm(os.path.dirname(norm(p))) for p in matches if p != base} - matched
    keys: set[tuple[int, int]] = set()
    for parent in parents:
        try:
            st = os.stat(parent)
        except OSError:
            continue  # gone since the glob listed it: nothing to keep out
        keys.add((st.st_dev, st.st_ino))
    return keys


def _glob_parts(
    prefix: str, parts: list[str], dirs_only: bool, seen: set[tuple[int, int, int]]
) -> Iterator[str]:
    """Paths below folder `prefix` ("" for the current one) that match `parts`."""
    if not parts:
        yield prefix
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        try:
            st = os.stat(prefix or ".")
        except OSError:
            return
        # Keyed by how much pattern is left, so `**/a/**` may pass a folder twice.
        key = (st.st_dev, st.st_ino, len(parts))
        if key in seen:  # a symlink loop, or a second way to the same folder
            return
        seen.add(key)
        yield from _glob_parts(prefix, rest, dirs_only, seen)
        for name in _names(prefix, hidden=False):
            path = prefix + name
            if os.path.isdir(path):
                yield from _glob_parts(path + "/", parts, dirs_only, seen)
        return
    if _GLOB_MAGIC.search(head):
        hidden = head.startswith(".")
        names = [n for n in _names(prefix, hidden=hidden) if fnmatch.fnmatchcase(n, head)]
    else:
        names = [head] if os.path.lexists(prefix + head) else []
    for name in names:
        path = prefix + name
        if rest:
            if os.path.isdir(path):
                yield from _glob_parts(path + "/", rest, dirs_only, seen)
        elif not dirs_only or os.path.isdir(path):
            yield path


def _names(folder: str, *, hidden: bool, strict: bool = False) -> list[str]:
    """Sorted entry names of `folder` ("" is the current one); [] if unreadable unless strict."""
    try:
        with os.scandir(folder or ".") as entries:
            return sorted(e.name for e in entries if hidden or not e.name.startswith("."))
    except OSError:
        if strict:
            raise
        return []


def _read_text(stream: TextIO | None) -> str:
    """A list from a text stream; raw bytes when there are any, so a BOM and
    non-UTF-8 names survive whatever the locale's encoding is."""
    if stream is None:  # sys.stdin is None when the process has no stdin at all
        return ""
    buffer: BinaryIO | None = getattr(stream, "buffer", None)
    if buffer is not None:
        return _decode(buffer.read())
    return stream.read()


def _decode(data: bytes) -> str:
    # surrogateescape keeps file names that are not UTF-8 openable, as os.scandir does
    return data.decode("utf-8-sig", errors="surrogateescape")


def _os_message(e: OSError, *, path: str | None = None) -> str:
    """A short, lower-case reason for a failed file operation."""
    if e.errno == errno.ENOENT and path is not None and os.path.islink(path):
        return "dangling symlink"
    messages = {
        errno.ENOENT: "no such file or directory",
        errno.ENOTDIR: "no such file or directory",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ELOOP: "symlink loop",
        errno.EISDIR: "is a directory",
        errno.ENAMETOOLONG: "file name too long",
    }
    if e.errno in messages:
        return messages[e.errno]
    reason = e.strerror or str(e)
    return reason[:1].lower() + reason[1:]


# --- reading files -----------------------------------------------------------------


# Local image files are read whole (large scans and TIFFs are legitimate, so the
# download cap does not apply), but never beyond this: a multi-GB file named .jpg
# would otherwise cost that much memory on every loader thread.
MAX_FILE_BYTES = 2**30


def _read_file(path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            regular = stat.S_ISREG(info.st_mode)
            if regular and info.st_size > MAX_FILE_BYTES:
                raise InputError(f"file is {_size(info.st_size)}, over the "
                                 f"{_size(MAX_FILE_BYTES)} limit for an image")
            # a pipe or device may never end, so only a regular file is read whole
            data = f.read() if regular else f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(_os_message(e, path=path)) from None
    if not regular and len(data) > max_bytes:
        raise InputError(f"larger than the {_size(max_bytes)} limit")
    if not data:
        raise InputError("empty file")
    return data


# --- fetching URLs -----------------------------------------------------------------

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NOT_IMAGES = frozenset({"application/json", "application/xhtml+xml", "application/xml"})
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_CHUNK = 64 * 1024


class _Deadline:
    """The time limit of a whole fetch, redirects included.

    Socket timeouts alone bound each read, not the download: a server sending a
    byte a second would never trip them. So a timer also shuts the current
    socket down when time is up, which wakes any read blocked on it.
    """

    def __init__(self, seconds: float) -> None:
        self.message = f"timed out after {seconds:g} s"
        self._end = time.monotonic() + seconds
        self._expired = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def fired(self) -> bool:
        """Whether the timer has shut a socket down."""
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

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
        if self._expired.is_set():
            self._expire()

    def _expire(self) -> None:
        import socket

        self._expired.set()
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed: nothing left to interrupt

    def cancel(self) -> None:
        self._timer.cancel()


def _fetch(url: str, timeout: float, max_bytes: int, max_redirects: int) -> bytes:
    deadline = _Deadline(timeout)
    visited: list[str] = []
    try:
        while True:
            conn, resp = _request(url, deadline, redirected=bool(visited))
            try:
                location = resp.getheader("Location")
                if resp.status in _REDIRECTS and location:
                    target = _join_url(url, location.strip())
                    if target == url or target in visited:
                        raise FetchError("redirect loop")
                    if len(visited) >= max_redirects:
                        raise FetchError(f"too many redirects (more than {max_redirects})")
                    visited.append(url)
                    url = target
                    continue
                _check_response(resp, max_bytes)
                return _read_body(resp, conn, deadline, max_bytes)
            finally:
                deadline.watch(None)
                conn.close()
    except FetchError:
        raise
    except (OSError, ValueError, EOFError) as e:  # http.client errors are OSError or ValueError
        timed_out = deadline.expired or isinstance(e, TimeoutError)
        raise FetchError(deadline.message if timed_out else _network_message(e)) from None
    finally:
        deadline.cancel()


def _network_message(e: BaseException) -> str:
    """A short reason for a failed fetch."""
    import http.client
    import socket
    import ssl

    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(e, socket.gaierror):
        return "cannot resolve host name"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    if isinstance(e, http.client.RemoteDisconnected):
        return "server closed the connection without answering"
    if isinstance(e, http.client.IncompleteRead):
        got, expected = len(e.partial), e.expected
        total = f" of {got + expected}" if expected is not None else ""
        return f"connection closed after {got}{total} bytes"
    if isinstance(e, (http.client.InvalidURL, UnicodeError)):
        return f"bad URL: {e}"
    if isinstance(e, http.client.HTTPException):
        return f"bad HTTP response ({type(e).__name__})"
    if isinstance(e, OSError):
        return f"network error: {e.strerror or str(e) or type(e).__name__}"
    return f"bad URL: {e}"


def _request(
    url: str, deadline: _Deadline, *, redirected: bool
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    import http.client
    import ssl
    from urllib.parse import quote, urlsplit

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        what = "redirect to unsupported" if redirected else "unsupported"
        raise FetchError(f"{what} URL scheme '{scheme}' (only http and https)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise FetchError("bad URL: invalid port") from None
    if not host:
        raise FetchError("bad URL: no host")
    # Encode what the user typed raw (spaces, non-ASCII) but keep existing %XX escapes.
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~?")
    headers = {"User-Agent": "ofacls", "Accept": "image/*, */*;q=0.5"}

    conn: http.client.HTTPConnection
    proxy = _proxy_for(scheme, host)
    timeout = deadline.remaining()
    if proxy is not None:
        proxy_host, proxy_port, auth = proxy
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                proxy_host, proxy_port, timeout=timeout, context=ssl.create_default_context()
            )
            conn.set_tunnel(host, port, headers={"Proxy-Authorization": auth} if auth else None)
        else:
            conn = http.client.HTTPConnection(proxy_host, proxy_port, timeout=timeout)
            netloc = host if port is None else f"{host}:{port}"
            if ":" in host:
                netloc = f"[{host}]" if port is None else f"[{host}]:{port}"
            target = f"http://{netloc}{target}"
            if auth:
                headers["Proxy-Authorization"] = auth
    elif scheme == "https":
        conn = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
        deadline.watch(conn.sock)
        conn.sock.settimeout(deadline.remaining())
        conn.request("GET", target, headers=headers)
        conn.sock.settimeout(deadline.remaining())
        resp = conn.getresponse()
    except BaseException:
        conn.close()
        raise
    return conn, resp


def _check_response(resp: http.client.HTTPResponse, max_bytes: int) -> None:
    from http import HTTPStatus

    if not 200 <= resp.status < 300:
        reason = resp.reason.strip()
        if not reason:
            try:
                reason = HTTPStatus(resp.status).phrase
            except ValueError:
                reason = ""
        raise FetchError(f"HTTP {resp.status} {reason}".strip())
    ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if ctype.startswith("text/") or ctype in _NOT_IMAGES:
        raise FetchError(f"not an image: {ctype}")
    if resp.length is not None and resp.length > max_bytes:
        raise FetchError(f"larger than the {_size(max_bytes)} limit ({_size(resp.length)})")


def _read_body(
    resp: http.client.HTTPResponse,
    conn: http.client.HTTPConnection,
    deadline: _Deadline,
    max_bytes: int,
) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        if conn.sock is not None:
            conn.sock.settimeout(deadline.remaining())
        # read1, not read: read(n) keeps waiting until it has n bytes
        chunk = resp.read1(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(f"larger than the {_size(max_bytes)} limit")
        chunks.append(chunk)
    if deadline.fired:  # the timer's shutdown looks like a clean end of the body
        raise FetchError(deadline.message)
    if not total:
        raise FetchError("empty response")
    return b"".join(chunks)


def _join_url(base: str, location: str) -> str:
    from urllib.parse import urldefrag, urljoin

    return urldefrag(urljoin(base, location)).url


def _proxy_for(scheme: str, host: str) -> tuple[str, int, str | None] | None:
    """(host, port, Proxy-Authorization) from http_proxy / https_proxy / no_proxy.

    Loopback is never proxied, so local servers (and the tests) work however the
    environment is set up.
    """
    import base64
    from urllib.parse import unquote, urlsplit
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
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise FetchError(f"unsupported proxy {proxy!r} (only http:// proxies)")
    auth = None
    if parts.username is not None:
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(user_pass.encode()).decode("ascii")
    try:
        port = parts.port or 80
    except ValueError:
        raise FetchError(f"unsupported proxy {proxy!r} (bad port)") from None
    return parts.hostname, port, auth


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.3g} GB"
    if n >= 2**20:
        return f"{n / 2**20:.3g} MB"
    if n >= 2**10:
        return f"{n / 2**10:.3g} KB"
    return f"{n} bytes"
