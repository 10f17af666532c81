"""Process memory: give freed memory back to the operating system at once, and measure
the peak honestly.

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
import resource
import sys

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


def peak_rss_bytes() -> int:
    """This process's resident high-water mark since it started its program.

    Linux's VmHWM belongs to the address space that exec creates, so a process launched
    by a big parent reports only its own peak; getrusage's ru_maxrss also counts what the
    forked copy of the parent held before exec (4 GB reported for a 0.5 GB run started
    from a benchmark that had evaluated a model). ru_maxrss is the fallback elsewhere.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux
