"""Inputs cut into parts that any machine can read on its own: what a cluster's
workers read for themselves, so a table of a billion rows never passes through
one process.

A Part is one row group of a Parquet table, one CSV/TSV/JSONL table, one
WebDataset shard, or a run of inputs listed here (files, folders, globs, URLs,
list files: expanded by the caller, as a local batch expands them). `plan` cuts
the user's inputs into parts, reading no more of a table than a Parquet file's
footer; `read_part` reads one part, wherever the part's location can be reached
(an object store, or a path every node sees), giving exactly the items a local
batch gives: the same names, kept columns and error rows.

Every part gives at least one item, and the same items in the same order each
time it is read, so (part, position) names an input: a run can ask for some of a
part's inputs again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from ofacls.sources import objects, shards, tables
from ofacls.sources.expand import TableColumns, read_container
from ofacls.sources.fetch import DEFAULT_MAX_BYTES
from ofacls.sources.walk import BadInput, Source

# inputs listed here that travel as one part: few enough that a part is small,
# many enough that a folder of a million files is not a million parts
LISTED_PER_PART = 256


@dataclass(frozen=True)
class Part:
    """One independently readable piece of the inputs; `index` orders the parts."""

    index: int
    kind: str  # "table", "shard" or "listed"
    name: str = ""  # the table or shard as the user named it
    location: str = ""  # where it is read: an absolute path or a URL
    row_group: int | None = None  # a Parquet table's row group; None: the whole table
    first: int = 1  # the table's row number of the part's first row
    listed: tuple[Source | BadInput, ...] = field(default=(), repr=False)
    only: frozenset[int] | None = None  # positions to read again; None: all


def read_on_cluster(arg: str) -> bool:
    """Whether a worker reads this input itself: a table or a shard (or a brace
    pattern of shards) in an object store or in a local file."""
    if not (tables.is_table(arg) or shards.is_shard(arg)):
        return False
    if objects.is_object_url(arg) or shards.has_braces(arg):
        return True
    try:
        return stat.S_ISREG(os.stat(arg).st_mode)
    except (OSError, ValueError):
        return False  # told as the local batch tells it


def plan(inputs: Iterable[str], expand: Callable[[str], Iterable[Source | BadInput]]) -> Iterator[Part]:
    """The parts of `inputs`, in input order. Tables and shards are read where the
    part is classified; every other input goes through `expand` here (the same
    expansion a local batch makes) and travels as listed items."""
    index = 0
    listed: list[Source | BadInput] = []

    def flush() -> Iterator[Part]:
        nonlocal index, listed
        if listed:
            yield Part(index, "listed", listed=tuple(listed))
            index += 1
            listed = []

    for arg in inputs:
        names = _shard_names(arg) if shards.has_braces(arg) and not os.path.lexists(arg) else [arg]
        for name in names:
            if not read_on_cluster(name):
                for item in expand(name):
                    listed.append(item)
                    if len(listed) >= LISTED_PER_PART:
                        yield from flush()
                continue
            yield from flush()
            for part in _parts_of(name, index):
                yield part
                index += 1
    yield from flush()


def _shard_names(pattern: str) -> list[str]:
    try:
        return shards.expand_braces(pattern)
    except ValueError:
        return [pattern]  # expanded again as a listed input, which says why it cannot be


def _parts_of(name: str, index: int) -> list[Part]:
    """A table or shard as parts, numbered from `index`: a Parquet table a row group
    each (when its footer can be read here; else whole, and its reader says why)."""
    location = name if objects.is_object_url(name) else os.path.abspath(name)
    kind = "shard" if shards.is_shard(name) else "table"
    whole = [Part(index, kind, name, location)]
    if not name.lower().endswith(".parquet"):
        return whole
    try:
        with _open(location) as f:
            counts = tables.row_groups(f)
    except Exception:  # noqa: BLE001  (any failure to read it is the reader's to say)
        return whole
    parts: list[Part] = []
    first = 1
    for group, rows in enumerate(counts):
        if rows:
            parts.append(Part(index + len(parts), kind, name, location, row_group=group, first=first))
        first += rows
    return parts or whole


def _open(location: str) -> IO[bytes]:
    return objects.open_object(location) if objects.is_object_url(location) else open(location, "rb")


def read_part(part: Part, *, columns: TableColumns | None = None,
              max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[tuple[int, Source | BadInput]]:
    """The part's items, each with its position in the part (only those in
    `part.only`, when given)."""
    if part.kind == "listed":
        items: Iterable[Source | BadInput] = part.listed
    else:
        items = read_container(part.name, lambda: _open(part.location), where=part.location,
                               columns=columns or TableColumns(), max_bytes=max_bytes,
                               row_group=part.row_group, first=part.first)
    for position, item in enumerate(items):
        if part.only is None or position in part.only:
            yield position, item
