"""Phase peaks (streamsvd/memory.py): a sample of resident memory taken before a phase
starts never counts toward it, however the sampling thread is scheduled; and the device
peak a run reports is the whole run's, though each phase resets CUDA's counter."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

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


class _CudaCounters:
    """torch.cuda's peak counters, stubbed on a CPU: `use(n)` allocates n bytes and frees
    them again, as a phase's temporaries do, so nothing stays allocated across a reset."""

    def __init__(self, monkeypatch):
        self.peak = 0
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)

    def reset(self, device=None):
        self.peak = 0

    def use(self, n: int):
        self.peak = max(self.peak, n)


def test_the_run_reports_its_device_peak_though_each_phase_resets_it(monkeypatch):
    """A large phase, then a smaller one: each phase's own peak is recorded, and the run's
    device peak is still the large phase's (the summary read the counter since the last
    reset: the smaller phase's)."""
    from streamsvd.pipeline import Compressor
    from streamsvd.report import peak_cuda_mb

    cuda = _CudaCounters(monkeypatch)
    run = SimpleNamespace(device=torch.device("cuda"), phase_peaks={}, plan=None, device_peak=0)
    for phase, used in (("factorise", 900 << 20), ("refine", 300 << 20)):
        with Compressor._phase(run, phase):
            cuda.use(used)
    assert run.phase_peaks["factorise"]["device_mb"] == 900
    assert run.phase_peaks["refine"]["device_mb"] == 300
    assert peak_cuda_mb(run) == 900
