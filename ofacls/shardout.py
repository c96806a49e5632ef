"""A sharded OUT: a folder (local, or a prefix in an object store) of parts
`part-00000.EXT`, `part-00001.EXT`, ... of at most `shard_rows` rows each, in any
output format, so that millions of rows never sit in one file or in memory.

A part is written whole beside its final name (`.part-00000.EXT.partial`, or a
local temporary file for an object store) and then renamed (uploaded) in one
step: a folder holds only complete parts, whatever kills the run. `resume`
keeps every complete part (its rows, failed ones included, stay as written) and
the run goes on with the inputs none of them holds (an input named N times, as a
table may list one URL in many rows, with the namings past the ones the parts
hold), into parts numbered after the last; a part that was being written is
discarded and its inputs redone, so each input has exactly one row across the
parts. A local folder is locked
against a second run writing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ofacls.encoders import Encoder, encoder
from ofacls.errors import InputError, OutputError
from ofacls.formats import FORMATS, read_rows
from ofacls.prediction import Prediction
from ofacls.resume import InputKeys
from ofacls.sources import objects

DEFAULT_SHARD_ROWS = 100_000
DEFAULT_FORMAT = "parquet"
_LOCK = ".ofacls.lock"


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """Whether OUT names a folder of parts: a trailing slash, or an existing folder
    that is empty or already ours (parts, our lock). A folder holding other files
    needs the slash: `-o photos` is more likely a slip than a wish to write there."""
    text = os.fspath(path)
    if text.endswith("/"):
        return True
    if text == "-" or objects.is_object_url(text) or not os.path.isdir(text):
        return False
    try:
        names = os.listdir(text)
    except OSError:
        return False
    return all(n == _LOCK or n.startswith(("part-", ".part-")) for n in names)


class ShardedOutput:
    """OUT as a folder of parts; `write` a row at a time, `close` at the end."""

    def __init__(self, folder: str | os.PathLike[str], *, fmt: str | None, top_k: int,
                 shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False, resume: bool = False,
                 columns: Sequence[str] = ()) -> None:
        self.folder = os.fspath(folder).rstrip("/")
        self.remote = objects.is_object_url(self.folder)
        self.fmt = fmt or DEFAULT_FORMAT
        if self.fmt not in FORMATS:
            raise OutputError(f"unknown format {self.fmt!r} (use {', '.join(FORMATS)})")
        if shard_rows < 1:
            raise OutputError(f"--shard-rows must be at least 1, not {shard_rows}")
        if overwrite and resume:
            raise OutputError("--overwrite and --resume cannot be used together")
        self.top_k, self.columns, self.shard_rows = top_k, tuple(columns), shard_rows
        encoder(self.fmt, top_k, self.columns)  # pyarrow checked before anything is written
        # input_key -> rows the complete parts hold for it: an input named twice (a
        # table may list one URL in many rows) keeps one row per naming
        self.done: Counter[str] = Counter()
        self._lock_fd: int | None = None
        self._encoder: Encoder | None = None
        self._file: Any = None
        self._temp = ""
        self._rows = 0
        self._closed = False
        self._prepare()
        parts = self._parts()
        if parts and not (resume or overwrite):
            raise OutputError(f"{self.name} already holds {len(parts)} part(s): use --overwrite to "
                              "replace them or --resume to finish them")
        if overwrite:
            for part in parts:
                self._remove(part)
            parts = []
        keys = InputKeys()
        for part in parts:
            for row in self._read(part):
                self.done[keys(str(row.get("input")))] += 1
        self._next = 1 + max((int(m.group(1)) for p in parts if (m := self._pattern.search(p))), default=-1)

    @property
    def name(self) -> str:
        return self.folder + "/"

    @property
    def _pattern(self) -> re.Pattern[str]:
        return re.compile(rf"(?:^|/)part-(\d{{5,}})\.{re.escape(self.fmt)}$")

    # --- the folder ------------------------------------------------------------------
    def _prepare(self) -> None:
        """The folder made, locked (local), and a cut-off part of an earlier run removed."""
        if self.remote:
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(os.path.join(self.folder, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise OutputError(f"cannot write {self.name}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(f"{self.name} is being written by another ofacls run") from None
        self._lock_fd = fd
        for leftover in Path(self.folder).glob(".part-*.partial"):
            leftover.unlink(missing_ok=True)

    def _parts(self) -> list[str]:
        """The complete parts there, in order."""
        try:
            if self.remote:  # a prefix with nothing below it lists nothing
                names = list(objects.list_objects(self.folder + "/", glob=False))
            else:
                names = [os.path.join(self.folder, n) for n in os.listdir(self.folder)]
        except (OSError, InputError) as e:
            raise OutputError(f"cannot list {self.name}: {e}") from None
        return sorted((n for n in names if self._pattern.search(n)), key=lambda n: n.rsplit("/", 1)[-1])

    def _read(self, part: str) -> list[dict[str, Any]]:
        if not self.remote:
            return read_rows(part, self.fmt)
        with tempfile.TemporaryDirectory(prefix="ofacls-part-") as tmp:
            local = os.path.join(tmp, "part." + self.fmt)
            fs, path = objects.filesystem(part)
            fs.get(path, local)
            return read_rows(local, self.fmt)

    def _remove(self, part: str) -> None:
        try:
            if self.remote:
                fs, path = objects.filesystem(part)
                fs.rm(path)
            else:
                os.unlink(part)
        except OSError as e:
            raise OutputError(f"cannot remove {part}: {e.strerror or e}") from None

    # --- rows ----------------------------------------------------------------------------
    def write(self, pred: Prediction) -> None:
        if self._encoder is None:
            self._open_part()
        assert self._encoder is not None
        self._file.write(self._encoder.row(pred))
        self._rows += 1
        if self._rows >= self.shard_rows:
            self._finish_part()

    def _open_part(self) -> None:
        final = self._final(self._next)
        if self.remote:
            fd, self._temp = tempfile.mkstemp(prefix="ofacls-part-", suffix="." + self.fmt)
            os.close(fd)
        else:
            self._temp = os.path.join(self.folder, f".part-{self._next:05d}.{self.fmt}.partial")
        try:
            self._file = open(self._temp, "wb")
            self._encoder = encoder(self.fmt, self.top_k, self.columns)
            self._file.write(self._encoder.header())
        except OSError as e:
            raise OutputError(f"cannot write {final}: {e.strerror or e}") from None

    def _finish_part(self) -> None:
        """The part written whole, then renamed (or uploaded) to its name in one step."""
        assert self._encoder is not None
        final = self._final(self._next)
        try:
            self._file.write(self._encoder.footer())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self.remote:
                fs, path = objects.filesystem(final)
                fs.put_file(self._temp, path)  # one PUT (or a completed multipart upload)
                os.unlink(self._temp)
            else:
                os.replace(self._temp, final)
        except OSError as e:
            raise OutputError(f"cannot write {final}: {e.strerror or e}") from None
        self._encoder, self._file, self._temp, self._rows = None, None, "", 0
        self._next += 1

    def _final(self, number: int) -> str:
        return f"{self.folder}/part-{number:05d}.{self.fmt}"

    def close(self) -> None:
        """The last part finished (a part is never empty), the lock released."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._encoder is not None and self._rows:
                self._finish_part()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)

    def abandon(self) -> None:
        """Stop without finishing the part under way (its inputs are redone on --resume)."""
        self._closed = True
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
                os.unlink(self._temp)
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def __enter__(self) -> ShardedOutput:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        # finished on Ctrl-C too (its rows are whole, and a resume skips them), but not
        # after a failed write, whose part may be torn
        if kind is not None and issubclass(kind, OutputError):
            self.abandon()
        else:
            self.close()
