"""This process's C library, for the few calls torch and Python do not offer
(glibc's mallopt, madvise), and the allocator tuning made with them. Imports
nothing heavy: the CLI uses it at start."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Any


@functools.cache
def libc() -> ctypes.CDLL | None:
    """This process's own C library on Linux (glibc, musl: whichever it is), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def keep_freed_memory() -> None:
    """Let glibc reuse freed activations instead of handing them back to the kernel.

    glibc serves every block over its mmap threshold (adaptive, at most 32 MB) with
    a fresh mmap and unmaps it on free, so each encoder activation (15 MB per
    image at OFA-Large size) is page-faulted in anew: ~160k faults, 0.1-0.2 s per
    image on CPU. Fixed high thresholds keep freed blocks in the heap.

    Skipped where libc is not glibc or the user tuned the allocator (see
    _glibc_mallopt)."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    # older glibc refuses thresholds above 32 MB: fall back to that
    if not mallopt(m_mmap_threshold, 1 << 30):
        mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


def share_one_malloc_arena() -> None:
    """Make every thread allocate from glibc's one main arena (the CLI, at start).

    With the thresholds above, freed blocks stay in the arena of the thread that
    freed them, and glibc gives threads arenas of their own: four loader threads
    that each once decoded a huge scan keep that memory apiece (four 81 MP PNGs:
    3.6 GB peak; 1.5 GB sharing one arena). Allocations are few and large here:
    `ofacls batch` ran as fast with one arena as with eight (OFA-Large on CPU,
    four runs each, within the machine's noise). glibc fixes the arena limit when a
    second thread first allocates, so this must run before any thread starts:
    the CLI calls it first thing; a library cannot, and leaves it alone. A
    MALLOC_ARENA_MAX that is set rules instead."""
    mallopt = _glibc_mallopt()
    if mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ:
        m_arena_max = -8
        mallopt(m_arena_max, 1)


def _glibc_mallopt() -> Any:
    """glibc's mallopt, or None where libc is not glibc or the user tuned the
    allocator: another one preloaded, or glibc's own thresholds set (MALLOC_*_
    variables other than MALLOC_ARENA_MAX, which platforms often set;
    GLIBC_TUNABLES glibc.malloc.*)."""
    env = os.environ
    if (not _is_glibc() or "malloc" in env.get("LD_PRELOAD", "")
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")
            or any(k.startswith("MALLOC_") and k != "MALLOC_ARENA_MAX" for k in env)):
        return None
    return getattr(libc(), "mallopt", None)


def _is_glibc() -> bool:
    # confstr, not platform.libc_ver(), which reads the whole Python binary
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):
        return False
