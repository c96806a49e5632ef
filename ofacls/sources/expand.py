"""What to classify: files, folders, globs, URLs, list files and stdin, as Sources.

`expand_inputs` turns what the user typed into a stream with exactly one item per
thing to classify: a `Source` to read, or a `BadInput` naming an input that cannot
be (a missing path, a symlink loop, a FIFO, a glob that matches nothing), so the
caller writes one error row for it and the batch goes on. `read_source` turns a
Source into bytes, raising `InputError` (`FetchError` for URLs) with a one-line reason.

Rules, chosen so a shell user is never surprised:

- A Source's `name` is the path or URL as given (a URL's credentials shown as `***`);
  files found in a folder or by a glob are named by its base as given joined with
  the path below. Inputs keep the order given, duplicates included; below a folder
  entries are sorted by name at each level, depth first; glob matches likewise.
- An existing path is taken literally even if it contains `*?[`; anything else with
  those characters is a glob (`**` spans folders, as in bash with globstar).
- Folders: images by extension (IMAGE_EXTENSIONS, any case); hidden entries skipped;
  symlinked folders followed, no real folder visited twice. `predict` (`walk=False`)
  walks no folder. A symlink loop is reported; a dangling symlink or a FIFO, socket
  or device only when its name looks like an image.
- Only regular files are read: a FIFO, socket or device named or matched by a glob
  is a BadInput at once, never opened (opening a FIFO would block).
- Lists (`*.txt` arguments, and `-` for stdin) name one path, folder, glob or URL
  per line; whitespace, blank lines and `#` comments are ignored, CRLF and a BOM
  tolerated, a line holding a NUL is a BadInput. With `null=True` entries end with
  NUL bytes instead and are taken exactly as written (`find -print0`, `xargs -0`).
  An entry longer than MAX_LIST_ENTRY is a BadInput (named by its start), read
  past in chunks rather than held whole, and the list goes on.
  Relative paths resolve against the current directory. Lists are read as they
  arrive, so `find ... | ofacls batch -` starts before find ends.
- `-` whose first bytes are an image's (JPEG, PNG, GIF, BMP, TIFF, WebP) is that
  image, named `-`.
- Tables (`.parquet`, `.csv`, `.tsv`, `.jsonl`, and the text ones gzipped) name
  one input per row (ofacls.sources.tables); WebDataset shards (`.tar`, and brace
  patterns such as `shards/{00000..00099}.tar`) hold them as members
  (ofacls.sources.shards). Both are read as streams.
- Object-store URLs (`s3://`, `gs://`, `az://`, `hf://`, ...) are any of the
  above in a store (ofacls.sources.objects): an object, a prefix (`s3://b/photos/`,
  walked for images), a glob, a list, a table or a shard.
- An input that yields nothing (empty folder or list, glob without matches) still
  gets one BadInput, so no input silently vanishes from the output.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO, TextIO, cast

from ofacls.errors import InputError
from ofacls.sources import objects, shards, tables
from ofacls.sources.fetch import DEFAULT_MAX_BYTES, DEFAULT_MAX_REDIRECTS, DEFAULT_TIMEOUT, fetch_url
from ofacls.sources.fetch import size_text as _size
from ofacls.sources.vetting import (
    HEAD_BYTES,
    SIZE_CLAIM_FROM,
    SIZE_CLAIM_HEAD,
    check_head,
    check_size_claim,
    gif_first_frame,
)
from ofacls.sources.walk import (
    GLOB_MAGIC,
    BadInput,
    Source,
    expand_glob,
    is_image_name,
    nonempty,
    not_regular,
    os_message,
    walk_folder,
)

__all__ = ["BadInput", "Source", "TableColumns", "expand_inputs", "is_url", "parse_list", "read_source",
           "streams"]

LIST_EXTENSION = ".txt"
# Local image files are read whole (large scans and TIFFs are legitimate, so the
# download cap does not apply), but never beyond this: a multi-GB file named .jpg
# would otherwise cost that much memory on every loader thread.
MAX_FILE_BYTES = 2**30
# One entry of a list, in bytes. PATH_MAX is 4096 on Linux (1024 on macOS), and
# HTTP servers refuse request lines past 8-16 KiB (RFC 9110 asks for 8000 octets),
# so a longer line is no path or URL but a mistake (a binary file named .txt, a
# list missing its newlines): it is one error row, never read into memory whole.
MAX_LIST_ENTRY = 2**16
_LIST_CHUNK = 2**16  # bytes asked of a list at a time
_SHOWN = 80  # characters of an over-long entry its row is named by

_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|data:)", re.IGNORECASE)
# How image files begin ("?": any byte). "BM" and "RIFF" may also begin a file name,
# so BMP and WebP count only with the bytes that follow (no list entry holds a NUL).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
               b"BM????\x00\x00\x00\x00", b"RIFF????WEBP")


def is_url(text: str) -> bool:
    """Whether an input is a URL (any scheme; read_source refuses all but http(s))."""
    return bool(_URL.match(text))


def parse_list(text: str) -> list[str]:
    """The entries of a newline list: one per line, blanks and `#` comments dropped."""
    return [e for line in text.removeprefix("\ufeff").split("\n") if (e := _list_entry(line))]


@dataclass(frozen=True)
class TableColumns:
    """How tables are read: the input column (None: the first of tables.DEFAULT_COLUMNS
    present) and the columns kept into output rows."""

    input_col: str | None = None
    keep: tuple[str, ...] = ()


def expand_inputs(inputs: Iterable[str], *, stdin: TextIO | BinaryIO | None = None, walk: bool = True,
                  null: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
                  columns: TableColumns = TableColumns()) -> Iterator[Source | BadInput]:
    """Every input as Sources to read, or a BadInput saying why it has none.

    `-` reads `stdin` (default sys.stdin; once: a second `-` is a BadInput): an
    image of at most `max_bytes`, or else a list. `null`: lists (stdin's and list
    files) are NUL-separated. `walk=False` (for `predict`): folders are not walked.
    Lazy throughout: a huge folder, a list still being written or a table streams
    rather than being read up front (only a glob's matches are collected and sorted
    first). `columns`: how tables name their inputs and what they carry along;
    `max_bytes` also bounds a shard's members.
    """
    how = _How(walk, null, max_bytes, columns)
    stdin_used = False
    for arg in inputs:
        if arg != "-":
            yield from _expand(arg, how, lists=True)
        elif stdin_used:
            yield BadInput("-", "stdin was already read by an earlier '-'")
        else:
            stdin_used = True
            stream = stdin or sys.stdin  # None when the process has no stdin at all
            if stream is None:
                yield BadInput("-", "there is no stdin to read")
            else:
                yield from _expand_stdin(stream, how)


def streams(arg: str) -> bool:
    """Whether an input is read as a stream of unknown length rather than listed up
    front: stdin, a table, a shard (or a pattern of them), anything in an object store."""
    return (arg == "-" or tables.is_table(arg) or shards.is_shard(arg) or shards.has_braces(arg)
            or objects.is_object_url(arg))


def read_source(source: Source, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
                max_redirects: int = DEFAULT_MAX_REDIRECTS) -> bytes:
    """The bytes of a Source; InputError (FetchError for URLs) saying why not.

    URLs: see ofacls.sources.fetch (`timeout` bounds the whole download, `max_bytes` its
    size). Files: regular files only, read whole up to MAX_FILE_BYTES.
    """
    if source.data is not None:
        return source.data
    if source.is_url:
        if objects.is_object_url(source.location):
            return objects.read_object(source.location, max_bytes=max_bytes, timeout=timeout)
        return fetch_url(source.location, timeout=timeout, max_bytes=max_bytes, max_redirects=max_redirects)
    return _read_file(source.location)


# --- expanding inputs --------------------------------------------------------------


@dataclass(frozen=True)
class _How:
    """What expand_inputs was told, for every input it expands."""

    walk: bool
    null: bool
    max_bytes: int
    columns: TableColumns


def _expand(arg: str, how: _How, *, lists: bool) -> Iterator[Source | BadInput]:
    """One command-line argument, list entry or table row."""
    walk = how.walk
    if "\0" in arg:  # no path holds one (os.stat would raise): a NUL list read as lines
        yield BadInput(arg.replace("\0", "\\0"), "contains a NUL byte (a NUL-separated list needs -0)")
        return
    if objects.is_object_url(arg):
        yield from _expand_object(arg, how, lists=lists)
        return
    if is_url(arg):
        yield Source(arg, arg, True)
        return
    if shards.has_braces(arg) and not os.path.lexists(arg):
        yield from _expand_braces(arg, how, lists=lists)
        return
    try:
        os.lstat(arg)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and GLOB_MAGIC.search(arg):
            yield from expand_glob(arg, walk=walk)
        else:
            yield BadInput(arg, os_message(e))
        return
    try:
        st = os.stat(arg)
    except OSError as e:
        yield BadInput(arg, os_message(e, path=arg))
        return
    if stat.S_ISDIR(st.st_mode):
        if walk:
            yield from nonempty(arg, walk_folder(arg, set()), "no images found in this folder")
        else:
            yield BadInput(arg, "is a directory (ofacls batch walks folders)")
    elif not stat.S_ISREG(st.st_mode):
        yield BadInput(arg, not_regular(st.st_mode))
    elif tables.is_table(arg) or shards.is_shard(arg) or arg.lower().endswith(LIST_EXTENSION):
        yield from _expand_container(arg, lambda: open(arg, "rb"), how, lists=lists)
    else:
        # Named explicitly, so read whatever the extension: a PNG called .jpeg or
        # a file without extension must still classify.
        yield Source(arg, arg, False)


def read_container(name: str, opener: Callable[[], IO[bytes]], *, where: str | None = None,
                   columns: TableColumns = TableColumns(), max_bytes: int = DEFAULT_MAX_BYTES,
                   row_group: int | None = None, first: int = 1) -> Iterator[Source | BadInput]:
    """The inputs of one table or shard, `name` as the user named it, read from
    what `opener` opens, as `expand_inputs` gives them. `where`: the table's own
    location, which relative rows are beside (default `name`: a worker's current
    folder is not the user's); `row_group`/`first`: one row group of a Parquet
    table (tables.table_rows)."""
    how = _How(True, False, max_bytes, columns)
    yield from _expand_container(name, opener, how, lists=True, where=where,
                                 row_group=row_group, first=first)


def _expand_container(name: str, opener: Callable[[], IO[bytes]], how: _How, *, lists: bool,
                      where: str | None = None, row_group: int | None = None, first: int = 1
                      ) -> Iterator[Source | BadInput]:
    """A file (local or in a store) that names inputs rather than being one: a
    shard, a table or a list, opened here and read as a stream."""
    if not lists and not shards.is_shard(name):
        yield BadInput(name, "a list file cannot name another list file" if not tables.is_table(name)
                       else "a list or table cannot name a table")
        return
    try:
        f = opener()
    except (OSError, InputError) as e:
        yield BadInput(name, os_message(e, path=name) if isinstance(e, OSError) else str(e))
        return
    with f:
        if shards.is_shard(name):
            yield from shards.shard_members(name, f, max_bytes=how.max_bytes)
        elif tables.is_table(name):
            rows = tables.table_rows(name, f, input_col=how.columns.input_col, keep=how.columns.keep,
                                     row_group=row_group, first=first)
            base = where or name
            yield from nonempty(name, (item for row in rows for item in _table_row(base, row)),
                                "the table has no rows")
        else:
            yield from _expand_list(name, getattr(f, "read1", f.read), b"", how)


def _table_row(table: str, row: tables.Row | BadInput) -> Iterator[Source | BadInput]:
    """A table row's input, named as the table writes it, with its kept columns. A row
    names one image (a file, a URL or an object); a folder or glob is not walked."""
    if isinstance(row, BadInput):
        yield row
        return
    location = tables.relative_to(table, row.value)
    remote = is_url(location)
    if remote and not objects.is_object_url(location) and scheme_of(location) not in ("http", "https"):
        yield BadInput(row.value, f"unsupported URL scheme {scheme_of(location)!r}")
        return
    yield Source(row.value, location, remote, extra=row.kept or None)


def scheme_of(url: str) -> str:
    return url.split(":", 1)[0].lower()


def _expand_braces(pattern: str, how: _How, *, lists: bool) -> Iterator[Source | BadInput]:
    try:
        names = shards.expand_braces(pattern)
    except ValueError as e:
        yield BadInput(pattern, str(e))
        return
    for name in names:
        yield from _expand(name, how, lists=lists)


def _expand_object(url: str, how: _How, *, lists: bool) -> Iterator[Source | BadInput]:
    """An object-store URL: a prefix or glob (walked for images), a brace pattern of
    shards, a table, a shard, a list, or one object."""
    try:
        if shards.has_braces(url):  # each name it stands for comes back here
            yield from _expand_braces(url, how, lists=lists)
            return
        path = url.split("://", 1)[1]
        if GLOB_MAGIC.search(path):
            found = (u for u in objects.list_objects(url, glob=True) if is_image_name(u))
            yield from nonempty(url, (Source(u, u, True) for u in found), "no images match this pattern")
            return
        if tables.is_table(url) or shards.is_shard(url) or url.lower().endswith(LIST_EXTENSION):
            yield from _expand_container(url, lambda: objects.open_object(url), how, lists=lists)
            return
        if url.endswith("/") or objects.kind(url) == "directory":
            if not how.walk:
                yield BadInput(url, "is a prefix (a folder; ofacls batch walks them)")
                return
            found = (u for u in objects.list_objects(url, glob=False) if is_image_name(u))
            yield from nonempty(url, (Source(u, u, True) for u in found), "no images found below this prefix")
            return
    except InputError as e:
        yield BadInput(url, str(e))
        return
    yield Source(url, url, True)


def _expand_stdin(stream: TextIO | BinaryIO, how: _How) -> Iterator[Source | BadInput]:
    """`-`: an image when stdin starts like one, else a list, read as it arrives."""
    read: Callable[[int], bytes]
    buffer = getattr(stream, "buffer", None)
    if buffer is None and isinstance(stream, io.TextIOBase):  # text only (io.StringIO): a list
        text = cast(TextIO, stream)
        # readline bounded too: one endless line must not be read whole
        read, head = (lambda size: text.readline(size).encode("utf-8", "surrogateescape")), b""
    else:
        # raw bytes, so a BOM and non-UTF-8 names survive whatever the locale's encoding is
        binary = cast(BinaryIO, buffer or stream)
        read = getattr(binary, "read1", binary.read)
        head = _sniff(read)
        if any(len(head) >= len(s) and _starts(head, s) for s in _SIGNATURES):
            data = head + binary.read(max(0, how.max_bytes + 1 - len(head)))
            if len(data) > how.max_bytes:
                yield BadInput("-", f"larger than the {_size(how.max_bytes)} limit")
            else:
                yield Source("-", "-", False, data)
            return
    yield from _expand_list("-", read, head, how)


def _sniff(read: Callable[[int], bytes]) -> bytes:
    """stdin's first bytes: as many as it takes to tell an image from a list, taken as
    they come, so a list typed or piped slowly is not held up."""
    head = b""
    while any(len(head) < len(s) and _starts(head, s) for s in _SIGNATURES):
        more = read(max(map(len, _SIGNATURES)) - len(head))
        if not more:
            break
        head += more
    return head


def _starts(head: bytes, signature: bytes) -> bool:
    return all(s == ord("?") or h == s for h, s in zip(head, signature))


def _expand_list(name: str, read: Callable[[int], bytes], head: bytes, how: _How
                 ) -> Iterator[Source | BadInput]:
    items = (item for e in _entries(name, read, head, null=how.null)
             for item in ((e,) if isinstance(e, BadInput) else _expand(e, how, lists=False)))
    yield from nonempty(name, items, "nothing came on stdin" if name == "-" else "the list names no inputs")


def _entries(name: str, read: Callable[[int], bytes], head: bytes, *, null: bool
             ) -> Iterator[str | BadInput]:
    """A list's entries as they arrive: `head`, then what `read` gives, split at each
    newline (NUL with `null`), each yielded as soon as its end has been read. An
    entry over MAX_LIST_ENTRY bytes is a BadInput; only its start is kept."""
    sep = b"\0" if null else b"\n"
    buf, scanned, first, done, number = bytearray(head), 0, True, False, 0
    while not done:
        end = buf.find(sep, scanned)
        if end < 0 and len(buf) <= MAX_LIST_ENTRY:
            scanned = len(buf)
            chunk = read(_LIST_CHUNK)
            if chunk:
                buf += chunk
                continue
            end, done = len(buf), True
        number += 1
        if end < 0 or end > MAX_LIST_ENTRY:
            yield _too_long(name, bytes(buf[: 4 * _SHOWN]), number, null)
            if end < 0:
                done = _skip_entry(buf, sep, read)
            else:
                del buf[: end + 1]
            scanned, first = 0, False
            continue
        record, scanned = bytes(buf[:end]), 0
        del buf[: end + 1]
        # surrogateescape keeps file names that are not UTF-8 openable, as os.scandir does
        text = record.decode("utf-8", errors="surrogateescape")
        if not null:
            text = _list_entry(text.removeprefix("\ufeff") if first else text) or ""
        first = False
        if text:
            yield text


def _skip_entry(buf: bytearray, sep: bytes, read: Callable[[int], bytes]) -> bool:
    """Read past the rest of an over-long entry, a chunk at a time, leaving in `buf`
    what follows its separator. Whether the list ended instead."""
    while True:
        buf.clear()
        chunk = read(_LIST_CHUNK)
        if not chunk:
            return True
        end = chunk.find(sep)
        if end >= 0:
            buf += chunk[end + 1:]
            return False


def _too_long(name: str, start: bytes, number: int, null: bool) -> BadInput:
    shown = start.decode("utf-8", errors="replace").strip()
    if len(shown) > _SHOWN:
        shown = shown[:_SHOWN] + "..."
    where = "the list on stdin" if name == "-" else name
    return BadInput(shown or "-", f"{'entry' if null else 'line'} {number} of {where} is longer than "
                                  f"{_size(MAX_LIST_ENTRY)}, too long for a path or URL")


def _list_entry(line: str) -> str | None:
    line = line.strip()
    return line if line and not line.startswith("#") else None


def _read_file(path: str) -> bytes:
    """A regular file's bytes. Its type and size are checked before it is opened, and
    again once open (it may have been replaced in between); O_NONBLOCK keeps even
    that open from waiting for a writer, should a FIFO take the file's place."""
    try:
        _check_file(os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            _check_file(os.fstat(fd))
            # a non-image, or a header followed by padding, is refused before the rest is read
            fmt = check_head(f.read(HEAD_BYTES))
            f.seek(0)
            size, data = os.fstat(fd).st_size, None
            if size > SIZE_CLAIM_FROM:
                if fmt == "GIF":
                    data = gif_first_frame(f.read)  # all of it that is decoded
                else:
                    check_size_claim(f.read(SIZE_CLAIM_HEAD), size)
            if data is None:
                f.seek(0)
                data = f.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows meanwhile
    except OSError as e:
        raise InputError(os_message(e, path=path)) from None
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"file is over the {_size(MAX_FILE_BYTES)} limit for an image")
    if not data:
        raise InputError("empty file")
    return data


def _check_file(info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise InputError("is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(not_regular(info.st_mode))
    if info.st_size > MAX_FILE_BYTES:
        raise InputError(f"file is {_size(info.st_size)}, over the "
                         f"{_size(MAX_FILE_BYTES)} limit for an image")
