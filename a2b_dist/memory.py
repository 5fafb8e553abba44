"""Keep a long pass over a role at constant memory on glibc.

Scoring allocates a few large temporaries per batch (images, maps: megabytes) between small
objects that live on (keys, scores, Python bookkeeping). glibc serves the large blocks from its
heap once its dynamic mmap threshold has grown past their size, and a heap whose top is pinned by
a small live object cannot shrink: resident memory then grows with every batch (measured:
`a2b evaluate` on 6,400 images at 128 px grew to 2.9 GB, of which the results are a few MB).
A fixed threshold makes every block above it a mapping of its own, returned to the system when
freed, and turns the dynamic adjustment off. Other C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3          # mallopt parameter number (glibc malloc.h)
MMAP_THRESHOLD = 128 * 1024    # glibc's own starting value, held fixed


def bound_heap() -> bool:
    """Fix glibc's mmap threshold at 128 KiB for this process; True when it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
