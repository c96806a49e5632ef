"""WebDataset shards: tar files whose members are the samples' files, read as a
stream (never unpacked to disk, never seeked), each image member one input.

A member is named by its shard and its own name (`shards/00003.tar/000123.jpg`),
so a row leads back to it. Members that are not images by extension (a sample's
`.json`, `.txt`, `.cls`) are skipped. A shard that cannot be read, or breaks off
part way, is an error row naming it; the members read before stay, and the run
goes on with the next input.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import IO

from ofacls.sources.fetch import size_text
from ofacls.sources.walk import BadInput, Source, is_image_name

SHARD_SUFFIXES = (".tar",)
# WebDataset's brace patterns: {00000..00999} (zero-padded as written), {a,b,c}
_BRACES = re.compile(r"\{([^{}]*)\}")
MAX_SHARDS = 1_000_000  # a pattern naming more is a mistake, not a dataset


def is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def has_braces(name: str) -> bool:
    return bool(_BRACES.search(name)) and is_shard(name)


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: `{000..002}` counts with the
    padding written, `{a,b}` lists alternatives; several braces multiply out."""
    found = _BRACES.search(pattern)
    if found is None:
        return [pattern]
    head, tail, body = pattern[:found.start()], pattern[found.end():], found.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    rest = expand_braces(tail)
    if len(choices) * len(rest) > MAX_SHARDS:
        raise ValueError(f"{pattern} names more than {MAX_SHARDS:,} shards")
    return [head + c + r for c in choices for r in rest]


def shard_members(name: str, f: IO[bytes], *, max_bytes: int) -> Iterator[Source | BadInput]:
    """The image members of the shard `name`, read from `f` as a stream (the caller
    opens and closes it), each a Source holding its bytes; a member over `max_bytes`
    is a BadInput, read past unkept."""
    count = 0
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile() or not is_image_name(member.name):
                    continue
                member_name = f"{name}/{member.name}"
                if member.size > max_bytes:
                    count += 1
                    yield BadInput(member_name, f"member is {size_text(member.size)}, over the "
                                                f"{size_text(max_bytes)} limit")
                    continue
                data = tar.extractfile(member)
                body = data.read() if data is not None else b""
                count += 1
                yield Source(member_name, member_name, False, body)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f" after {count} member{'s' if count != 1 else ''}" if count else ""
        yield BadInput(name, f"not a readable tar shard{where} ({reason})")
        return
    if not count:
        yield BadInput(name, "no image members in this shard")
