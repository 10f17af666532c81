"""What a run has finished, so a killed run resumes where it stopped and never mixes runs.

The run directory holds `manifest.json` (every setting that affects the result, and the
model's fingerprint) and `journal.json` (finished stages with checksums of what each
wrote). Both are replaced atomically; a stage is recorded only after its files are
durable, so a crash at any instant leaves a stage either done or not done.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .errors import StreamSVDError

MANIFEST = "manifest.json"
JOURNAL = "journal.json"


class Journal:
    def __init__(self, workdir: Path, manifest: dict, restart: bool = False):
        self.workdir = Path(workdir)
        if restart and self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        manifest_path = self.workdir / MANIFEST
        if manifest_path.exists():
            differences = diff_settings(json.loads(manifest_path.read_text()), manifest)
            if differences:
                raise StreamSVDError(
                    f"{self.workdir} holds a run with other settings; use the same command "
                    "to resume it, --restart to discard it, or another --workdir:\n  "
                    + "\n  ".join(differences)
                )
        else:
            atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
        self.manifest = manifest
        journal_path = self.workdir / JOURNAL
        self.stages: dict[str, dict] = (
            json.loads(journal_path.read_text())["stages"] if journal_path.exists() else {}
        )

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
        data = json.dumps({"stages": self.stages}, indent=2).encode()
        atomic_write_bytes(self.workdir / JOURNAL, data)


def diff_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Each setting that differs, as 'name: was X, now Y'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: was {a!r}, now {b!r}")
    return out
