"""Everything a run can know in its first seconds, checked before the first block: where it
will write (writable, a real filesystem, not inside the checkpoint, not through a symlink)
and whether the checkpoint's tensors fit the model its config describes. (Shard headers and
sizes are checked as the checkpoint is opened, in `checkpoint.check_shard`; calibration
text as it is read, in `calib.load_text`.)"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from .errors import StreamSVDError

# Filesystems that hold no files of ours: kernel interfaces, not disks.
PSEUDO_FILESYSTEMS = {
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
    "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "binfmt_misc",
    "autofs", "efivarfs", "hugetlbfs", "rpc_pipefs", "nsfs",
}  # fmt: skip


def check_locations(model: str, out: str, run_dir: Path) -> None:
    """--out and the run directory: not inside the checkpoint, --out not a symlink, each on
    a real filesystem that takes a probe write."""
    model_path = Path(model).resolve()
    out_path = Path(out)
    if out_path.is_symlink():
        raise StreamSVDError(
            f"--out {out} is a symbolic link (to {os.readlink(out_path)}); the output is "
            "renamed into place and would replace the link: give the real path"
        )
    for what, path in (("--out", out_path), ("the run directory", Path(run_dir))):
        resolved = path.resolve()
        if resolved == model_path or resolved.is_relative_to(model_path):
            raise StreamSVDError(
                f"{what} {path} is inside the checkpoint {model}: write the output elsewhere"
            )
        where = _nearest_existing(resolved)
        fstype = filesystem_type(where)
        if fstype in PSEUDO_FILESYSTEMS:
            raise StreamSVDError(
                f"{what} {path} is on a {fstype} pseudo-filesystem (a kernel interface, not "
                "a disk): choose a directory on a disk"
            )
        try:
            with tempfile.TemporaryFile(dir=where, prefix=".streamsvd-probe-"):
                pass
        except OSError as exc:
            raise StreamSVDError(
                f"cannot write {what} {path}: {where} is not writable "
                f"({exc.strerror or exc}); choose another location"
                + (" with --workdir" if what == "the run directory" else "")
            ) from exc


def check_shapes(model: nn.Module, shapes: dict[str, list[int]], path: str) -> None:
    """Every checkpoint tensor the model has a parameter for has that parameter's shape."""
    params = dict(model.named_parameters())
    wrong = [
        f"{name}: {list(shape)} in the checkpoint, {list(params[name].shape)} by its config"
        for name, shape in shapes.items()
        if name in params and list(params[name].shape) != list(shape)
    ]
    if wrong:
        raise StreamSVDError(
            f"{path}: {len(wrong)} tensor(s) do not have the shape config.json gives them, "
            f"e.g. {wrong[0]}; the weights and the config do not belong together"
        )


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (Linux: /proc/self/mountinfo), or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    target = str(Path(path).resolve())
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, fields[fields.index("-") + 1]
    return fstype


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path
