"""Process-wide tuning for a process that exists to classify: the CLI applies it;
a program embedding the library opts in with `ofacls.tune_process()`.

A library call never changes these by itself: torch's thread count and glibc's
allocator belong to the whole program, which may have its own ideas about both.
"""

from __future__ import annotations

import os

from ofacls.libc import keep_freed_memory


def tune_process(*, threads: bool = True, allocator: bool = True) -> None:
    """Tune this process for classification throughput.

    `threads`: torch uses one thread per core this process may run on (a
    container or taskset can give fewer than the machine has), unless
    OMP_NUM_THREADS says otherwise. `allocator`: glibc keeps freed activations
    for reuse instead of unmapping them (see `ofacls.libc.keep_freed_memory`:
    0.1-0.2 s per image at OFA-Large size on CPU). Imports torch."""
    if threads:
        use_every_core()
    if allocator:
        keep_freed_memory()


def use_every_core() -> None:
    """One forward at a time on every core this process may use, without oversubscribing."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores or 1))
