"""The C allocator's settings and the process's resident memory (issue 20).

Session states are tensors of a few MB to a few hundred MB, made and freed all the time
(every append and generation makes a new state, every eviction frees one).  With glibc's
defaults two things keep freed state in the process: each thread that allocates gets its
own arena (up to 8 per core), and the mmap threshold adapts upwards after the first large
free (up to 32 MiB), after which states come from the arenas' heaps, where a free rarely
gives memory back.  `configure` sets both with mallopt(3) at start (`malloc_arena_max`,
`malloc_mmap_threshold`; measured in docs/service.md, "Memory"), and `trim` hands freed
heap pages back after evictions (malloc_trim(3)).  Not glibc (musl, macOS): nothing to set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("memoryd")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
"""mallopt parameters (malloc.h)."""

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt, lib.malloc_trim  # noqa: B018 - glibc only: musl has neither
        except (OSError, AttributeError):
            return None
        _libc = lib
    return _libc


def configure(arena_max: int, mmap_threshold: int) -> dict[str, int]:
    """Set what is not 0 (0: glibc's default); returns what was set."""
    libc, done = _glibc(), {}
    if libc is None:
        return done
    if arena_max and libc.mallopt(M_ARENA_MAX, arena_max) == 1:
        done["arena_max"] = arena_max
    if mmap_threshold and libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1:
        done["mmap_threshold"] = mmap_threshold  # a fixed one also stops the dynamic raise
    return done


def trim() -> None:
    """Give freed heap memory back to the system (after an eviction)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_bytes() -> int:
    """Resident set size of this process (Linux: /proc/self/statm; elsewhere 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
