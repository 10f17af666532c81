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


_EARLIER_PEAK = 0  # the high-water mark before the last `reset_peak`


def reset_peak() -> bool:
    """Start a new high-water mark (Linux: /proc/self/clear_refs), so that the peak of one
    phase can be read at its end; `peak_rss_bytes` still reports the whole run's. False
    where the kernel does not allow it."""
    global _EARLIER_PEAK
    _EARLIER_PEAK = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def phase_peak_bytes() -> int:
    """The high-water mark since the last `reset_peak` (or since the start)."""
    return _hwm() or peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's resident high-water mark since it started its program.

    Linux's VmHWM belongs to the address space that exec creates, so a process launched
    by a big parent reports only its own peak; getrusage's ru_maxrss also counts what the
    forked copy of the parent held before exec (4 GB reported for a 0.5 GB run started
    from a benchmark that had evaluated a model). ru_maxrss is the fallback elsewhere.
    """
    hwm = _hwm()
    if hwm:
        return max(hwm, _EARLIER_PEAK)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def _hwm() -> int:
    """VmHWM in bytes, 0 where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
