"""The output file of one batch: overwrite, resume, lock, faults.

`OutputFile` owns OUT while a batch writes it. It refuses to clobber an existing
file unless asked, locks OUT against a second run, on resume keeps the complete
rows that succeeded and tells which inputs are done (ofacls.resume), and hands
every row to the OS as it is written, so a crash loses only the row being
written. Faults of OUT itself (a full disk, OUT deleted, replaced or truncated
under the run) are an OutputError at the next write or at close; a write that
fails is taken back, so OUT keeps its whole rows (and a JSON array its `]`).
OUT may also be `-` (stdout) or another non-regular file (/dev/null, a FIFO):
rows are then streamed to it, with no lock and no resume.

A Parquet file cannot grow a row at a time (its footer indexes its rows), so
its rows go as JSONL to a journal beside it (formats.parquet_journal), which
close() turns into OUT in one step. A run killed or out of disk space leaves
the journal: a plain rerun is refused as for any file with rows, and a resume
finishes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from ofacls.encoders import encoder
from ofacls.errors import OutputError
from ofacls.formats import Scanner, holds_no_rows, output_format, parquet_journal
from ofacls.prediction import Prediction
from ofacls.resume import InputKeys, Resumed, Rewrite, input_key, record_base, resume, resume_parquet

__all__ = ["InputKeys", "OutputFile", "can_resume", "input_key"]  # InputKeys, input_key: the CLI's names

_PEEK = 1 << 16  # an output with no rows is far smaller than this
# What a file with no rows holds where an empty file is not valid (a JSON array):
# what a failed first row leaves
_EMPTY = {"json": b"[]\n"}


def can_resume(path: str | os.PathLike[str]) -> bool:
    """Whether `--resume` can finish OUT: a regular file (or none yet), not `-`, a
    device or a FIFO."""
    return os.fspath(path) != "-" and not _is_stream(Path(path))


class OutputFile:
    """OUT for one batch: opened, locked, resumed; rows written one at a time.

    Refuses an existing OUT unless `overwrite` (start afresh) or `resume` (keep
    its rows, append), or it holds no rows yet (only a header: a run killed
    before its first row). Starting afresh replaces OUT only when the first row
    is written, so a run that fails before classifying anything (no model, no
    device) leaves the old file as it was. `resume` also drops the failed rows,
    so their inputs are tried again, and all but the first row of an input
    (by input_key); `done` then holds the input_key of every row kept. Every
    format can be resumed (Parquet through its journal), only from the folder
    OUT's relative names are relative to.

    The lock is an exclusive flock on OUT's own inode, so a symlink or a hard
    link to OUT does not let a second run in; it dies with its process. A
    resume that drops rows writes the kept ones beside OUT, locks that file and
    renames it over OUT in one step (a crash leaves the old file or the new
    one); a hard link to OUT then keeps the old contents.

    A file this object created and wrote no row to is removed on close. Use as
    a context manager, or call close().
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        top_k: int = 1,
        fmt: str | None = None,
        overwrite: bool = False,
        resume: bool = False,
        columns: Sequence[str] = (),
        retry: Iterable[str] | None = None,
    ) -> None:
        self.path = Path(path)
        # the inputs this run names, by input_key: a resume keeps the failed rows of the
        # others (None: this run may name any input, so every failed row is retried)
        keys = InputKeys()
        self._retry = None if retry is None else {keys(name) for name in retry}
        self.columns = tuple(columns)  # a command's own fields after the others (encoders.Encoder)
        self.stdout = os.fspath(path) == "-"
        stream = self.stdout or _is_stream(self.path)
        if overwrite and resume:
            raise OutputError("--overwrite and --resume cannot be used together")
        if top_k < 1:
            raise OutputError(f"--top-k must be at least 1, not {top_k}")
        # csv into stdout, /dev/null or a FIFO unless told otherwise: their names
        # have no extension to go by
        self.fmt = output_format(path, fmt or ("csv" if stream else None))
        self.top_k = top_k
        self.done: set[str] = set()
        self.dropped_torn_row = False
        self.dropped_rows = 0  # failed or repeated rows a resume took out
        # pyarrow checked for now, before OUT is touched, whichever way Parquet goes
        self._encoder = encoder(self.fmt, top_k, self.columns)
        self._created = False
        self._replace = False  # start afresh: truncate OUT when the first row comes
        self._header_due = False  # the header goes out with the first row
        self._rows = 0  # rows this run wrote
        self._kept = 0  # rows a resume kept
        self._size = 0  # bytes of OUT as we wrote them, the tail aside
        self._tail = b""  # what follows them on disk: a JSON array's `]`, which the next row overwrites
        self._broken = False  # a write failed: nothing more goes to OUT
        self._closed = False
        self._fd: int | None = None  # the file rows are written to: OUT, or a Parquet file's journal
        self._real = ""  # its real path, which the checks stat
        self._written = self.name  # its name in messages
        self._out_fd: int | None = None  # a Parquet OUT's own, which holds the lock
        self._out_real = ""  # OUT's real path
        self._stream: BinaryIO | None = None
        if resume and stream:
            raise OutputError(f"cannot resume {self.name}: not a regular file")
        if stream:
            self._stream = self._open_stream()
            return
        if self.path.is_dir():
            raise OutputError(f"{self.name} is a directory (end it with / to write parts of rows into it)")
        # the file a symlink names (a dangling one's too: it is created), opened and
        # checked by that one path from here on
        self._out_real = self._real = os.path.realpath(self.path)
        fd, self._created = self._open_locked()
        if self.fmt == "parquet":
            self._out_fd, self._real = fd, parquet_journal(self._out_real)
            self._written = parquet_journal(self.name if self._out_real == os.path.abspath(self.path)
                                            else self._out_real)
            self._encoder = encoder("jsonl", top_k, self.columns)
        else:
            self._fd = fd
        try:
            if self._out_fd is not None:
                self._start_journal(overwrite=overwrite, resume=resume)
            else:
                self._start(overwrite=overwrite, resume=resume)
        except OSError as e:
            self._abandon()
            self._release()
            raise OutputError(f"cannot write {self.name}: {_reason(e)}") from None
        except BaseException:
            self._abandon()
            self._release()
            raise

    @property
    def name(self) -> str:
        """OUT as messages name it: its path, or "stdout" for `-`."""
        return "stdout" if self.stdout else str(self.path)

    def is_done(self, name: str) -> bool:
        """Whether resuming found a successful row for this input."""
        return input_key(name) in self.done

    def _open_stream(self) -> BinaryIO:
        if self.stdout:
            sys.stdout.flush()  # what went to the text layer must come first
            f: BinaryIO = sys.stdout.buffer
        else:
            try:
                f = open(self.path, "wb", buffering=0)  # ours: closed in close()
            except OSError as e:
                raise OutputError(f"cannot write {self.name}: {_reason(e)}") from None
        self._header_due = True
        return f

    def _open_locked(self) -> tuple[int, bool]:
        """OUT opened (created if missing, never truncated) and locked: (fd, created)."""
        assert self._real == self._out_real
        for _ in range(10):
            created = True
            try:
                try:
                    fd = os.open(self._real, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                except FileExistsError:
                    created = False
                    fd = os.open(self._real, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                if isinstance(e, FileNotFoundError) and not created:
                    continue  # removed between the two opens: try again
                raise OutputError(f"cannot write {self.name}: {_reason(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _lock_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"cannot lock {self.name}: {_reason(e)}") from None
                who = f" (pid {pid})" if pid else ""
                raise OutputError(f"{self.name} is being written by another ofacls run{who}") from None
            # A finishing run removes a file it wrote no row to, and a resume
            # renames its rewrite over OUT: if either happened between our open
            # and flock, we hold a lock on a file that is no longer OUT.
            if _same_file(fd, self._real):
                return fd, created
            os.close(fd)
        raise OutputError(f"cannot lock {self.name}: it keeps being replaced")

    def _start(self, *, overwrite: bool, resume: bool) -> None:
        assert self._fd is not None
        self._size = os.fstat(self._fd).st_size
        if self._created:
            record_base(self._fd)
            self._put(self._encoder.header())
            if self.fmt in _EMPTY:  # valid before the first row too: loading a model takes a while
                os.pwrite(self._fd, _EMPTY[self.fmt], self._size)
                self._tail = _EMPTY[self.fmt]
        elif overwrite:
            self._replace = True
        elif resume:
            self._resume()
        elif holds_no_rows(os.pread(self._fd, _PEEK + 1, 0), self.fmt):
            self._replace = True  # nothing to lose: start afresh, as with --overwrite
        else:
            raise OutputError(
                f"{self.name} already exists: use --overwrite to replace it or --resume to finish it"
            )

    def _resume(self) -> None:
        assert self._fd is not None
        self._take(resume(self._fd, self._real, self.name, self.fmt, self.top_k, self.columns,
                          self._encoder.tail, self._retry))

    def _start_journal(self, *, overwrite: bool, resume: bool) -> None:
        """A Parquet OUT: its journal resumed, or started afresh (emptied when the first
        row comes); refused while it or OUT holds rows, unless told what to do."""
        assert self._out_fd is not None
        if resume:
            kept = resume_parquet(self._out_fd, self.name, self._real, self._written, self._retry)
            if kept is not None:
                self._take(kept)
                return
        elif not overwrite:
            if _holds_rows(self._real, "jsonl"):
                raise OutputError(f"{self.name} is unfinished ({self._written} holds the rows of a run that "
                                  "did not end): use --resume to finish it or --overwrite to start afresh")
            if not holds_no_rows(os.pread(self._out_fd, _PEEK + 1, 0), self.fmt):
                raise OutputError(f"{self.name} already exists: use --overwrite to replace it or "
                                  "--resume to finish it")
        self._fd = os.open(self._real, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self._size = os.fstat(self._fd).st_size
        self._replace = True

    def _take(self, kept: Resumed) -> None:
        """Go on from what a resume kept."""
        self._fd = kept.fd
        self.done, self.dropped_rows, self.dropped_torn_row = kept.done, kept.dropped_rows, kept.torn
        self._kept = kept.rows
        size = os.fstat(self._fd).st_size
        if kept.rows:
            self._size = kept.end
            self._tail = os.pread(self._fd, size - kept.end, kept.end)  # a JSON array's `]`
            self._encoder.rows = self._kept  # its next row starts with a comma, not `[`
        else:  # no rows: start afresh
            self._size, self._replace = size, True

    def write(self, pred: Prediction) -> None:
        """Append one row and hand it to the OS, so a crash cannot lose it."""
        if self._broken:
            raise OutputError(f"cannot write {self.name}: an earlier write failed")
        data = self._encoder.row(pred)
        if self._replace:
            assert self._fd is not None
            self._check()
            os.ftruncate(self._fd, 0)
            record_base(self._fd)
            self._size, self._tail = 0, b""
            self._replace = False
            data = self._encoder.header() + data
        elif self._header_due:
            data = self._encoder.header() + data
            self._header_due = False
        self._put(data, self._encoder.tail)
        self._rows += 1

    def _put(self, data: bytes, tail: bytes = b"") -> None:
        """Write all of `data`: to a stream as it is, to OUT once it is checked still
        ours, followed there by `tail`, which the next write overwrites."""
        if not data:
            return
        try:
            if self._stream is not None:
                self._stream.write(data)
                self._stream.flush()
                return
            assert self._fd is not None
            self._check()
            view = memoryview(data + tail)
            written = 0
            while view:
                n = os.pwrite(self._fd, view, self._size + written)
                written += n
                view = view[n:]
            self._size += len(data)
            self._tail = tail
        except BrokenPipeError:  # `-o - | head`: the caller stops quietly
            self._broken = True
            raise
        except OSError as e:
            self._broken = True
            self._take_back()
            where = "to stdout" if self.stdout else self._written
            raise OutputError(f"cannot write {where}: {_reason(e)}") from None

    def _take_back(self) -> None:
        """After a failed write (a full disk, a file size limit), OUT as it was before
        it: its rows whole, a JSON array closed. Cutting back frees the room the
        old tail needs, as it stood there before."""
        if self._fd is None:
            return
        tail = self._tail or (_EMPTY.get(self.fmt, b"") if not self._size else b"")
        try:
            os.ftruncate(self._fd, self._size)
            if tail:
                os.pwrite(self._fd, tail, self._size)
        except OSError:
            pass  # OUT keeps the torn row, which a resume cuts off

    def _check(self) -> None:
        """OutputError unless OUT (and a Parquet file's journal) is still the file we
        opened, the one we write holding what we wrote."""
        assert self._fd is not None
        name, problem = self._written, _changed(self._fd, self._real, self._size + len(self._tail))
        if problem is None and self._out_fd is not None:
            name, problem = self.name, _changed(self._out_fd, self._out_real, None)
        if problem is not None:
            self._broken = True
            raise OutputError(f"{name} {problem} while this run was writing it")

    def close(self) -> None:
        """End the file (a JSON array's `]`, Parquet's footer; a Parquet file
        written from its journal), flush it to disk, close and unlock. Safe to
        call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._out_fd is not None:
                self._finish_journal()
            else:
                if self._rows and not self._broken and not self._tail:
                    self._put(self._encoder.footer())
                if self._fd is not None and not self._broken:
                    self._check()
                    os.fsync(self._fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # fsync unsupported here
                raise OutputError(f"cannot write {self.name}: {_reason(e)}") from None
        finally:
            if self._stream is not None and not self.stdout:
                self._stream.close()
            if not (self._rows or self._kept):
                # Nothing was classified (the model failed to load): no file is
                # better than an empty one.
                self._abandon()
            self._release()

    def _finish_journal(self) -> None:
        """A Parquet OUT written whole from its journal, beside it, then renamed over
        it; the journal removed. Left as it is if a write failed: a resume finishes it."""
        if self._fd is None or self._broken or not (self._rows or self._kept):
            return  # (an empty journal is removed by _abandon)
        self._check()
        os.fsync(self._fd)
        out = Rewrite(self._out_real, -1, 0)
        try:
            parquet = encoder("parquet", self.top_k, self.columns)
            with open(self._fd, "rb", closefd=False, buffering=1 << 20) as f:
                f.seek(0)
                for record in Scanner(f, "jsonl", self._written):
                    assert isinstance(record.data, dict)
                    out.write(parquet.row(_Row(record.input, row=record.data)))
            out.write(parquet.footer())
            self._check()  # nothing moved OUT or the journal meanwhile
            fd = out.commit()
        finally:
            out.abort()
        assert self._out_fd is not None
        os.close(self._out_fd)
        self._out_fd = fd  # locked: no other run sees OUT before the journal is gone
        os.unlink(self._real)

    def _abandon(self) -> None:
        """Remove what this run created and wrote no row to: OUT, and a Parquet file's
        journal if empty. Removed while still locked, so no other run can have
        opened them."""
        if self._out_fd is not None and self._fd is not None and not os.fstat(self._fd).st_size \
                and _same_file(self._fd, self._real):
            os.unlink(self._real)
        out = self._fd if self._out_fd is None else self._out_fd
        if out is not None and self._created and _same_file(out, self._out_real):
            os.unlink(self._out_real)
            self._created = False

    def _release(self) -> None:
        for fd in (self._fd, self._out_fd):
            if fd is not None:
                os.close(fd)  # and with it the lock
        self._fd = self._out_fd = None

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class _Row(Prediction):
    """A row read back from a journal, to be written again as it was."""

    row: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.row


def _holds_rows(path: str, fmt: str) -> bool:
    """Whether the file at `path` exists and holds more than a new file would."""
    try:
        with open(path, "rb") as f:
            return not holds_no_rows(f.read(_PEEK + 1), fmt)
    except FileNotFoundError:
        return False


def _changed(fd: int, path: str, size: int | None) -> str | None:
    """How the file at `path` is no longer the one open as `fd`, holding `size`
    bytes (None: any); None if it is."""
    mine = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return "was deleted"
    if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
        return "was replaced by another file"
    if size is not None and mine.st_size < size:
        return f"was truncated (to {mine.st_size} bytes of the {size} written)"
    if size is not None and mine.st_size > size:
        return "was written to by another program"
    return None


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on fd's file, from /proc/locks (Linux), if it says."""
    st = os.fstat(fd)
    here = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    by_inode = []
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 8734 fe:00:2301977 0 EOF"; waiters add "->"
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK" or not parts[4].isdigit():
            continue
        if parts[5] == here:
            return int(parts[4])
        if parts[5].rsplit(":", 1)[-1] == str(st.st_ino):
            by_inode.append(int(parts[4]))
    # some filesystems (overlayfs) report another device number there
    return by_inode[0] if len(by_inode) == 1 else None


def _is_stream(path: Path) -> bool:
    """An existing non-regular, non-folder file: a device, FIFO or socket."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _same_file(fd: int, path: str | os.PathLike[str]) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _reason(e: OSError) -> str:
    reason = e.strerror or str(e)
    return reason[:1].lower() + reason[1:]
