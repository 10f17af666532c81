"""Run a command in its own process and measure it from outside: peak RSS (psutil sampling
of the process tree, and the kernel's ru_maxrss of the child), peak disk use of a folder,
wall time; optionally under a memory allowance, enforced by a cgroup limit where this
machine lets us create one and by a watchdog that kills the run when its RSS exceeds it.

    from monitor import run_measured
    result = run_measured([sys.executable, "-m", "streamsvd.cli", ...], allowance=2 << 30)
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from streamsvd.journal import disk_used

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


@dataclass
class Measured:
    returncode: int
    wall_s: float
    peak_rss_sampled: int  # bytes, largest sampled RSS of the process and its children
    ru_maxrss: int  # bytes, the kernel's high-water mark of the child process
    peak_disk: int | None  # bytes under `disk` at its largest
    killed_by_watchdog: bool = False
    allowance: int | None = None
    cgroup: dict | None = None  # limit, peak usage, OOM events where a cgroup was used
    timeline: list = field(default_factory=list)  # (seconds, rss bytes), thinned
    stderr_tail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class _Cgroup:
    """A memory cgroup with a hard limit; None from `create` where none can be made."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @classmethod
    def create(cls, limit: int) -> _Cgroup | None:
        name = f"streamsvd-bench-{uuid.uuid4().hex[:8]}"
        for version, root, limit_file in ((1, CGROUP_V1, "memory.limit_in_bytes"),
                                          (2, CGROUP_V2, "memory.max")):  # fmt: skip
            if not (root / limit_file).exists() and not (root / "cgroup.procs").exists():
                continue
            if version == 2 and not (root / "cgroup.controllers").exists():
                continue
            try:
                (root / name).mkdir()
                (root / name / limit_file).write_text(str(limit))
                if version == 1:  # no swap to escape into
                    swap = root / name / "memory.memsw.limit_in_bytes"
                    if swap.exists():
                        swap.write_text(str(limit))
                else:
                    (root / name / "memory.swap.max").write_text("0")
                return cls(root / name, version)
            except OSError:
                try:
                    (root / name).rmdir()
                except OSError:
                    pass
        return None

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def report(self) -> dict:
        read = lambda f: (self.path / f).read_text().strip()  # noqa: E731
        if self.version == 1:
            oom = dict(line.split() for line in read("memory.oom_control").splitlines())
            return {
                "version": 1,
                "limit": int(read("memory.limit_in_bytes")),
                "peak_usage": int(read("memory.max_usage_in_bytes")),
                "failcnt": int(read("memory.failcnt")),
                "oom_kill": int(oom.get("oom_kill", 0)) > 0,
            }
        events = dict(line.split() for line in read("memory.events").splitlines())
        peak = self.path / "memory.peak"
        return {
            "version": 2,
            "limit": int(read("memory.max")),
            "peak_usage": int(peak.read_text()) if peak.exists() else None,
            "oom_kill": int(events.get("oom_kill", 0)) > 0,
        }

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(
    command: list[str],
    *,
    disk: Path | None = None,
    allowance: int | None = None,
    use_cgroup: bool = True,
    interval: float = 0.02,
    env: dict | None = None,
    nice: int = 10,
) -> Measured:
    """Run `command` to completion, measuring it; with `allowance` (bytes) the run is
    limited to it (cgroup) and killed when its sampled RSS exceeds it (watchdog)."""
    cgroup = _Cgroup.create(allowance) if allowance and use_cgroup else None
    start = time.perf_counter()
    child = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )
    if cgroup is not None:
        cgroup.add(child.pid)  # before it has imported anything that allocates much
    proc = psutil.Process(child.pid)
    state = {"peak": 0, "disk": 0, "killed": False, "timeline": []}
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(child.stderr), daemon=True)
    reader.start()

    done = threading.Event()

    def sample() -> None:
        last_disk = 0.0
        while not done.is_set():
            try:
                rss = _tree_rss(proc)
            except psutil.Error:
                break
            now = time.perf_counter() - start
            state["peak"] = max(state["peak"], rss)
            if not state["timeline"] or now - state["timeline"][-1][0] >= 0.5:
                state["timeline"].append((round(now, 2), rss))
            if allowance and rss > allowance and not state["killed"]:
                state["killed"] = True
                os.killpg(child.pid, signal.SIGKILL)
            if disk is not None and now - last_disk >= 0.5:
                last_disk = now
                state["disk"] = max(state["disk"], disk_used(disk) if disk.exists() else 0)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)  # only here is the child reaped
    wall = time.perf_counter() - start
    done.set()
    child.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    reader.join(timeout=5)
    report = None
    if cgroup is not None:
        report = cgroup.report()
        cgroup.remove()
    return Measured(
        returncode=child.returncode,
        wall_s=round(wall, 2),
        peak_rss_sampled=state["peak"],
        ru_maxrss=usage.ru_maxrss * 1024,
        peak_disk=state["disk"] if disk is not None else None,
        killed_by_watchdog=state["killed"],
        allowance=allowance,
        cgroup=report,
        timeline=state["timeline"],
        stderr_tail="".join(stderr)[-2000:],
    )


def drop_page_cache(folder: Path) -> None:
    """Evict a file, or a folder's files, from the page cache (only those: other users'
    caches stay), so that the next read of them comes from disk."""
    for path in [folder] if folder.is_file() else folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
