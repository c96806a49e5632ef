"""Finding the images an input names: the Source and BadInput it becomes, folder
walks and glob matches (the rules are ofacls.sources.expand' docstring's)."""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ofacls.sources.fetch import redact

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
GLOB_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Source:
    """One thing to classify."""

    name: str  # exactly what the output row's `input` shows
    location: str  # path or URL to read
    is_url: bool
    data: bytes | None = field(default=None, repr=False)  # the image itself (stdin, a shard member)
    # a table row's kept columns (--keep-cols), carried into its output row
    extra: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.is_url:  # credentials never reach a row or a message
            object.__setattr__(self, "name", redact(self.name))


@dataclass(frozen=True)
class BadInput:
    """An input that names nothing readable; the caller writes it as an error row."""

    name: str  # exactly what the output row's `input` shows
    error: str  # one line, e.g. "no such file or directory"


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions folders are filtered by."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def nonempty(name: str, items: Iterable[Source | BadInput], error: str) -> Iterator[Source | BadInput]:
    """`items`, or one BadInput when there are none, so every input shows up in the output."""
    empty = True
    for item in items:
        empty = False
        yield item
    if empty:
        yield BadInput(name, error)


# --- reading files -----------------------------------------------------------------


def walk_folder(root: str, seen: set[tuple[int, int]], *, seen_names: set[str] | None = None
          ) -> Iterator[Source | BadInput]:
    """Images below folder `root` (named and located as `root` joined with the path below).

    `seen` holds the (device, inode) of every folder already walked: a symlink to
    one of them (a loop, or a second link to the same place) is not entered again.
    An explicit stack, not recursion, so deep trees cannot exhaust Python's stack.
    """
    try:
        st = os.stat(root or ".")
    except OSError as e:
        yield BadInput(root, os_message(e, path=root))
        return
    if (st.st_dev, st.st_ino) in seen:
        return
    seen.add((st.st_dev, st.st_ino))
    stack = [_listing(root)]
    while stack:
        try:
            entry = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if isinstance(entry, BadInput):
            yield entry
            continue
        dir_path, name = entry
        path = os.path.join(dir_path, name)
        try:
            st = os.stat(path)
        except OSError as e:
            # A loop link gives no hint whether it meant a file or a folder, so it
            # is always reported; a dangling link only when it looks like an image.
            if e.errno == errno.ELOOP or is_image_name(name):
                yield BadInput(path, os_message(e, path=path))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                stack.append(_listing(path))
        elif is_image_name(name):
            if seen_names is not None:
                if path in seen_names:
                    continue
                seen_names.add(path)
            if stat.S_ISREG(st.st_mode):
                yield Source(path, path, False)
            else:  # a FIFO named like an image: reported, as a dangling link is
                yield BadInput(path, not_regular(st.st_mode))


def _listing(folder: str) -> Iterator[tuple[str, str] | BadInput]:
    """(folder, name) for the visible entries of a folder, sorted by name."""
    try:
        names = _names(folder, hidden=False, strict=True)
    except OSError as e:
        yield BadInput(folder, os_message(e, path=folder))
        return
    for name in names:
        yield folder, name


def expand_glob(pattern: str, *, walk: bool) -> Iterator[Source | BadInput]:
    """A quoted glob, expanded like bash with globstar: `*`, `?`, `[...]` within a
    name, `**` across any number of folders. Hidden names match only a pattern
    part that starts with `.`. A glob keeps image files (by extension, as a folder
    walk does, and as yolo and timm take globs): `photos/*` is the photos, not
    the notes beside them. Matched folders are walked, except that a trailing
    `**` matches folders only, so `photos/**` means "all images below". With
    `walk=False` matched folders are skipped instead, and a trailing `**` matches
    files too, as in bash.
    """
    start = GLOB_MAGIC.search(pattern)
    assert start is not None
    base = pattern[: pattern.rfind("/", 0, start.start()) + 1]  # as given, with its "/"
    parts = [p for p in pattern[len(base) :].split("/") if p]
    if not walk and parts[-1] == "**" and not pattern.endswith("/"):
        parts.append("*")  # our `**` matches folders only; bash's also every file below
    dirs_only = pattern.endswith("/") or parts[-1] == "**"
    matches = sorted(set(_glob_parts(base, parts, dirs_only, set())), key=lambda p: p.split("/"))
    seen_dirs = _match_folders(matches, base) if walk else set()
    seen_files: set[str] = set()  # `a/**` style patterns reach a file both ways
    items: list[Source | BadInput] = []
    for path in matches:
        try:
            st = os.stat(path or ".")
        except OSError as e:
            items.append(BadInput(path, os_message(e, path=path)))
            continue
        if stat.S_ISDIR(st.st_mode):
            if walk:  # else skipped: in predict a glob selects files
                items.extend(walk_folder(path, seen_dirs, seen_names=seen_files))
        elif path not in seen_files and is_image_name(path):
            seen_files.add(path)
            if stat.S_ISREG(st.st_mode):
                items.append(Source(path, path, False))
            else:
                items.append(BadInput(path, not_regular(st.st_mode)))
    yield from nonempty(pattern, items, "no images match this pattern")


def _match_folders(matches: list[str], base: str) -> set[tuple[int, int]]:
    """(device, inode) of the folders a glob's matches were found in, to count as walked.

    Otherwise a matched folder's walk that links back into one (`tree/sub/up ->
    ..` for `tree/*`) yields those matches again under a longer name. Folders
    that are matches themselves (`p/**` matches p/ and p/sub/) are left out, as
    they are to be walked; paths, not inodes, decide that, so a link `p/self ->
    .` matched by `p/*` does not exempt p.
    """

    def norm(path: str) -> str:
        return os.path.normpath(path or ".")

    matched = {norm(p) for p in matches}
    parents = {norm(os.path.dirname(norm(p))) for p in matches if p != base} - matched
    keys: set[tuple[int, int]] = set()
    for parent in parents:
        try:
            st = os.stat(parent)
        except OSError:
            continue  # gone since the glob listed it: nothing to keep out
        keys.add((st.st_dev, st.st_ino))
    return keys


def _glob_parts(prefix: str, parts: list[str], dirs_only: bool, seen: set[tuple[int, int, int]]
                ) -> Iterator[str]:
    """Paths below folder `prefix` ("" for the current one) that match `parts`."""
    if not parts:
        yield prefix
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        try:
            st = os.stat(prefix or ".")
        except OSError:
            return
        # Keyed by how much pattern is left, so `**/a/**` may pass a folder twice.
        key = (st.st_dev, st.st_ino, len(parts))
        if key in seen:  # a symlink loop, or a second way to the same folder
            return
        seen.add(key)
        yield from _glob_parts(prefix, rest, dirs_only, seen)
        for name in _names(prefix, hidden=False):
            path = prefix + name
            if os.path.isdir(path):
                yield from _glob_parts(path + "/", parts, dirs_only, seen)
        return
    if GLOB_MAGIC.search(head):
        hidden = head.startswith(".")
        names = [n for n in _names(prefix, hidden=hidden) if fnmatch.fnmatchcase(n, head)]
    else:
        names = [head] if os.path.lexists(prefix + head) else []
    for name in names:
        path = prefix + name
        if rest:
            if os.path.isdir(path):
                yield from _glob_parts(path + "/", rest, dirs_only, seen)
        elif not dirs_only or os.path.isdir(path):
            yield path


def _names(folder: str, *, hidden: bool, strict: bool = False) -> list[str]:
    """Sorted entry names of `folder` ("" is the current one); [] if unreadable unless strict."""
    try:
        with os.scandir(folder or ".") as entries:
            return sorted(e.name for e in entries if hidden or not e.name.startswith("."))
    except OSError:
        if strict:
            raise
        return []


def not_regular(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    kind = next((k for test, k in kinds if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def os_message(e: OSError, *, path: str | None = None) -> str:
    """A short, lower-case reason for a failed file operation."""
    if e.errno == errno.ENOENT and path is not None and os.path.islink(path):
        return "dangling symlink"
    messages = {errno.ENOENT: "no such file or directory", errno.ENOTDIR: "no such file or directory",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.ELOOP: "symlink loop", errno.EISDIR: "is a directory",
                errno.ENAMETOOLONG: "file name too long"}
    if e.errno in messages:
        return messages[e.errno]
    reason = e.strerror or str(e)
    return reason[:1].lower() + reason[1:]
