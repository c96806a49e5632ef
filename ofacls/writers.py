"""Prediction -> CSV / JSONL rows, and the output file a batch appends them to.

CSV and JSONL carry the same fields under the same names: `input`, `label`,
`score`, `error`, then the rest of the top k (CSV: `label_2`, `score_2`, ...;
JSONL: the `top_k` list of Prediction.to_dict). Scores are written as Python's
shortest round-trip repr, so CSV and JSONL give back the very same float.

Text is UTF-8. File names that are not valid UTF-8 (os.scandir hands them over
with surrogate escapes) are written back as their original bytes, so every name
round-trips exactly; such a row is not valid UTF-8, but nothing is lost.

`OutputFile` owns OUT for one batch: it refuses to clobber an existing file
unless asked, locks OUT against a second run, on `--resume` drops a torn last
row and the failed rows and reports which inputs are already done, and flushes
every row as it is written, so a crash loses only the row being written. OUT
may also be `-` (stdout) or another non-regular file (/dev/null, a FIFO): rows
are then streamed to it, with no lock and no resume.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from ofacls.errors import OutputError
from ofacls.prediction import Prediction

FORMATS = ("csv", "jsonl")
BASE_COLUMNS = ["input", "label", "score", "error"]

_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
_BOM = b"\xef\xbb\xbf"


def csv_header(top_k: int) -> list[str]:
    """`input,label,score,error`, then `label_i,score_i` for i = 2..top_k."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    return BASE_COLUMNS + [f"{c}_{i}" for i in range(2, top_k + 1) for c in ("label", "score")]


def format_score(score: float | None) -> str:
    """A score as CSV text: the shortest repr that reads back as the same float."""
    return "" if score is None else repr(float(score))


def csv_row(pred: Prediction, top_k: int) -> list[str]:
    """One Prediction as CSV fields under csv_header(top_k); empty fields for None."""
    row = [pred.input, pred.label or "", format_score(pred.score), pred.error or ""]
    rest = pred.top_k[1:top_k]
    for label, score in rest:
        row += [label, format_score(score)]
    row += [""] * (2 * (top_k - 1 - len(rest)))
    return row


def csv_line(pred: Prediction, top_k: int) -> str:
    """csv_row as one CSV record, newline-terminated (quoted as needed)."""
    return _csv_text(csv_row(pred, top_k))


def json_line(pred: Prediction) -> str:
    """One Prediction as a JSON object on one line (no trailing newline)."""
    return json.dumps(pred.to_dict(), ensure_ascii=False)


def output_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """`fmt` if given, else the format OUT's extension names; OutputError otherwise."""
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise OutputError(f"unknown output format {fmt!r} (choose csv or jsonl)")
        return fmt
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    raise OutputError(
        f"cannot tell the output format from {os.fspath(path)!r}: "
        "name it .csv or .jsonl, or pass --format"
    )


def read_rows(path: str | os.PathLike[str], fmt: str | None = None) -> list[dict[str, Any]]:
    """The complete rows of an output file, each as Prediction.to_dict() would give.

    A torn last row (the writer was killed mid-row) is left out; anything else
    unreadable raises OutputError. CSV fields come back typed: empty -> None,
    scores -> float, `label_i`/`score_i` -> `top_k`.
    """
    fmt = output_format(path, fmt)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise OutputError(f"cannot read {os.fspath(path)}: {_reason(e)}") from None
    return _scan(data, fmt, os.fspath(path)).rows


@dataclass
class _Scan:
    """What an existing output file holds."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # each row's bytes
    end: int = 0  # byte offset just past the last complete row
    header: list[str] | None = None  # CSV only
    body: int = 0  # byte offset just past the CSV header


def _scan(data: bytes, fmt: str, name: str) -> _Scan:
    lines = _split_lines(data)
    return _scan_csv(lines, name) if fmt == "csv" else _scan_jsonl(lines, name)


def _split_lines(data: bytes) -> list[tuple[str, int]]:
    """Each newline-terminated line, decoded, with the byte offset just past it.

    Bytes after the last newline are a torn row and are left out: every row the
    writer finishes ends with a newline.
    """
    lines = []
    pos = len(_BOM) if data.startswith(_BOM) else 0
    while (end := data.find(b"\n", pos)) != -1:
        lines.append((data[pos : end + 1].decode(_ENCODING, _ERRORS), end + 1))
        pos = end + 1
    return lines


def _scan_jsonl(lines: list[tuple[str, int]], name: str) -> _Scan:
    scan = _Scan()
    for number, (line, end) in enumerate(lines, 1):
        if not line.strip():
            scan.end = end
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
                raise ValueError("not a row")
        except ValueError:
            if number == len(lines):  # torn by a crash mid-write: dropped
                break
            raise OutputError(f"{name} line {number} is not an ofacls JSON row") from None
        scan.rows.append(obj)
        scan.spans.append((scan.end, end))
        scan.end = end
    return scan


def _scan_csv(lines: list[tuple[str, int]], name: str) -> _Scan:
    scan = _Scan()
    # strict: a row torn inside a quoted field is an error at the end, not a short row
    reader = csv.reader((line for line, _ in lines), strict=True)
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error:
            if reader.line_num >= len(lines):
                break
            raise OutputError(f"{name} line {reader.line_num} is not valid CSV") from None
        last = reader.line_num >= len(lines)
        if not record:  # a blank line
            scan.end = lines[reader.line_num - 1][1]
            continue
        if scan.header is None:
            if record[: len(BASE_COLUMNS)] != BASE_COLUMNS:
                if last:
                    break
                raise OutputError(
                    f"{name} is not an ofacls CSV file (its header is not "
                    f"{','.join(BASE_COLUMNS)},...)"
                )
            scan.header = record
            scan.body = lines[reader.line_num - 1][1]
        else:
            try:
                if len(record) != len(scan.header):
                    raise ValueError("wrong number of fields")
                row = _csv_to_dict(scan.header, record)
            except ValueError:
                if last:
                    break
                raise OutputError(f"{name} line {reader.line_num} is not an ofacls row") from None
            scan.rows.append(row)
            scan.spans.append((scan.end, lines[reader.line_num - 1][1]))
        scan.end = lines[reader.line_num - 1][1]
    return scan


def _csv_to_dict(header: list[str], record: list[str]) -> dict[str, Any]:
    """A CSV record as Prediction.to_dict() gives it."""
    fields = dict(zip(header, record, strict=True))
    label, score = fields["label"] or None, _parse_score(fields["score"])
    top_k = [] if label is None else [{"label": label, "score": score}]
    i = 2
    while f"label_{i}" in fields:
        if fields[f"label_{i}"]:
            score_i = _parse_score(fields.get(f"score_{i}", ""))
            top_k.append({"label": fields[f"label_{i}"], "score": score_i})
        i += 1
    return {
        "input": fields["input"],
        "label": label,
        "score": score,
        "top_k": top_k,
        "error": fields["error"] or None,
    }


def _parse_score(text: str) -> float | None:
    return float(text) if text else None


def _csv_text(row: Sequence[str]) -> str:
    buf = io.StringIO()
    # The csv module quotes a field when it holds a character of the line
    # terminator, so "\r\n" makes it quote fields with either \r or \n; the
    # record itself then ends in a plain "\n", friendlier to line-based tools.
    csv.writer(buf, lineterminator="\r\n").writerow(row)
    return buf.getvalue()[:-2] + "\n"


class OutputFile:
    """OUT for one batch: opened, locked, resumed; rows written and flushed one at a time.

    Refuses an existing OUT unless `overwrite` (start afresh) or `resume` (keep
    its complete rows, drop a torn last one, append). `overwrite` replaces OUT
    only when the first row is written, so a run that fails before classifying
    anything (no model, no device) leaves the old file as it was. `resume` also
    drops the rows that failed, so their inputs are tried again: a retried run
    that still fails says so in its exit code. `finished` holds the `input` of
    every row kept; `finished_counts` counts them, for a run that gives the same
    input twice.

    A lock on the sidecar `OUT.lock` (holding the writer's pid, removed on close)
    makes a second run on the same OUT fail at once instead of interleaving rows.
    `-` streams the rows to stdout, and so does any existing non-regular file
    (/dev/null, a FIFO) to itself: no lock, no resume, no --overwrite needed.
    A file this object created and wrote no row to is removed on close.
    Use as a context manager, or call close().
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        top_k: int = 1,
        fmt: str | None = None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        self.stdout = os.fspath(path) == "-"
        stream = self.stdout or _is_stream(self.path)
        # csv into stdout, /dev/null or a FIFO unless told otherwise: their names
        # have no extension to go by
        self.fmt = output_format(path, fmt or ("csv" if stream else None))
        self.top_k = top_k
        self.finished: set[str] = set()
        self.finished_counts: Counter[str] = Counter()
        self.dropped_torn_row = False
        self._created = False
        self._replace = False  # --overwrite: truncate OUT when the first row comes
        self._header_due = False  # the CSV header goes out with the first row
        self._rows = 0
        self._closed = False
        if overwrite and resume:
            raise OutputError("--overwrite and --resume cannot be used together")
        if top_k < 1:
            raise OutputError(f"--top-k must be at least 1, not {top_k}")
        self._lock: _Lock | None = None
        if stream:
            if resume:
                raise OutputError(f"cannot resume {self.name}: not a regular file")
            self._file = self._open_stream()
            return
        self._lock = _Lock.acquire(self.path)
        try:
            self._file = self._open(overwrite=overwrite, resume=resume)
        except BaseException:
            self._lock.release()
            raise

    @property
    def name(self) -> str:
        """OUT as messages name it: its path, or "stdout" for `-`."""
        return "stdout" if self.stdout else str(self.path)

    def _open_stream(self) -> BinaryIO:
        if self.stdout:
            sys.stdout.flush()  # what went to the text layer must come first
            f: BinaryIO = sys.stdout.buffer
        else:
            try:
                f = open(self.path, "wb")  # ours: closed in close()
            except OSError as e:
                raise OutputError(f"cannot write {self.name}: {_reason(e)}") from None
        self._header_due = self.fmt == "csv"
        return f

    def _open(self, *, overwrite: bool, resume: bool) -> BinaryIO:
        name = str(self.path)
        if self.path.is_dir():
            raise OutputError(f"{name} is a directory")
        exists = os.path.lexists(self.path)
        if exists and not (overwrite or resume):
            raise OutputError(
                f"{name} already exists: use --overwrite to replace it or --resume to finish it"
            )
        try:
            # "r+b": even --overwrite must not truncate before the first row
            f = open(self.path, "r+b" if exists else "w+b")
        except OSError as e:
            raise OutputError(f"cannot write {name}: {_reason(e)}") from None
        self._created = not exists
        if exists and overwrite:
            self._replace, self._header_due = True, self.fmt == "csv"
            return f
        try:
            data = f.read()
            scan = _scan(data, self.fmt, name)
            if scan.header is not None and scan.header != csv_header(self.top_k):
                k = (len(scan.header) - len(BASE_COLUMNS)) // 2 + 1
                raise OutputError(
                    f"{name} has columns for --top-k {k}, not {self.top_k}: resume with "
                    f"--top-k {k} or write to a new file"
                )
            self.dropped_torn_row = scan.end != len(data)
            kept = [(span, row) for span, row in zip(scan.spans, scan.rows) if not row["error"]]
            if len(kept) < len(scan.rows):
                f.close()
                _replace_contents(self.path, data[: scan.body]
                                  + b"".join(data[a:b] for (a, b), _ in kept))
                f = open(self.path, "r+b")
                f.seek(0, os.SEEK_END)
            else:
                f.truncate(scan.end)
                f.seek(scan.end)
            if self.fmt == "csv" and scan.header is None:
                f.truncate(0)  # a lone BOM or a torn header
                self._write(f, _csv_text(csv_header(self.top_k)))
        except OSError as e:
            f.close()
            raise OutputError(f"cannot write {name}: {_reason(e)}") from None
        except BaseException:
            f.close()
            raise
        for _, row in kept:
            self.finished_counts[row["input"]] += 1
        self.finished = set(self.finished_counts)
        return f

    def write(self, pred: Prediction) -> None:
        """Append one row and flush it to the OS, so a crash cannot lose it."""
        line = csv_line(pred, self.top_k) if self.fmt == "csv" else json_line(pred) + "\n"
        try:
            if self._replace:
                self._file.seek(0)
                self._file.truncate()
                self._replace = False
            if self._header_due:
                line = _csv_text(csv_header(self.top_k)) + line
                self._header_due = False
            self._write(self._file, line)
        except OSError as e:
            raise OutputError(f"cannot write {self.name}: {_reason(e)}") from None
        self._rows += 1

    @staticmethod
    def _write(f: BinaryIO, text: str) -> None:
        f.write(text.encode(_ENCODING, _ERRORS))
        f.flush()

    def close(self) -> None:
        """Flush to disk, close and unlock. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._file.flush()
            if not self.stdout:
                os.fsync(self._file.fileno())
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # fsync unsupported here
                raise OutputError(f"cannot write {self.name}: {_reason(e)}") from None
        finally:
            if not self.stdout:
                self._file.close()
            if self._created and not self._rows:
                # Nothing was classified (the model failed to load): a header-only
                # OUT would make the rerun refuse it as existing, for no gain.
                # Removed while still locked, so no other run can have opened it.
                self.path.unlink(missing_ok=True)
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Lock:
    """An exclusive flock on `OUT.lock`, which records the holder's pid.

    The lock is on a sidecar, not OUT itself, so OUT can be checked and
    truncated only once the lock is held; the sidecar also carries the pid for
    the message the second run prints. The lock dies with its process, so a
    killed run leaves a stale sidecar that the next run simply takes over.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    @classmethod
    def acquire(cls, out: Path) -> _Lock:
        import fcntl

        path = out.with_name(out.name + ".lock")
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OutputError(f"cannot write {out}: {_reason(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"cannot lock {path}: {_reason(e)}") from None
                who = f" (pid {pid})" if pid else ""
                raise OutputError(f"{out} is being written by another ofacls run{who}") from None
            # A finishing run unlinks the sidecar: if that happened between our
            # open and flock, we hold a lock nobody else will see. Try again.
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return cls(path, fd)
            os.close(fd)
        raise OutputError(f"cannot lock {path}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                os.unlink(self.path)  # while still locked, so no one else's goes
        except OSError:
            pass  # a leftover sidecar is harmless: the next run takes it over
        finally:
            os.close(self.fd)
            self.fd = None


def _is_stream(path: Path) -> bool:
    """An existing non-regular, non-folder file: a device, FIFO or socket."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _replace_contents(path: Path, data: bytes) -> None:
    """Give `path` these bytes all at once: written beside it, then renamed over
    it, so a crash leaves either the old file or the new one, never half of each."""
    path = path.resolve()  # through a symlink: the file it names gets the bytes, the link stays
    # a name of its own, so no file of the user's (OUT.tmp, say) is ever clobbered
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _reason(e: OSError) -> str:
    reason = e.strerror or str(e)
    return reason[:1].lower() + reason[1:]
