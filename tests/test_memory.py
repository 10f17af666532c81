"""Phase peaks (streamsvd/memory.py): a sample of resident memory taken before a phase
starts never counts toward it, however the sampling thread is scheduled."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from streamsvd.memory import _PhaseSampler

LOW, HIGH = 100 << 20, 900 << 20


class _HeldProcess:
    """A process whose next resident-memory reading, once armed, is HIGH and is held back
    until released: the sampling thread descheduled between reading and recording."""

    def __init__(self):
        self.armed, self.inside, self.release = False, threading.Event(), threading.Event()
        self.sampled_again = threading.Event()  # the held reading has been recorded

    def memory_info(self):
        if threading.current_thread().name == "streamsvd-rss":
            if self.armed:
                self.armed = False
                self.inside.set()
                self.release.wait(5)
                return SimpleNamespace(rss=HIGH)
            if self.release.is_set():
                self.sampled_again.set()
        return SimpleNamespace(rss=LOW)


def test_a_sample_read_before_a_reset_does_not_count_after_it():
    sampler = _PhaseSampler()
    process = _HeldProcess()
    sampler.process = process
    process.armed = True
    assert process.inside.wait(5)  # the sampler has read HIGH, not yet recorded it
    resetting = threading.Thread(target=sampler.reset)
    resetting.start()
    resetting.join(0.2)  # the new phase starts while the old reading is in flight
    process.release.set()
    resetting.join(5)
    assert not resetting.is_alive() and process.sampled_again.wait(5)
    assert sampler.read() == LOW
