"""The output file of one batch: overwrite, resume, lock, faults.

`OutputFile` owns OUT while a batch writes it. It refuses to clobber an existing
file unless asked, locks OUT against a second run, on resume keeps the complete
rows that succeeded and tells which inputs are done (ofacls.resume), and hands
every row to the OS as it is written, so a crash loses only the row being
written. Faults of OUT itself (a full disk, OUT deleted, replaced or truncated
under the run) are an OutputError at the next write or at close. OUT may also
be `-` (stdout) or another non-regular file (/dev/null, a FIFO): rows are then
streamed to it, with no lock and no resume.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from ofacls.encoders import encoder
from ofacls.errors import OutputError
from ofacls.formats import holds_no_rows, output_format
from ofacls.prediction import Prediction
from ofacls.resume import InputKeys, input_key, record_base, resume

__all__ = ["InputKeys", "OutputFile", "input_key"]  # InputKeys, input_key: the CLI's names for them

_PEEK = 1 << 16  # an output with no rows is far smaller than this
_NOT_RESUMABLE = {"json": "a JSON array", "parquet": "a Parquet file"}


class OutputFile:
    """OUT for one batch: opened, locked, resumed; rows written one at a time.

    Refuses an existing OUT unless `overwrite` (start afresh) or `resume` (keep
    its rows, append), or it holds no rows yet (only a header: a run killed
    before its first row). Starting afresh replaces OUT only when the first row
    is written, so a run that fails before classifying anything (no model, no
    device) leaves the old file as it was. `resume` also drops the failed rows,
    so their inputs are tried again, and all but the first row of an input
    (by input_key); `done` then holds the input_key of every row kept. Only
    the line-based formats (CSV, TSV, JSONL) can be resumed, and only from the
    folder OUT's relative names are relative to.

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
    ) -> None:
        self.path = Path(path)
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
        self._encoder = encoder(self.fmt, top_k, self.columns)
        self._created = False
        self._replace = False  # start afresh: truncate OUT when the first row comes
        self._header_due = False  # the header goes out with the first row
        self._rows = 0
        self._size = 0  # bytes of OUT as we wrote them, the tail aside
        self._tail = 0  # bytes past _size: a JSON array's `]`, which the next row overwrites
        self._broken = False  # a write failed: nothing more goes to OUT
        self._closed = False
        self._fd: int | None = None
        self._real = ""  # OUT's real path, which the checks stat
        self._stream: BinaryIO | None = None
        if resume and stream:
            raise OutputError(f"cannot resume {self.name}: not a regular file")
        if resume and self.fmt in _NOT_RESUMABLE:
            raise OutputError(f"cannot resume {self.name}: {_NOT_RESUMABLE[self.fmt]} cannot be "
                              "resumed (write .csv, .tsv or .jsonl to resume)")
        if stream:
            self._stream = self._open_stream()
            return
        if self.path.is_dir():
            raise OutputError(f"{self.name} is a directory")
        # the file a symlink names (a dangling one's too: it is created), opened and
        # checked by that one path from here on
        self._real = os.path.realpath(self.path)
        self._fd, self._created = self._open_locked()
        try:
            self._start(overwrite=overwrite, resume=resume)
        except OSError as e:
            self._release()
            raise OutputError(f"cannot write {self.name}: {_reason(e)}") from None
        except BaseException:
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
        kept = resume(self._fd, self._real, self.name, self.fmt, self.top_k, self.columns)
        self._fd = kept.fd
        self.done, self.dropped_rows, self.dropped_torn_row = kept.done, kept.dropped_rows, kept.torn
        self._replace = not kept.done and not kept.dropped_rows  # no rows at all: start afresh
        self._size = os.fstat(self._fd).st_size

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
            self._size = self._tail = 0
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
            self._tail = len(tail)
        except BrokenPipeError:  # `-o - | head`: the caller stops quietly
            self._broken = True
            raise
        except OSError as e:
            self._broken = True
            where = "to stdout" if self.stdout else self.name
            raise OutputError(f"cannot write {where}: {_reason(e)}") from None

    def _check(self) -> None:
        """OutputError unless OUT is still the file we opened, holding what we wrote."""
        assert self._fd is not None
        mine = os.fstat(self._fd)
        try:
            now = os.stat(self._real)
        except FileNotFoundError:
            now = None
        size = self._size + self._tail
        if now is None:
            problem = "was deleted"
        elif (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            problem = "was replaced by another file"
        elif mine.st_size < size:
            problem = f"was truncated (to {mine.st_size} bytes of the {size} written)"
        elif mine.st_size > size:
            problem = "was written to by another program"
        else:
            return
        self._broken = True
        raise OutputError(f"{self.name} {problem} while this run was writing it")

    def close(self) -> None:
        """End the file (a JSON array's `]`, Parquet's footer), flush it to disk,
        close and unlock. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
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
            if self._fd is not None and self._created and not self._rows and _same_file(self._fd, self._real):
                # Nothing was classified (the model failed to load): no file is
                # better than an empty one. Removed while still locked, so no
                # other run can have opened it.
                os.unlink(self._real)
            self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # and with it the lock
            self._fd = None

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
