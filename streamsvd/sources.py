"""What a run read from the checkpoint, so that a resumed (or days-long) run never builds one
model from two checkpoints.

Every stage that reads checkpoint tensors (block 0's inputs, each block of either pass, the
embedding/head shard) records the SHA-256 of each tensor it read, hashed from the bytes in
memory: no extra read, about a second per 1.7 GB block of a 70B model
(benchmarks/results/fingerprint_cost.md). The run also keeps each shard's stat (size,
mtime, ctime, inode). Before a stage reads the checkpoint, and when a run resumes, a shard
whose stat changed has the tensors that finished stages read from it hashed again; a tensor
whose content differs stops the run, naming it and the stage that read it. A stat that
changed with every such tensor the same (a touch, a copy) is taken as the new one. The
manifest's fingerprint (journal.py: headers, first and last MiB) stays the first, cheapest
check; this one sees a change anywhere in a shard.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict

import torch

from .errors import StreamSVDError


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (a view of its memory: no copy when it is
    contiguous, as a tensor read from safetensors is)."""
    digest = hashlib.sha256(f"{t.dtype} {list(t.shape)}".encode())
    digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> tensor_sha256, for a stage's journal entry ("read")."""
    return {name: tensor_sha256(t) for name, t in tensors.items()}


def combined_sha256(digests: dict[str, str]) -> str:
    """One digest of a name -> digest mapping, in name order (for comparing ranks)."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(f"{name}={digests[name]};".encode())
    return digest.hexdigest()


def shard_stats(reader) -> dict[str, list[int]]:
    """Each shard's [size, mtime_ns, ctime_ns, inode]: a write, a replaced file or a copy
    changes one of them (ctime cannot be set back by hand, as mtime can)."""
    return {shard: file_stat(reader.path / shard) for shard in sorted(set(reader.stored.values()))}


def file_stat(path) -> list[int]:
    """A file's [size, mtime_ns, ctime_ns, inode]."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def changed_read(tensors, stages: dict[str, dict], shards: set[str]) -> str | None:
    """The first tensor a finished stage read from one of `shards` whose content differs
    now, as a message; None when every one is as it was read. `tensors`: the run's
    ModelTensors. A parameter counts as read from every shard holding a tensor of its
    checkpoint module (a weight and its scales, say), so none is missed."""
    by_module = defaultdict(set)  # checkpoint module -> the shards holding its tensors
    for raw, shard in tensors.reader.stored.items():
        by_module[raw.rsplit(".", 1)[0]].add(shard)
    now: dict[str, str | None] = {}  # name -> its digest now (None: no longer there)
    for stage, entry in stages.items():
        read = entry.get("read") or {}
        todo = [n for n in read if n not in now and _shards_of(tensors, n, by_module) & shards]
        present = [n for n in todo if n in tensors.shapes()]
        now |= dict.fromkeys(todo)  # None: no longer in the checkpoint
        now |= read_digests(tensors.tensors(present)) if present else {}  # a block's worth
        for name, digest in read.items():
            if name in now and now[name] != digest:
                where = sorted(_shards_of(tensors, name, by_module) & shards)
                return f"{name} (in {', '.join(where)}) is not what {describe(stage)} read"
    return None


def _shards_of(tensors, name: str, by_module: dict[str, set[str]]) -> set[str]:
    if name not in tensors.shapes():  # no longer in the checkpoint at all
        return set(tensors.reader.stored.values())
    raws = tensors.raw_names([name])
    return set().union(*(by_module[raw.rsplit(".", 1)[0]] for raw in raws))


def changed_since(stages: dict[str, dict], read: dict[str, str]) -> str | None:
    """A tensor just read (`read`: name -> digest) that a finished stage read with other
    content, as a message; None if there is none."""
    for stage, entry in stages.items():
        for name, digest in (entry.get("read") or {}).items():
            if name in read and read[name] != digest:
                return f"{name} is not what {describe(stage)} read"
    return None


def describe(stage: str) -> str:
    """A journal stage in words: 'block.2' -> 'block 3'."""
    kind, _, index = stage.partition(".")
    if stage == "run":
        return "the run"
    if stage == "inputs":
        return "block 1's inputs"
    if stage == "spectra.inputs":
        return "the spectra pass's inputs"
    if index.isdigit():
        return f"{'the spectra pass of ' if kind == 'spectra' else ''}block {int(index) + 1}"
    return "the embedding and head shard" if stage == "rest" else stage


def refusal(what: str) -> StreamSVDError:
    return StreamSVDError(
        f"the checkpoint changed since this run began: {what}. Going on would build one model "
        "from two checkpoints, so nothing was changed: restore the checkpoint as it was and "
        "run the same command to resume, or add --restart to compress it as it is now"
    )
