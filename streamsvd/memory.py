"""Process memory: give freed memory back to the operating system at once, and measure
the peak honestly.

glibc serves allocations below its mmap threshold from heaps it keeps after they are
freed, and raises that threshold (up to 32 MiB) each time a large block is freed. A run
that frees one block's temporaries and allocates the next block's then keeps hundreds of
MiB of freed memory resident, by an amount that varies from run to run. A fixed threshold
maps every allocation of 1 MiB or more on its own, so freeing it returns it: the peak RSS
is then what is alive, the same every run, and what `plan` estimates.

The peak of each phase of a run is sampled (`reset_peak`, `phase_peak_bytes`); the
kernel's high-water mark is never reset, so outside tools see the whole run's peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys
import threading
import time

import psutil

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


class _PhaseSampler:
    """Resident memory sampled from a daemon thread every few milliseconds: the peak of a
    phase without touching the kernel's own counters. Resetting them
    (/proc/self/clear_refs) would make every outside tool (`/usr/bin/time -v`,
    ru_maxrss) report only the peak since the last reset. An allocation touched and freed
    between two samples is missed; a large one takes longer than that to touch."""

    interval = 0.005  # seconds

    def __init__(self):
        self.process = psutil.Process()
        self.peak = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._sample, name="streamsvd-rss", daemon=True).start()

    def _sample(self):
        while True:
            # read and recorded under the lock: a sample read before a `reset` and recorded
            # after it would give the new phase the last one's memory (seen on a loaded CPU)
            with self.lock:
                self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def reset(self) -> None:
        with self.lock:
            self.peak = self.process.memory_info().rss

    def read(self) -> int:
        rss = self.process.memory_info().rss
        with self.lock:
            return max(self.peak, rss)


_SAMPLER: _PhaseSampler | None = None


def reset_peak() -> None:
    """Start a new phase: `phase_peak_bytes` reads its peak from here on. The kernel's
    high-water mark (`peak_rss_bytes`, `/usr/bin/time`) is left alone."""
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = _PhaseSampler()
    _SAMPLER.reset()


def phase_peak_bytes() -> int:
    """The peak resident memory since the last `reset_peak` (the whole run's before one)."""
    return _SAMPLER.read() if _SAMPLER is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's resident high-water mark since it started its program.

    Linux's VmHWM belongs to the address space that exec creates, so a process launched
    by a big parent reports only its own peak; getrusage's ru_maxrss also counts what the
    forked copy of the parent held before exec (4 GB reported for a 0.5 GB run started
    from a benchmark that had evaluated a model). ru_maxrss is the fallback elsewhere.
    """
    hwm = _hwm()
    if hwm:
        return hwm
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
