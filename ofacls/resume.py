"""Resuming an output file: which of its rows are kept, and which inputs are done.

Inputs are compared by `input_key`: a URL by its text, a local path by its real
absolute path, so `imgs/a.jpg`, `./imgs/a.jpg`, the absolute path and a symlink
to it are one input. Rows keep each name as it was given, so a relative name in
OUT is resolved against the current directory of the run that resumes it. OUT
records the folder its run named inputs from (an extended attribute,
`user.ofacls.cwd`), and a resume from another folder is refused while OUT holds
relative names: the same relative names there may be other files, which must
not be skipped as done. Where OUT records no folder (a filesystem without user
attributes, a copy that dropped it), names are taken as relative to this one.

A resume keeps the complete rows that succeeded, the first of each input; a
torn last line (no newline: the writer stopped mid-row) is cut off, and failed
or repeated rows are taken out by writing the kept ones beside OUT and renaming
that over it. Anything else that is not a row of this command's columns is
refused, never cut. A JSON array ends in its `]` again straight away.

A Parquet file is resumed through its journal (formats.parquet_journal): the
journal a killed run left is resumed as a JSONL file would be; a finished
Parquet file has its kept rows copied into a new journal, which the run then
appends to and turns into the Parquet file at its end (ofacls.outfile).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ofacls.errors import OutputError
from ofacls.formats import ENCODING, ERRORS, Scanner, csv_header, parquet_rows, row_json
from ofacls.sources.expand import is_url

_BASE_ATTR = "user.ofacls.cwd"  # the folder OUT's relative names are relative to


def input_key(name: str) -> str:
    """The identity resume compares inputs by: a URL as written; a local path as its
    real absolute path (os.path.realpath, a relative name against the current
    directory), so `a.jpg`, `./a.jpg` and a symlink to it are one input."""
    return InputKeys()(name)


class AlreadyDone:
    """Asked of each input in input order: is its row already in the resumed OUT?

    `done` holds the input_key of OUT's rows: a set (a file: one row per input,
    however often it is named) or a Counter (a folder of parts: one row per
    naming, so an input named twice with one row is classified once more)."""

    def __init__(self, done: set[str] | Counter[str]) -> None:
        self._done, self._keys = done, InputKeys()
        self._counts = done if isinstance(done, Counter) else None

    def take(self, name: str) -> bool:
        """Whether this naming of `name` is done; a Counter's naming is used up."""
        key = self._keys(name)
        if key not in self._done:
            return False
        if self._counts is not None:
            self._counts[key] -= 1
            if self._counts[key] <= 0:
                del self._counts[key]
        return True


class InputKeys:
    """input_key for many names: each folder's real path is looked up once.

    Equal to os.path.realpath, which resolves a path one component at a time:
    the folder's resolution is shared, only the last component is checked for
    a symlink (one lstat instead of one per component).
    """

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if is_url(name):
            return name
        head, sep, base = name.rpartition(os.sep)
        if base in ("", ".", ".."):
            return os.path.realpath(name)
        head = head or sep or "."
        folder = self._folders.get(head)
        if folder is None:
            folder = self._folders[head] = os.path.realpath(head)
        path = f"{folder.rstrip(os.sep)}{os.sep}{base}"
        return os.path.realpath(path) if os.path.islink(path) else path


@dataclass
class Resumed:
    """What resuming OUT kept."""

    fd: int  # OUT's descriptor now: a rewrite's (locked) where rows were dropped
    done: set[str]  # the input_key of every successful row kept
    rows: int  # rows kept: the successes, and failures of inputs this run does not name
    dropped_rows: int  # failed or repeated rows taken out
    torn: bool  # a torn last line was dropped
    end: int  # where the next row goes: past the last row kept (and before a JSON array's `]`)


class _Kept:
    """The rows a resume keeps, by input_key: the first success of each input, and
    the failed row of an input this run does not name (`retry`: the keys of those it
    names; None: every input), which it could not retry and must not lose."""

    def __init__(self, name: str, elsewhere: str | None, retry: set[str] | None = None) -> None:
        self.name, self.elsewhere, self.retry = name, elsewhere, retry
        self.done: set[str] = set()
        self.failed: set[str] = set()  # inputs whose failed row is kept
        self.rows = 0
        self.dropped = 0
        self._keys = InputKeys()

    def keep(self, input: str, error: str | None) -> bool:
        """Whether this row is kept; OutputError if it names an input relative to
        another folder."""
        if self.elsewhere and _is_relative(input):
            raise OutputError(f"{self.name} names its inputs relative to {self.elsewhere}: "
                              "resume from that folder")
        key = self._keys(input)
        retried = error is not None and (self.retry is None or key in self.retry or key in self.failed)
        if retried or key in self.done:
            self.dropped += 1
            return False
        (self.done if error is None else self.failed).add(key)
        self.rows += 1
        return True


def resume(fd: int, real: str, name: str, fmt: str, top_k: int, columns: Sequence[str] = (),
           tail: bytes = b"", retry: set[str] | None = None) -> Resumed:
    """Keep the rows of OUT (open as `fd`, locked; its real path `real`) that
    succeeded, each input's first: a torn last line is cut off, failed and
    repeated rows are taken out by a rewrite, and `tail` (a JSON array's `]`)
    follows the last row kept. OutputError if OUT is not a batch's file with
    these columns, or names inputs relative to another folder. `fd` is closed
    if a rewrite takes its place. `retry`: see _Kept."""
    expected = csv_header(top_k, columns)
    kept = _Kept(name, _base_elsewhere(fd), retry)
    rewrite: Rewrite | None = None
    # A JSON array's rows are separated, not ended, by a comma: a rewrite puts it
    # back between the rows kept, and the file ends right after the last object.
    comma = b",\n" if fmt == "json" else b""
    end = 0  # past the last row kept (or the header): what a rewrite copies, or the cut
    with open(fd, "rb", closefd=False, buffering=1 << 20) as f:
        scanner = Scanner(f, fmt, name)
        try:
            for record in scanner:
                if scanner.header is not None and not kept.rows and scanner.header != expected:
                    raise _columns_error(name, scanner.header, top_k, columns)
                end = end or scanner.header_end
                if not kept.keep(record.input, record.error):
                    if rewrite is None:
                        rewrite = Rewrite(real, fd, end)
                    continue
                if rewrite is not None:
                    rewrite.write((comma if kept.rows > 1 else b"") + record.body)
                    end = rewrite.size
                else:
                    end = record.start + len(record.body)
            if rewrite is not None:
                rewrite.write(tail)  # a JSON array with no row kept is `[` `]`: valid all along
                new = rewrite.commit()
                os.close(fd)
                fd, rewrite = new, None
            elif kept.rows:
                _cut(fd, end, tail)
        finally:
            if rewrite is not None:
                rewrite.abort()
    if kept.rows or kept.dropped:
        # the rows kept name no input relative to another folder; the rows to come
        # name theirs relative to this one (with no rows OUT starts afresh, and
        # records its folder then)
        record_base(fd)
    return Resumed(fd, kept.done, kept.rows, kept.dropped, scanner.torn, end)


def resume_parquet(out: int, name: str, journal: str, journal_name: str,
                   retry: set[str] | None = None) -> Resumed | None:
    """Keep the rows of a Parquet OUT (open as `out`, locked): those of its journal
    (the rows of a run that did not finish), or else those of OUT itself, copied
    into a new journal. None if neither holds a row. The Resumed's fd is the
    journal's, which the rows to come are appended to; OUT is left as it is."""
    try:
        fd = os.open(journal, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    if fd >= 0:
        if os.fstat(fd).st_size:
            try:
                return resume(fd, journal, journal_name, "jsonl", top_k=1, retry=retry)
            except BaseException:
                os.close(fd)
                raise
        os.close(fd)
    if not os.fstat(out).st_size:
        return None
    kept = _Kept(name, _base_elsewhere(out), retry)
    copy = Rewrite(journal, -1, 0)
    try:
        with open(out, "rb", closefd=False) as f:
            for n, row in enumerate(parquet_rows(f, name), 1):
                error = row.get("error", 0)  # absent: not a row
                if not isinstance(row.get("input"), str) or not (error is None or isinstance(error, str)):
                    raise OutputError(f"{name} row {n} is not an ofacls row (it needs `input` and `error`)")
                if kept.keep(row["input"], row["error"]):
                    copy.write(row_json(row).encode(ENCODING, ERRORS) + b"\n")
        if not kept.rows:
            return None  # nothing kept: OUT starts afresh, as a resume of a file without rows
        fd = copy.commit()
    finally:
        copy.abort()
    return Resumed(fd, kept.done, kept.rows, kept.dropped, False, os.fstat(fd).st_size)


def _cut(fd: int, end: int, tail: bytes) -> None:
    """End OUT at `end`, followed by `tail`: what comes after the last row kept (a
    torn line, the old `]`) is cut off."""
    if tail:
        os.pwrite(fd, tail, end)
    os.ftruncate(fd, end + len(tail))


def record_base(fd: int) -> None:
    """Note on OUT the folder this run names relative inputs from."""
    try:
        os.setxattr(fd, _BASE_ATTR, os.fsencode(os.getcwd()))
    except (OSError, AttributeError):
        # Where the filesystem (or platform) keeps no user attributes, OUT records
        # nothing, and a resume from another folder cannot be told apart.
        pass


def _base_elsewhere(fd: int) -> str | None:
    """The folder OUT's relative names are relative to, if it is not this one.
    None too if OUT records none, or that folder is gone (moved: its names may
    well be relative to this folder now)."""
    try:
        base = os.fsdecode(os.getxattr(fd, _BASE_ATTR))
    except (OSError, AttributeError):
        return None
    try:
        return None if os.path.samefile(base, ".") else base
    except OSError:
        return None


def _is_relative(name: str) -> bool:
    return not (os.path.isabs(name) or is_url(name))


def _columns_error(name: str, header: list[str], top_k: int, extra: Sequence[str] = ()) -> OutputError:
    if header[len(header) - len(extra):] != list(extra) or (not extra and (len(header) - 2) % 3):
        # another command's file (a batch's for eval's rows, say)
        return OutputError(f"{name} does not have the columns this command writes: write to a new file")
    k = (len(header) - 2 - len(extra)) // 3
    return OutputError(f"{name} has columns for --top-k {k}, not {top_k}: resume with "
                       f"--top-k {k} or write to a new file")


class Rewrite:
    """OUT's kept rows written beside it, then renamed over it in one step, so a
    crash leaves either the old file or the new one, never half of each.

    The new file is locked before the rename, so a second run never finds OUT
    unlocked; its name is our own, so no file of the user's (OUT.tmp, say) is
    ever clobbered."""

    def __init__(self, real: str, src: int, prefix: int) -> None:
        self.real = real
        self.size = 0  # bytes written so far
        self.fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(real),
                                             prefix=f".{os.path.basename(real)}.", suffix=".tmp")
        self._file = open(self.fd, "wb", closefd=False)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            record_base(self.fd)  # before the rename: OUT never lacks it
            while self.size < prefix:  # the header and the rows before the first one dropped
                chunk = os.pread(src, min(1 << 20, prefix - self.size), self.size)
                if not chunk:
                    break
                self.write(chunk)
        except BaseException:
            self.abort()  # a full disk, say: no temporary file left behind
            raise

    def write(self, raw: bytes) -> None:
        self._file.write(raw)
        self.size += len(raw)

    def commit(self) -> int:
        """Put the new file in OUT's place; returns its fd, locked."""
        self._file.close()
        os.fsync(self.fd)
        with contextlib.suppress(FileNotFoundError):  # a new journal: no file there yet
            shutil.copymode(self.real, self.tmp)
        os.replace(self.tmp, self.real)
        fd, self.fd = self.fd, -1
        return fd

    def abort(self) -> None:
        if self.fd == -1:
            return
        try:
            with contextlib.suppress(OSError):  # a full disk: what is buffered is thrown away anyway
                self._file.close()
        finally:
            os.close(self.fd)
            self.fd = -1
            Path(self.tmp).unlink(missing_ok=True)
