"""glibc malloc settings that let RSS fall again after large messages.

glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB at start) with
their own mmap, and unmaps them when freed. But each time such a block is
freed, glibc raises the threshold to its size (up to 32 MiB) and the trim
threshold to twice that: after the first 8 MiB message, every later
message-sized buffer (the DATA bytearray, its bytes copy, the spool record,
a worker's decoded parts) comes from the heap, and one small object left
behind a freed buffer keeps the heap from shrinking. Measured on a node
after 40 messages of 7.5 MiB: 111 MB settled RSS against 61 MB at start;
with the threshold fixed at 256 KiB, 85 MB (bench/rss.py). In a test
program (20 buffers of 4 MiB freed, small objects kept between them) 80 MB
stayed resident; with the fixed threshold under 1 MB did.

Setting either threshold turns the dynamic adjustment off. An operator who
sets ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (glibc's own
environment tunables) or ``GLIBC_TUNABLES`` keeps those instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from twisted.logger import Logger

log = Logger()

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024
TRIM_THRESHOLD = 1024 * 1024
_OPERATOR_SET = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds; False where there is no glibc
    or the operator chose their own. Call once, early in the process."""
    if any(name in os.environ for name in _OPERATOR_SET):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        log.warn("mallopt refused the mmap/trim thresholds; RSS may stay high after large mail")
    return ok
