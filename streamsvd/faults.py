"""Fault injection for the resume tests: die, or fail a write, at a named point of a run.

    STREAMSVD_FAULT=<point>[:<block>][:<action>]

`svd:2` SIGKILLs the process during block 2's factorisation; `shard-write:1:enospc` raises
OSError(ENOSPC) while block 1's output shard is written. Blocks count from 0; a point
outside the blocks (`rest`, `finish`) takes no block. Actions: `kill` (SIGKILL, the
default: no handler, no cleanup, as when the OOM killer or a scheduler ends a job),
`enospc` (disk full), `eio` (I/O error) and `pause` (create the file named by
STREAMSVD_FAULT_MARKER, then wait until it is deleted: holds a run still for a test of what
happens beside it). Unset, a check is one dictionary lookup. In a distributed run,
STREAMSVD_FAULT_RANK=<rank> fails that rank alone.

Points of the spectra pass (rank allocation's first pass), in the order a block meets them:
  spectra-between   before block i is loaded for its spectra
  activations       as below: block i's outputs on the original stream half written
  spectra-write     block i's spectra file under its temporary name, not renamed yet

Points of the compression pass, in the order a block meets them:
  inputs            block 0's input activations half written (before any block)
  between           before block i is loaded: block i-1 is done and journaled
  activations       block i's outputs on the original stream (i+1's inputs) half written
  svd               block i's linears half factorised
  refine            block i's refinement after its first epoch (with --refine-epochs)
  quantize          block i's first factor pair quantized, the rest not (with --bits)
  comp-activations  block i's outputs on the compressed stream half written
  shard-write       block i's shard written under its temporary name, not renamed yet
  before-journal    block i's shard and activations complete, the journal not updated
  journaled         right after the journal records block i
  rest              the embedding/head shard written under its temporary name
  finish            the output directory half assembled
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from .errors import StreamSVDError

ENV = "STREAMSVD_FAULT"
POINTS = (
    "spectra-between",
    "spectra-write",
    "inputs",
    "between",
    "activations",
    "svd",
    "refine",
    "quantize",
    "comp-activations",
    "shard-write",
    "before-journal",
    "journaled",
    "rest",
    "finish",
)
ACTIONS = ("kill", "enospc", "eio", "pause")


def parse(spec: str) -> tuple[str, int | None, str]:
    """'svd:2:kill' -> ('svd', 2, 'kill'); block and action are optional."""
    name, *rest = spec.split(":")
    block, action = None, "kill"
    for part in rest:
        if part.isdigit():
            block = int(part)
        elif part in ACTIONS:
            action = part
        else:
            raise StreamSVDError(f"{ENV}={spec!r}: {part!r} is neither a block nor {ACTIONS}")
    if name not in POINTS:
        raise StreamSVDError(f"{ENV}={spec!r}: unknown point {name!r}; choose from {POINTS}")
    return name, block, action


def point(name: str, block: int | None = None) -> None:
    """Fail here if STREAMSVD_FAULT names this point (and block)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, want_block, action = parse(spec)
    if want != name or (want_block is not None and want_block != block):
        return
    only = os.environ.get(ENV + "_RANK")  # in a distributed run: fail this rank alone
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "pause":
        marker = Path(os.environ[ENV + "_MARKER"])
        marker.touch()
        while marker.exists():
            time.sleep(0.05)
        return
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected by {ENV}={spec})")
