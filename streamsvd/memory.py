"""Process memory: give freed memory back to the operating system at once.

glibc serves allocations below its mmap threshold from heaps it keeps after they are
freed, and raises that threshold (up to 32 MiB) each time a large block is freed. A run
that frees one block's temporaries and allocates the next block's then keeps hundreds of
MiB of freed memory resident, by an amount that varies from run to run. A fixed threshold
maps every allocation of 1 MiB or more on its own, so freeing it returns it: the peak RSS
is then what is alive, the same every run, and what `plan` estimates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; False where there is no
    glibc (macOS, musl), which needs nothing."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; freed memory may stay resident")
    return ok
