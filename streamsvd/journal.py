"""What a run has finished, so a killed run resumes where it stopped and never mixes runs.

The run directory holds `manifest.json` (every setting that affects the result, and the
model's fingerprint) and `journal.json` (finished stages with checksums of what each
wrote). Both are replaced atomically; a stage is recorded only after its files are
durable, so a crash at any instant leaves a stage either done or not done. The last error
a run stopped with is kept in `last_error.json` for `streamsvd status`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .errors import NotEnoughResources, StreamSVDError

MANIFEST = "manifest.json"
JOURNAL = "journal.json"
LAST_ERROR = "last_error.json"


class Journal:
    """durable=False keeps stages in memory only and writes nothing (benchmarking the
    commit protocol); such a run cannot be resumed, so it starts afresh."""

    def __init__(self, workdir: Path, manifest: dict, restart: bool = False, durable: bool = True,
                 writer: bool = True):  # fmt: skip
        """writer=False (every rank of a distributed run but rank 0): check the manifest and
        keep the stages in memory, but write, create or delete nothing. Such a rank starts
        with no stages: it takes rank 0's (RunDir), never its own reading of the file,
        which rank 0 may be rewriting as it reads."""
        self.workdir = Path(workdir)
        self.durable = durable
        self.writer = writer
        manifest_path = self.workdir / MANIFEST
        if not writer:
            old = None if restart else read_manifest(self.workdir)
            if old is not None and diff_settings(old, manifest):
                self._refuse(diff_settings(old, manifest))
            self.manifest = manifest
            self.stages = {}
            return
        if not durable and not restart and manifest_path.exists():
            raise StreamSVDError(
                f"{self.workdir} holds a resumable run; a run without a journal would "
                "discard it: choose another workdir"
            )
        if (restart or not durable) and self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        old = read_manifest(self.workdir)
        if old is not None:
            differences = diff_settings(old, manifest)
            if differences:
                self._refuse(differences)
        elif durable:
            atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
        self.manifest = manifest
        self.stages: dict[str, dict] = read_stages(self.workdir)

    def _refuse(self, differences: list[str]) -> None:
        changed = any(d.startswith("model_fingerprint.") for d in differences)
        processes = [d for d in differences if d.startswith("processes")]
        raise StreamSVDError(
            f"{self.workdir} holds a run with other settings"
            + (" of another checkpoint (the model files changed)" if changed else "")
            + "; nothing was changed. Run the same command as before to resume it"
            + (" (with as many processes as before: each one's stored activations are its "
               "own share of the calibration windows)" if processes else "")
            + ", add --restart to discard it, or choose another --workdir. "
            f"{len(differences)} difference(s):\n  " + "\n  ".join(differences)
        )  # fmt: skip

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def entry(self, stage: str) -> dict:
        return self.stages[stage]

    def record(self, stage: str, info: dict) -> None:
        self.stages[stage] = info
        self._save()

    def forget_from(self, stages: list[str]) -> None:
        """Drop these stages (they will be recomputed)."""
        for stage in stages:
            self.stages.pop(stage, None)
        self._save()

    def _save(self) -> None:
        if self.durable and self.writer:
            data = json.dumps({"stages": self.stages}, indent=2).encode()
            atomic_write_bytes(self.workdir / JOURNAL, data)


class RunLock:
    """One run per run directory: an exclusive advisory lock (flock) on `<run dir>.lock`,
    held from before the run directory is touched until the run ends. The kernel releases
    it when the process dies, so a killed run never leaves a stale lock; the file itself
    may stay behind, harmless, and is taken over by the next run."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one run at a time is then up to you
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = lock_holder(self.run_dir) or {}
            who = f"pid {holder['pid']}, started {holder['since']}" if holder else "another"
            raise NotEnoughResources(
                f"another streamsvd run ({who}) is using {self.run_dir}; wait for it to "
                "finish (streamsvd status --workdir shows it), or choose another --out or "
                "--workdir"
            ) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        if self._fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def lock_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + ".lock")


def lock_holder(run_dir: Path) -> dict | None:
    """{pid, since} of the live run holding `run_dir`'s lock, or None if none does."""
    try:
        import fcntl
    except ImportError:
        return None
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held: a run is live
        try:
            return json.loads(path.read_text() or "{}") or {"pid": "?", "since": "?"}
        except ValueError:
            return {"pid": "?", "since": "?"}
    finally:
        os.close(fd)
    return None


def _read_json(path: Path, default=None):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # written atomically, so only by hand
        raise StreamSVDError(
            f"{path} is damaged ({exc}); rerun with --restart to discard this run"
        ) from exc


def read_manifest(workdir: Path) -> dict | None:
    """The settings of the run in `workdir`, or None if it holds none."""
    return _read_json(Path(workdir) / MANIFEST)


def read_stages(workdir: Path) -> dict[str, dict]:
    """The finished stages the journal in `workdir` records (none without a journal)."""
    return _read_json(Path(workdir) / JOURNAL, {"stages": {}})["stages"]


def record_error(workdir: Path, message: str) -> None:
    """Keep the error a run stopped with, for `streamsvd status`. Best effort: the disk may
    be the very thing that failed."""
    info = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "error": message}
    try:
        atomic_write_bytes(Path(workdir) / LAST_ERROR, json.dumps(info, indent=2).encode())
    except OSError:
        pass


def disk_used(path: Path) -> int:
    """Bytes held by the files under `path` (hard links counted once)."""
    total, seen = 0, set()
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def run_status(workdir: Path) -> dict:
    """Where the run in `workdir` stands, from its files alone (no model needed)."""
    workdir = Path(workdir)
    manifest = read_manifest(workdir) if workdir.is_dir() else None
    if manifest is None:
        raise StreamSVDError(
            f"{workdir} holds no streamsvd run (no {MANIFEST}); a finished run deletes its "
            "run directory"
        )
    stages = read_stages(workdir)
    n_blocks = manifest.get("n_blocks", 0)
    done = [i for i in range(n_blocks) if f"block.{i}" in stages]
    pending = [i for i in range(n_blocks) if f"block.{i}" not in stages]
    return {
        "workdir": str(workdir),
        "settings": {k: v for k, v in manifest.items() if k != "model_fingerprint"},
        "model_shards": len(manifest["model_fingerprint"]["shards"]),
        "blocks_total": n_blocks,
        "blocks_done": len(done),
        "next_block": pending[0] if pending else None,
        "rest_done": "rest" in stages,
        "disk_used_bytes": disk_used(workdir),
        "last_error": _read_json(workdir / LAST_ERROR),
        "running": lock_holder(workdir),
    }


# Settings the manifest gained after runs had started without them, with the value those
# runs had: such a run resumes where the setting still has that value.
ADDED_SETTINGS = {"refine.holdout": 0, "refine.precision": "float32"}


def diff_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Each setting that differs, as 'name: was X, now Y' (a setting added since `old`
    was written counts as its ADDED_SETTINGS value there)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key not in old and ADDED_SETTINGS.get(f"{prefix}{key}", a) == b:
            continue  # the value the run had before the setting existed
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: was {a!r}, now {b!r}")
    return out
