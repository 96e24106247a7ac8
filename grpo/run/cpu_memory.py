"""glibc malloc policy for training on a CPU: memory that a step frees stays mapped for the next step.

A training step allocates and frees gigabytes: activations, gradients, [N, V] log-prob buffers. glibc returns
the top of its heap to the system once more than M_TRIM_THRESHOLD bytes are free there (64 MiB by the time its
adaptive thresholds settle), so every step faulted much of its memory in again: ~1 us per 4 KiB page on one
thread, several times that when two threads fault at once. On a 2-core EPYC a step of the 135M model faulted
~0.7 GB that way and its forward+backward took 2.9-3.3 s; with the heap kept mapped, 2.2-2.4 s, at the same
peak RSS (the heap only grows to the step's high-water mark, RSS just stays there between steps).

Blocks of 32 MiB and more keep their own mmap. Serving those from the heap too removes the last faults but
fragments it: glibc's aligned allocations ask for a little more than the block, and a loop of equal 64 MiB
blocks grew the heap by 64 MiB per round for seven rounds.

`mapped_allocations` is the exception for long-lived buffers built while the activations are gone (the
decoder's packed weights): in the heap they would leave holes that the next backward does not fit into.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Iterator
from contextlib import contextmanager

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # the ceiling of glibc's own adaptive threshold on 64-bit systems
GLIBC_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # where glibc's adaptive trim threshold settles
KEPT_HEAP_BYTES = 1 << 30  # free memory at the heap top kept mapped rather than returned to the system

_heap_kept = False


def keep_freed_memory() -> bool:
    """Keep up to 1 GiB of freed heap mapped (process-wide, idempotent). Returns False where the C library
    is not glibc, which leaves the allocator as it is."""
    global _heap_kept
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT_HEAP_BYTES)
    _heap_kept = True
    return True


@contextmanager
def mapped_allocations() -> Iterator[None]:
    """Blocks of 256 KiB or more allocated inside get their own mmap, so freeing them returns the pages.

    Afterwards: 32 MiB blocks and up are mapped on their own again, and the heap top is trimmed beyond 1 GiB
    if `keep_freed_memory` ran, else beyond 64 MiB (the values glibc's adaptive thresholds settle on).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, KEPT_HEAP_BYTES if _heap_kept else GLIBC_TRIM_THRESHOLD)


@functools.cache  # find_library runs ldconfig in a subprocess: once per process, not once per rollout
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c"))
