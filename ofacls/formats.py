"""Prediction <-> rows in every output format: CSV, TSV, JSONL, a JSON array, Parquet.

Every format carries the same fields under the same names: `input`, `label`,
`score`, `index` (the label's class index: its position in the model's label
file), `error`, then the rest of the top k. CSV and TSV flatten that into
`label_i`, `score_i`, `index_i` columns (i = 2..k); JSONL, JSON and Parquet keep
the `top_k` list of Prediction.to_dict. Scores are written as Python's shortest
round-trip repr, so every text format gives back the very same float. TSV
escapes the tab, newline, carriage return and backslash in a value as `\\t`,
`\\n`, `\\r` and `\\\\`, so every record is one line of exactly k x 3 + 2 fields.

Text is UTF-8. File names that are not valid UTF-8 (os.scandir hands them over
with surrogate escapes) are written back as their original bytes in the text
formats, so every name round-trips exactly; such a row is not valid UTF-8, but
nothing is lost. Parquet strings must be valid UTF-8: there such a name has its
undecodable bytes written as `\\xNN`.

Nothing here owns a file: the row functions give one Prediction's text (what
ofacls.encoders assembles into a file), a Scanner reads the rows of a text
output back from an open stream and parquet_rows those of a Parquet file (what
resuming needs), and read_rows reads a whole output file, for tests and scripts.

A Parquet file is only written whole, at the end of a run (its footer indexes
its rows); until then its rows go as JSONL to its journal (`parquet_journal`),
which is what a killed run leaves behind and what read_rows reads while it is
there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ofacls.errors import OutputError
from ofacls.prediction import Prediction

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
LINE_BASED = ("csv", "tsv", "jsonl", "json")  # a row per line: a crash leaves whole rows, a torn last line
BASE_COLUMNS = ["input", "label", "score", "index", "error"]

_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".json": "json", ".parquet": "parquet"}
ENCODING = "utf-8"
ERRORS = "surrogateescape"  # names that are not UTF-8 are written as their own bytes
_BOM = b"\xef\xbb\xbf"
_LEGACY_COLUMNS = ["input", "label", "score", "error"]  # ofacls 0.1, before class indices
_TSV_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_TSV_UNESCAPE = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
_JOURNAL_SUFFIX = ".partial"
PARQUET_BATCH_ROWS = 8192  # rows read from a Parquet file at a time


def output_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """`fmt` if given, else the format OUT's extension names; OutputError otherwise."""
    if fmt is not None:
        fmt = fmt.lower()
        fmt = "jsonl" if fmt == "ndjson" else fmt
        if fmt not in FORMATS:
            raise OutputError(f"unknown output format {fmt!r} (choose {', '.join(FORMATS)})")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    raise OutputError(
        f"cannot tell the output format from {os.fspath(path)!r}: "
        "name it .csv, .tsv, .jsonl, .json or .parquet, or pass --format"
    )


def csv_header(top_k: int, extra: Sequence[str] = ()) -> list[str]:
    """`input,label,score,index,error`, then `label_i,score_i,index_i` for i = 2..top_k,
    then a command's `extra` columns (`true_label` for `ofacls eval`)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    return (BASE_COLUMNS + [f"{c}_{i}" for i in range(2, top_k + 1) for c in ("label", "score", "index")]
            + list(extra))


def format_score(score: float | None) -> str:
    """A score as text: the shortest repr that reads back as the same float."""
    return "" if score is None else repr(float(score))


def csv_row(pred: Prediction, top_k: int, extra: Sequence[str] = ()) -> list[str]:
    """One Prediction as fields under csv_header(top_k, extra); empty fields for None.
    The `extra` fields come from the Prediction's to_dict (a subclass's own)."""
    indices = pred.indices
    row = [pred.input, pred.label or "", format_score(pred.score), _format_index(pred.index),
           pred.error or ""]
    rest = pred.top_k[1:top_k]
    for i, (label, score) in enumerate(rest, 1):
        row += [label, format_score(score), _format_index(indices[i] if i < len(indices) else None)]
    row += [""] * (3 * (top_k - 1 - len(rest)))
    if extra:
        fields = pred.to_dict()
        row += [_cell(fields.get(c)) for c in extra]
    return row


def _cell(value: object) -> str:
    """A command's own field as one CSV/TSV cell: a list (a prediction set) as JSON."""
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list) else str(value)


def csv_line(pred: Prediction, top_k: int, extra: Sequence[str] = ()) -> str:
    """csv_row as one CSV record, newline-terminated (quoted as needed)."""
    return csv_text(csv_row(pred, top_k, extra))


def tsv_line(pred: Prediction, top_k: int, extra: Sequence[str] = ()) -> str:
    """csv_row as one TSV line, its tabs, newlines and backslashes escaped."""
    return tsv_text(csv_row(pred, top_k, extra))


def json_line(pred: Prediction) -> str:
    """One Prediction as a JSON object on one line (no trailing newline)."""
    return row_json(pred.to_dict())


def row_json(row: dict[str, Any]) -> str:
    """A row (as Prediction.to_dict gives it) as a JSON object on one line."""
    return json.dumps(row, ensure_ascii=False)


def parquet_journal(path: str | os.PathLike[str]) -> str:
    """Where the rows of the Parquet file at `path` are kept until it is written
    (ofacls.outfile): JSONL, one row per line, beside it."""
    return os.fspath(path) + _JOURNAL_SUFFIX


def prediction_of(row: dict[str, Any]) -> Prediction:
    """The Prediction a row (as read_rows gives it) was written from."""
    top_k = row.get("top_k") or []
    indices = [t.get("index") for t in top_k]
    return Prediction(row["input"], row.get("label"), row.get("score"),
                      [(t["label"], t["score"]) for t in top_k], row.get("error"),
                      indices if None not in indices else [])


# --- reading ----------------------------------------------------------------------


def holds_no_rows(data: bytes, fmt: str) -> bool:
    """Whether a file's bytes (its start) are an output with no rows yet: empty, or
    only what a new file starts with (a CSV or TSV header, an empty JSON array or
    its `[`, Parquet's magic)."""
    text = data.removeprefix(_BOM).strip()
    if not text:
        return True
    if fmt in ("csv", "tsv") and b"\n" not in text:
        fields = text.decode(ENCODING, ERRORS).split("," if fmt == "csv" else "\t")
        return fields[: len(BASE_COLUMNS)] == BASE_COLUMNS
    if fmt == "json":
        return b"".join(text.split()) in (b"[", b"[]")
    return (fmt, text) == ("parquet", b"PAR1")


@dataclass(frozen=True)
class Record:
    """One row of a line-based output file, where it lies and what it says."""

    line: int  # the line it starts on, 1-based
    start: int  # byte offsets in the file
    raw: bytes  # its bytes, newline included
    input: str
    error: str | None
    data: dict[str, Any] | list[str]  # the JSON object, or the CSV/TSV fields
    header: list[str] | None = None
    # `raw` without what only separates it from the next row (a JSON array's comma
    # and newline); None: all of `raw`
    object: bytes | None = None

    @property
    def body(self) -> bytes:
        """The row's own bytes: a JSON array's object, the whole line otherwise."""
        return self.raw if self.object is None else self.object

    @property
    def end(self) -> int:
        return self.start + len(self.raw)

    @property
    def row(self) -> dict[str, Any]:
        """As Prediction.to_dict gives it (JSONL: the object as read)."""
        if isinstance(self.data, dict):
            return self.data
        assert self.header is not None
        return _fields_to_dict(self.header, self.data)


class Scanner:
    """The rows of a CSV, TSV, JSONL or JSON array output, read back from `f` one at
    a time (a JSON array as ofacls writes it: `[`, one object per line, `]`).

    Streaming: memory does not grow with the file. Bytes after the last newline
    are a row the writer never finished: they are left out and `torn` is set.
    Anything else that is not a row raises OutputError naming its line, a
    complete last line included (and a CSV quoted field still open at the end
    of the file: a name's newline is not a row's end, so those lines were no
    row the writer finished either way, and a stray quote must not make the
    rows after it vanish). `header` is the CSV/TSV header once the first row
    is out; `header_end` is the offset past it (a JSON array's `[`); `end` is
    the offset past the last complete line read.
    """

    def __init__(self, f: BinaryIO, fmt: str, name: str) -> None:
        if fmt not in LINE_BASED:
            raise ValueError(f"{fmt} is not a line-based format")
        self.fmt, self.name = fmt, name
        self.header: list[str] | None = None
        self.header_end = 0
        self._array = "before" if fmt == "json" else ""  # where a JSON array's lines are: before, in, after
        self.end = 0
        self.torn = False
        self._f = f
        self._line = 0  # lines handed out so far
        self._raw: list[bytes] = []  # the lines of the record being read
        self._exhausted = False
        self._numeric: list[tuple[int, type[float] | type[int]]] = []  # the fields to check as numbers

    def __iter__(self) -> Iterator[Record]:
        records = self._csv() if self.fmt == "csv" else self._split()
        for line, fields in records:
            raw = b"".join(self._raw)
            self._raw.clear()
            start, self.end = self.end, self.end + len(raw)
            if not fields:  # a blank line
                continue
            if self.fmt == "json":
                record = self._array_line(fields[0], line, start, raw)
                if record is not None:
                    yield record
            elif self.fmt == "jsonl":
                obj = self._json_row(fields[0], line)
                yield Record(line, start, raw, obj["input"], obj["error"], obj)
            elif self.header is None:
                self.header = self._check_header(fields)
                self.header_end = self.end
                self._numeric = [(i, float if c.startswith("score") else int)
                                 for i, c in enumerate(self.header) if c.startswith(("score", "index"))]
            else:
                fields = self._fields(fields, line)
                yield Record(line, start, raw, fields[0], fields[4] or None, fields, self.header)

    def _lines(self) -> Iterator[str]:
        for raw in self._f:
            if not raw.endswith(b"\n"):
                self.torn = True
                break
            self._raw.append(raw)
            self._line += 1
            yield raw.removeprefix(_BOM if self._line == 1 else b"").decode(ENCODING, ERRORS)
        self._exhausted = True

    def _csv(self) -> Iterator[tuple[int, list[str]]]:
        # strict: a record torn inside a quoted field is an error at the end, not a short row
        reader = csv.reader(self._lines(), strict=True)
        while True:
            first = self._line + 1
            try:
                yield first, next(reader)
            except StopIteration:
                return
            except csv.Error:
                if self._exhausted:
                    raise OutputError(f"{self.name} line {first} opens a quoted field that is "
                                      "never closed") from None
                raise OutputError(f"{self.name} line {self._line} is not valid CSV") from None

    def _split(self) -> Iterator[tuple[int, list[str]]]:
        for text in self._lines():
            text = text.rstrip("\n").removesuffix("\r")
            if self.fmt in ("jsonl", "json"):
                yield self._line, [text] if text.strip() else []
            else:
                yield self._line, text.split("\t") if text else []

    def _check_header(self, fields: list[str]) -> list[str]:
        if fields[: len(BASE_COLUMNS)] == BASE_COLUMNS:
            return fields
        kind = self.fmt.upper()
        if fields[: len(_LEGACY_COLUMNS)] == _LEGACY_COLUMNS:
            raise OutputError(f"{self.name} was written by ofacls 0.1, without class indices: "
                              "write to a new file")
        sep = "," if self.fmt == "csv" else "\\t"
        raise OutputError(f"{self.name} is not an ofacls {kind} file "
                          f"(its header is not {sep.join(BASE_COLUMNS)}...)")

    def _array_line(self, text: str, line: int, start: int, raw: bytes) -> Record | None:
        """A line of a JSON array: its `[`, a row (an object, then a comma unless it
        is the last), or its `]`."""
        text = text.strip()
        if self._array == "before" and text in ("[", "[]"):
            self._array = "in" if text == "[" else "after"
            self.header_end = self.end
            return None
        if self._array == "in" and text == "]":
            self._array = "after"
            return None
        if self._array != "in":
            where = "after its end" if self._array == "after" else "before its `[`"
            raise OutputError(f"{self.name} line {line} is not an ofacls JSON array ({where}; "
                              "ofacls writes `[`, one row per line, `]`)")
        obj = self._json_row(text.removesuffix(","), line)
        body = raw.rstrip()
        return Record(line, start, raw, obj["input"], obj["error"], obj,
                      object=body[:-1].rstrip() if body.endswith(b",") else body)

    def _json_row(self, text: str, line: int) -> dict[str, Any]:
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
            raise OutputError(f"{self.name} line {line} is not an ofacls JSON row")
        if "error" not in obj:
            raise OutputError(f'{self.name} line {line} is not an ofacls JSON row (no "error" field)')
        if not isinstance(obj["error"], (str, type(None))):
            raise OutputError(f'{self.name} line {line} is not an ofacls JSON row '
                              '(its "error" is neither text nor null)')
        return obj

    def _fields(self, fields: list[str], line: int) -> list[str]:
        """The fields of a CSV/TSV row, checked (count, numbers) as cheaply as can be:
        resuming reads every row of what may be a very large file."""
        assert self.header is not None
        try:
            if len(fields) != len(self.header):
                raise ValueError("wrong number of fields")
            if self.fmt == "tsv":
                fields = [_tsv_unescape(f) for f in fields]
            for i, number in self._numeric:
                if fields[i]:
                    number(fields[i])
            return fields
        except ValueError:
            raise OutputError(f"{self.name} line {line} is not an ofacls row") from None


def read_rows(path: str | os.PathLike[str], fmt: str | None = None) -> list[dict[str, Any]]:
    """The rows of an output file, each as Prediction.to_dict() would give it.

    A torn last row of a line-based file (the writer was killed mid-row) is left
    out; anything else unreadable raises OutputError. CSV and TSV fields come
    back typed: empty -> None, scores -> float, indices -> int, the `_i`
    columns -> `top_k`. A Parquet file whose journal is there (a run is writing
    it, or was killed writing it) has the journal's rows.
    """
    fmt = output_format(path, fmt)
    name = os.fspath(path)
    try:
        if fmt == "parquet" and os.path.exists(journal := parquet_journal(os.path.realpath(name))):
            fmt, name = "jsonl", journal
        elif fmt == "parquet":
            return _read_parquet(name)
        with open(name, "rb") as f:
            if fmt in ("csv", "tsv", "jsonl"):
                return [record.row for record in Scanner(f, fmt, name)]
            rows = json.loads(f.read().decode(ENCODING, ERRORS))
    except OSError as e:
        raise OutputError(f"cannot read {name}: {e.strerror or e}") from None
    except ValueError:
        raise OutputError(f"{name} is not a JSON array") from None
    if not isinstance(rows, list):
        raise OutputError(f"{name} is not a JSON array")
    return rows


def _read_parquet(name: str) -> list[dict[str, Any]]:
    with open(name, "rb") as f:
        return list(parquet_rows(f, name))


def parquet_rows(f: BinaryIO, name: str) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet file, each as Prediction.to_dict() gives it, read
    PARQUET_BATCH_ROWS at a time (memory does not grow with the file)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OutputError("reading Parquet needs pyarrow: pip install 'ofacls[parquet]'") from None
    try:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
    except OSError as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise OutputError(f"cannot read {name}: {e}") from None
    except ValueError as e:
        raise OutputError(f"{name} is not a Parquet file: {e}") from None


def _fields_to_dict(header: list[str], record: list[str]) -> dict[str, Any]:
    """A CSV or TSV record as Prediction.to_dict() gives it."""
    fields = dict(zip(header, record, strict=True))
    label, score = fields["label"] or None, _parse_score(fields["score"])
    index = _parse_index(fields["index"])
    top_k = [] if label is None else [{"label": label, "score": score, "index": index}]
    i = 2
    while f"label_{i}" in fields:
        if fields[f"label_{i}"]:
            top_k.append({"label": fields[f"label_{i}"], "score": _parse_score(fields.get(f"score_{i}", "")),
                          "index": _parse_index(fields.get(f"index_{i}", ""))})
        i += 1
    extra = {c: fields[c] or None for c in header[len(csv_header(i - 1)):]}  # a command's own columns
    return {"input": fields["input"], "label": label, "score": score, "index": index,
            "top_k": top_k, "error": fields["error"] or None, **extra}


def _parse_score(text: str) -> float | None:
    return float(text) if text else None


def _parse_index(text: str) -> int | None:
    return int(text) if text else None


def _format_index(index: int | None) -> str:
    return "" if index is None else str(int(index))


def csv_text(row: Sequence[str]) -> str:
    buf = io.StringIO()
    # The csv module quotes a field when it holds a character of the line
    # terminator, so "\r\n" makes it quote fields with either \r or \n; the
    # record itself then ends in a plain "\n", friendlier to line-based tools.
    csv.writer(buf, lineterminator="\r\n").writerow(row)
    return buf.getvalue()[:-2] + "\n"


def tsv_text(row: Sequence[str]) -> str:
    return "\t".join(value.translate(_TSV_ESCAPE) for value in row) + "\n"


def _tsv_unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return re.sub(r"\\(.)", lambda m: _TSV_UNESCAPE.get(m.group(1), m.group(0)), text, flags=re.DOTALL)

