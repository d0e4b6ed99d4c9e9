"""Process-level tuning that depends on the platform."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Keep large buffers (read windows, compressed chunks, packs) in the heap for reuse.

    By default glibc maps and unmaps each large block, so every chunk pays fresh page
    faults; measured on the benchmark database this halves system time (1.0 s -> 0.55 s)
    and cuts about 0.3 s of wall time. The cost is memory that stays with the process until
    it exits. Returns whether the tuning applied (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, 64 << 20) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 512 << 20) == 1
    ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    return bool(ok)
