"""The ranks of a run on torch.distributed, and everything the pipeline asks of them.

Launched by `torchrun` or `accelerate launch` (both set RANK, WORLD_SIZE, MASTER_ADDR...),
a compress run splits its work this way:
- calibration: each rank streams a contiguous share of the micro-batches through the
  block (both streams), into its own activation store;
- statistics: each rank's float64 sums are added up across ranks, up to the order of the
  float64 additions as a single process would: into the one rank that factorises every
  linear of the group (reduce; the others free theirs), or into every rank where several
  do (all_reduce);
- factorisations: a block stage's linears are dealt out in turn, each rank factorises its
  own and broadcasts the factors as written, so every rank runs the same compressed block;
- refinement: data-parallel over each step's windows: the rank that holds them broadcasts
  them, each trains on its piece, gradients are averaged before each step, so N ranks take
  the steps one process takes;
- files: rank 0 alone writes shards, the journal and the output; every block ends at a
  barrier, so a block is journaled only once every rank's activations for the next one
  are durable, and no rank overwrites a block's inputs before it is journaled.

Without those variables, `World()` is one process and every method is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from .errors import StreamSVDError

DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits for the others (a 70B block factorises in minutes)


class RankFailure(StreamSVDError):
    """Another rank failed, or did not answer in time."""


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    timeout: float = DEFAULT_TIMEOUT
    _barrier_group: object = None  # a gloo group for monitored barriers (NCCL has none)

    @classmethod
    def from_env(cls, device: str, timeout: float = DEFAULT_TIMEOUT) -> World:
        """Join the process group torchrun / accelerate launch describe in the environment
        (gloo on CPU, NCCL on CUDA); one process when WORLD_SIZE is unset or 1."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(timeout=timeout)
        import torch.distributed as dist

        world = cls(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", "1")), timeout)  # fmt: skip
        cuda = device.startswith("cuda")
        if not dist.is_initialized():
            wait = datetime.timedelta(seconds=timeout)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=wait)
            world._barrier_group = dist.new_group(backend="gloo", timeout=wait) if cuda else None
        return world

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes the files (shards, journal, output)."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """This rank's device: its own GPU (LOCAL_RANK) when the run is on CUDA."""
        if self.distributed and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def share(self, batches: list) -> list:
        """This rank's contiguous share of the micro-batches (sizes differ by at most one)."""
        per, extra = divmod(len(batches), self.size)
        start = self.rank * per + min(self.rank, extra)
        return batches[start : start + per + (self.rank < extra)]

    def owner(self, k: int) -> int:
        """The rank that factorises the k-th linear of a stage."""
        return k % self.size

    # -- collectives (no-ops in one process) ----------------------------------------------
    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Add each tensor up across ranks, in place (every rank gets the same bytes)."""
        for t in tensors if self.distributed else []:
            self._in_place(t, lambda x: self._call("adding statistics", _dist().all_reduce, x))

    def reduce_(self, tensors: list[torch.Tensor], dst: int) -> None:
        """Add each tensor up across ranks into rank `dst`'s, in place; the others' are left
        undefined (they free them)."""
        for t in tensors if self.distributed else []:
            self._in_place(t, lambda x: self._call(f"adding statistics (to rank {dst})",
                                                   _dist().reduce, x, dst))  # fmt: skip

    def broadcast_(self, tensor: torch.Tensor, src: int, what: str = "factors") -> None:
        """Rank `src`'s tensor, in place, on every rank."""
        if self.distributed:
            what = f"exchanging {what} (rank {src} sending)"
            self._in_place(tensor, lambda x: self._call(what, _dist().broadcast, x, src))

    def _in_place(self, tensor: torch.Tensor, collective) -> None:
        """NCCL takes GPU tensors only: a host tensor goes through this rank's GPU."""
        if tensor.device.type == "cpu" and _dist().get_backend() == "nccl":
            moved = tensor.to(f"cuda:{self.local_rank}")
            collective(moved)
            tensor.copy_(moved)
        else:
            collective(tensor)

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out = [None] * self.size
        self._call("exchanging checksums", _dist().all_gather_object, out, value)
        return out

    def agree(self, value, src: int = 0, what: str = "agreeing on the resume point"):
        """Rank `src`'s `value` (picklable) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        self._call(what, _dist().broadcast_object_list, box, src)
        return box[0]

    def check_same(self, values: dict, what: str) -> None:
        """Stop every rank, naming the first rank and the item that differ, unless `values`
        (name -> a picklable value) is the same on every rank: work that differs between
        ranks must never be added up or written as one model."""
        if not self.distributed:
            return
        every = self.gather(values)
        for rank, theirs in enumerate(every):
            differ = sorted(k for k in set(every[0]) | set(theirs)
                            if every[0].get(k) != theirs.get(k))  # fmt: skip
            if differ:
                shown = {k: (every[0].get(k), theirs.get(k)) for k in differ}
                raise RankFailure(
                    f"rank {rank} of {self.size} differs from rank 0 {what}, in "
                    + "; ".join(
                        f"{k} (rank 0: {a!r}, rank {rank}: {b!r})" for k, (a, b) in shown.items()
                    )  # fmt: skip
                    + ". Going on would mix their work into one model, so every rank stops "
                    "here. Every rank must see the same run directory and checkpoint (one "
                    "shared filesystem, or identical copies); then run the same command again"
                )

    def barrier(self, what: str) -> None:
        """Wait for every rank. On gloo a monitored barrier: after the timeout rank 0 names
        the ranks that never arrived."""
        if not self.distributed:
            return
        dist = _dist()
        group = self._barrier_group
        if group is None and dist.get_backend() != "gloo":
            return self._call(what, dist.barrier)
        wait = datetime.timedelta(seconds=self.timeout)
        self._call(what, dist.monitored_barrier, group=group, timeout=wait)

    def close(self) -> None:
        if self.distributed and _dist().is_initialized():
            _dist().destroy_process_group()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:  # torch.distributed's DistError is a RuntimeError
            raise RankFailure(
                f"rank {self.rank} of {self.size}, at {what}: {str(exc).strip()}. Another rank "
                f"died or hung (see its log and torchrun's report); the others stop after "
                f"--dist-timeout ({self.timeout:.0f}s). Finished blocks are journaled: "
                "relaunch the same command with the same number of processes to resume"
            ) from exc


def _dist():
    import torch.distributed as dist

    return dist
