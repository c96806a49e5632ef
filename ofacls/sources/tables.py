"""Tables of inputs: Parquet, CSV, TSV and JSONL files (the text ones also gzipped),
one input per row, read as a stream (Parquet a row group at a time, text a line
at a time), so a table of a billion rows never sits in memory.

The input column is `input_col`, by default the first of DEFAULT_COLUMNS the
table has. Its value is a path, a URL or an object-store URL; a relative path is
relative to the table's folder (as `ofacls eval` reads its CSVs). `keep` names
columns carried into every output row beside ofacls' own. A row without an
input is an error row naming the table and the row; a table without the columns
asked for is one error row naming the columns it has.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import IO, Any

from ofacls.sources.walk import BadInput

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".csv.gz", ".tsv.gz", ".jsonl.gz")
DEFAULT_COLUMNS = ("url", "path", "input", "image", "file")
_PARQUET_BATCH = 4096  # rows decoded at a time from a row group
_LINE_LIMIT = 1 << 20  # a CSV field or JSONL line past this is a broken table, not a row


def is_table(name: str) -> bool:
    return name.lower().endswith(TABLE_SUFFIXES)


class Row:
    """One table row: its input's text as written, and the kept columns' values."""

    __slots__ = ("value", "kept", "number")

    def __init__(self, value: str, kept: dict[str, Any], number: int) -> None:
        self.value, self.kept, self.number = value, kept, number


def table_rows(name: str, f: IO[bytes], *, input_col: str | None, keep: Sequence[str],
               row_group: int | None = None, first: int = 1) -> Iterator[Row | BadInput]:
    """The rows of table `name`, read from `f` as a stream (the caller opens and
    closes it), in order: a Row per input, a BadInput per row without one, or one
    BadInput for a table that cannot be read.

    `row_group`: of a Parquet table only that row group, whose first row is the
    table's row number `first` (a cluster's workers read a table a group each)."""
    try:
        if name.lower().endswith(".parquet"):
            yield from _parquet(name, f, input_col, keep, row_group, first)
        else:
            yield from _text(name, f, input_col, keep)
    except _TableError as e:
        yield BadInput(name, str(e))
    except (OSError, ValueError, EOFError, csv.Error) as e:  # pyarrow's errors are among these
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        yield BadInput(name, f"cannot read this table ({reason})")


def relative_to(table: str, value: str) -> str:
    """Where a row's input is: as written when absolute or a URL, else beside the table."""
    from ofacls.sources.expand import is_url

    if is_url(value) or os.path.isabs(value):
        return value
    if "://" in table:  # an object store's table: beside it in the store
        return table.rsplit("/", 1)[0] + "/" + value
    return os.path.join(os.path.dirname(table), value)


class _TableError(Exception):
    """A table that cannot give rows at all (its columns)."""


def _pick(name: str, columns: Sequence[str], input_col: str | None, keep: Sequence[str]) -> str:
    have = list(columns)
    if input_col is not None and input_col not in have:
        raise _TableError(f"has no column {input_col!r} (its columns: {', '.join(have[:20])})")
    chosen = input_col or next((c for c in DEFAULT_COLUMNS if c in have), None)
    if chosen is None:
        raise _TableError(f"has none of the columns {', '.join(DEFAULT_COLUMNS)} (its columns: "
                          f"{', '.join(have[:20])}); name the input column with --input-col")
    missing = [c for c in keep if c not in have]
    if missing:
        raise _TableError(f"has no column {', '.join(map(repr, missing))} to keep "
                          f"(its columns: {', '.join(have[:20])})")
    return chosen


def _row(name: str, number: int, record: dict[str, Any], column: str, keep: Sequence[str]
         ) -> Row | BadInput:
    value = record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return BadInput(f"{name}:{number}", f"row {number} has no {column}")
    return Row(str(value).strip(), {k: record.get(k) for k in keep}, number)


def row_groups(f: IO[bytes]) -> list[int]:
    """The rows in each row group of the Parquet table in `f` (its footer alone is read)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(f).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _parquet(name: str, f: IO[bytes], input_col: str | None, keep: Sequence[str],
             row_group: int | None, first: int) -> Iterator[Row | BadInput]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(f)
    column = _pick(name, table.schema_arrow.names, input_col, keep)
    number = first - 1
    groups = None if row_group is None else [row_group]
    for batch in table.iter_batches(batch_size=_PARQUET_BATCH, row_groups=groups,
                                    columns=list(dict.fromkeys([column, *keep]))):
        for record in batch.to_pylist():
            number += 1
            yield _row(name, number, record, column, keep)


def _text(name: str, f: IO[bytes], input_col: str | None, keep: Sequence[str]) -> Iterator[Row | BadInput]:
    lower = name.lower()
    raw: IO[bytes] = gzip.GzipFile(fileobj=f) if lower.endswith(".gz") else f  # type: ignore[assignment]
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
    base = lower.removesuffix(".gz")
    if base.endswith(".jsonl"):
        yield from _jsonl(name, text, input_col, keep)
        return
    csv.field_size_limit(_LINE_LIMIT)
    reader = csv.reader(text, delimiter="\t" if base.endswith(".tsv") else ",", strict=True)
    header = next(reader, None)
    if header is None:
        raise _TableError("is empty (a table's first line names its columns)")
    header = [h.strip() for h in header]
    column = _pick(name, header, input_col, keep)
    for number, fields in enumerate(reader, 1):
        if not fields:
            continue
        yield _row(name, number, dict(zip(header, fields)), column, keep)


def _jsonl(name: str, text: io.TextIOWrapper, input_col: str | None, keep: Sequence[str]
           ) -> Iterator[Row | BadInput]:
    column: str | None = None
    for number, line in enumerate(iter(lambda: text.readline(_LINE_LIMIT + 1), ""), 1):
        if len(line) > _LINE_LIMIT:
            raise _TableError(f"line {number} is longer than {_LINE_LIMIT:,} characters")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            yield BadInput(f"{name}:{number}", f"line {number} is not JSON")
            continue
        if not isinstance(record, dict):
            yield BadInput(f"{name}:{number}", f"line {number} is not a JSON object")
            continue
        if column is None:  # the first object names the columns
            column = _pick(name, list(record), input_col, keep)
        yield _row(name, number, record, column, keep)
