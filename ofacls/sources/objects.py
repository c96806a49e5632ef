"""Object stores and other fsspec file systems (`s3://`, `gs://`, `az://`, `hf://`):
reading one object, listing a prefix, opening a list, table or shard as a stream.

fsspec picks the implementation by the URL's scheme (s3fs for `s3://`, gcsfs for
`gs://`, ...), installed by `pip install 'ofacls[cloud]'`; credentials and
endpoints come from where those libraries look (environment, config files,
`AWS_ENDPOINT_URL`). An object is read as an image file is: its header vetted
before the rest is fetched, at most `max_bytes`, within `timeout` seconds in all
(checked between chunks; s3fs's own socket timeouts bound each wait).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import IO, Any

from ofacls.errors import FetchError, InputError
from ofacls.sources.fetch import size_text
from ofacls.sources.vetting import HEAD_BYTES, check_head

CLOUD_HINT = "pip install 'ofacls[cloud]'"
# Object stores read through fsspec. Not every scheme fsspec knows: file:// and
# ftp:// stay refused as before, http(s) has its own guarded reader (fetch.py).
OBJECT_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf", "oss"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 1 << 20


def scheme(text: str) -> str | None:
    found = _SCHEME.match(text)
    return found.group(1).lower() if found else None


def is_object_url(text: str) -> bool:
    """Whether `text` names an object in an object store (s3://, gs://, az://, hf://, ...)."""
    return scheme(text) in OBJECT_SCHEMES


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of `url` and the path within it; InputError naming the
    package to install where the scheme's implementation is missing."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise InputError(f"{scheme(url)}:// needs its fsspec package ({e.name or e}): {CLOUD_HINT}") from None
    except ValueError as e:
        raise InputError(f"not a valid {scheme(url)}:// address ({e})") from None


def read_object(url: str, *, max_bytes: int, timeout: float) -> bytes:
    """An object's bytes, read as an image: its size and header checked before the
    rest is fetched; FetchError saying why not."""
    end = time.monotonic() + timeout
    try:
        fs, path = filesystem(url)
        info = fs.info(path)
        if info.get("type") == "directory":
            raise FetchError("is a folder (a prefix), not an object")
        size = info.get("size")
        if isinstance(size, int) and size > max_bytes:
            raise FetchError(f"object is {size_text(size)}, over the {size_text(max_bytes)} limit")
        with fs.open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            check_head(head)
            data = bytearray(head)
            while chunk := f.read(min(_CHUNK, max_bytes + 1 - len(data))):
                data += chunk
                if len(data) > max_bytes:
                    raise FetchError(f"larger than the {size_text(max_bytes)} limit")
                if time.monotonic() > end:
                    raise FetchError(f"timed out after {timeout:g} s")
    except FileNotFoundError:
        raise FetchError("no such object") from None
    except PermissionError:
        raise FetchError("access denied") from None
    except (OSError, ValueError) as e:
        raise FetchError(_first_line(e)) from None
    if not data:
        raise FetchError("empty object")
    return bytes(data)


def open_object(url: str) -> IO[bytes]:
    """`url` opened for streaming (a list, a table, a shard): read as it is consumed."""
    fs, path = filesystem(url)
    try:
        return fs.open(path, "rb", block_size=4 * _CHUNK)
    except FileNotFoundError:
        raise InputError("no such object") from None
    except (OSError, ValueError) as e:
        raise InputError(_first_line(e)) from None


def kind(url: str) -> str:
    """"directory", "file" or "missing": what `url` names."""
    fs, path = filesystem(url)
    try:
        return "directory" if fs.isdir(path) else ("file" if fs.exists(path) else "missing")
    except (OSError, ValueError) as e:
        raise InputError(_first_line(e)) from None


def list_objects(url: str, *, glob: bool) -> Iterator[str]:
    """The objects below prefix `url` (every depth), or matching the glob `url`, as
    full URLs in name order."""
    fs, path = filesystem(url)
    try:
        found = fs.glob(path) if glob else fs.find(path)
    except (OSError, ValueError) as e:
        raise InputError(_first_line(e)) from None
    for p in sorted(found, key=lambda p: p.split("/")):
        yield fs.unstrip_protocol(p)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]
