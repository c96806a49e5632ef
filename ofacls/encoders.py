"""The bytes an output gets, format by format: a header that opens a new file, one
piece per row, and what closes the file (a JSON array's `]`, Parquet's footer).
A command may add fields of its own after the others (`columns`: eval's
`true_label`), taken from its rows' to_dict.

An Encoder owns no file: OutputFile decides where the bytes go. A JSON array's
closing `]` is the same after any row, so a regular OUT keeps it on disk after
every row (the next row overwrites it) and the file is a valid JSON array at
every moment, a killed run's included. Parquet goes out through pyarrow in row
groups of ROW_GROUP_ROWS as they fill, its footer (the rows still pending and
the file's metadata) at close.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ofacls.errors import OutputError
from ofacls.formats import ENCODING, ERRORS, csv_header, csv_line, csv_text, json_line, tsv_line, tsv_text
from ofacls.prediction import Prediction

ROW_GROUP_ROWS = 8192  # Parquet rows held in memory before they go out as one row group


class Encoder:
    """The text formats: CSV, TSV, JSONL and a JSON array (one object per line)."""

    def __init__(self, top_k: int, fmt: str = "jsonl", columns: Sequence[str] = ()) -> None:
        self.top_k, self.fmt = top_k, fmt
        self.columns = tuple(columns)
        self.rows = 0

    @property
    def tail(self) -> bytes:
        """What ends the file after any row, whichever came last (b"" if nothing
        does): a seekable OUT can keep it there all along."""
        return b"\n]\n" if self.fmt == "json" else b""

    def header(self) -> bytes:
        """What a new file starts with, before its first row."""
        if self.fmt not in ("csv", "tsv"):
            return b""
        text = (csv_text if self.fmt == "csv" else tsv_text)(csv_header(self.top_k, self.columns))
        return text.encode(ENCODING)

    def row(self, pred: Prediction) -> bytes:
        """The bytes of one more row (a JSON array's `[` comes with the first)."""
        self.rows += 1
        if self.fmt == "csv":
            text = csv_line(pred, self.top_k, self.columns)
        elif self.fmt == "tsv":
            text = tsv_line(pred, self.top_k, self.columns)
        elif self.fmt == "json":
            text = ("[\n" if self.rows == 1 else ",\n") + json_line(pred)
        else:
            text = json_line(pred) + "\n"
        return text.encode(ENCODING, ERRORS)

    def footer(self) -> bytes:
        """What closes a file that got at least one row."""
        return self.tail


class ParquetEncoder(Encoder):
    """Parquet through pyarrow: `row` gives a row group's bytes once ROW_GROUP_ROWS
    rows are pending (b"" before), `footer` the rest and the file's metadata."""

    def __init__(self, top_k: int, columns: Sequence[str] = (), group_rows: int = ROW_GROUP_ROWS) -> None:
        super().__init__(top_k, "parquet", columns)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise OutputError("Parquet output needs pyarrow: pip install 'ofacls[parquet]'") from None
        self._pa, self._pq = pa, pq
        LIST_COLUMNS = {"prediction_set": pa.list_(pa.string())}  # noqa: N806  (the rest: strings)
        entry = pa.struct([("label", pa.string()), ("score", pa.float64()), ("index", pa.int64())])
        self.schema = pa.schema([("input", pa.string()), ("label", pa.string()),
                                 ("score", pa.float64()), ("index", pa.int64()),
                                 ("top_k", pa.list_(entry)), ("error", pa.string()),
                                 *[(c, LIST_COLUMNS.get(c, pa.string())) for c in self.columns]])
        self._group_rows = group_rows
        self._pending: list[dict[str, Any]] = []
        self._sink = _Sink()
        self._writer: Any = None

    @property
    def tail(self) -> bytes:
        return b""

    def row(self, pred: Prediction) -> bytes:
        self.rows += 1
        row = pred.to_dict()
        row["input"] = _utf8(row["input"])
        for c in self.columns:
            value = row.get(c)
            if isinstance(value, list):
                row[c] = [_utf8(str(v)) for v in value]
            else:
                row[c] = None if value is None else _utf8(str(value))
        self._pending.append(row)
        return self._flush() if len(self._pending) >= self._group_rows else b""

    def footer(self) -> bytes:
        pending = self._flush()
        self._writer.close()
        return pending + self._sink.take()

    def _flush(self) -> bytes:
        if self._writer is None:
            self._writer = self._pq.ParquetWriter(self._sink, self.schema)
        if self._pending:
            self._writer.write_table(self._pa.Table.from_pylist(self._pending, schema=self.schema))
            self._pending = []
        return self._sink.take()


def encoder(fmt: str, top_k: int, columns: Sequence[str] = ()) -> Encoder:
    """The Encoder for one of formats.FORMATS."""
    return ParquetEncoder(top_k, columns) if fmt == "parquet" else Encoder(top_k, fmt, columns)


class _Sink:
    """A write-only file for pyarrow that keeps the bytes until they are taken
    (its own position, not the buffer's: the footer records row group offsets)."""

    closed = False

    def __init__(self) -> None:
        self._buf, self._pos = bytearray(), 0

    def write(self, data: bytes) -> int:
        self._buf += data
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


def _utf8(text: str) -> str:
    """`text` as valid UTF-8 (Parquet strings must be): a surrogate-escaped byte
    becomes `\\xNN`."""
    try:
        text.encode(ENCODING)
        return text
    except UnicodeEncodeError:
        return text.encode(ENCODING, ERRORS).decode(ENCODING, "backslashreplace")
