"""Hidden states between blocks, on disk in zarr, for two streams.

`orig` holds what the uncompressed model computes, `comp` what the compressed blocks so
far compute. Each stream has two slots used in turn: block i reads slot i % 2 and writes
slot (i + 1) % 2, so disk holds two boundaries per stream whatever the depth. Chunks are
one sample each; readers take micro-batches. bfloat16 is stored as an int16 view (zarr has
no bfloat16), as accelerate's offload does. Knows nothing about blocks or models.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from .checkpoint import fsync_path


class ActivationStore:
    """Writes go behind the compute: `write` makes the micro-batch's host copy (on a GPU
    an asynchronous copy into pinned memory) and hands it to a background writer thread,
    which waits for the copy, feeds the stream's digest and stores it, at most
    `WRITES_IN_FLIGHT` micro-batches behind. A read, reset or `sync` of a slot first waits
    for the slot's writes, and a read or `sync` raises the error of one that failed.
    durable=True: each chunk written is also fsync'd by a second background thread, and
    `sync` waits for those and makes the slot's directory durable."""

    WRITES_IN_FLIGHT = 2  # host copies waiting for the writer: the plan counts them

    def __init__(self, root: Path, nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype,
                 durable: bool = False):  # fmt: skip
        self.root = Path(root)
        self.shape = (nsamples, seqlen, hidden)
        self.dtype = dtype
        self._stored = torch.int16 if dtype == torch.bfloat16 else dtype
        self._group = zarr.open_group(str(self.root), mode="a")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._in_flight: deque[Future] = deque()  # writes not yet known done, oldest first
        self._writes: dict[str, list[Future]] = defaultdict(list)  # each slot's writes
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="fsync") if durable else None
        self._pending: dict[str, list[Future]] = defaultdict(list)  # each slot's fsyncs

    def _array(self, stream: str, slot: int, create: bool = False):
        name = f"{stream}{slot}"
        if create:
            return self._group.create_array(
                name,
                shape=self.shape,
                chunks=(1, *self.shape[1:]),
                dtype=np.dtype(str(self._stored).removeprefix("torch.")),
                compressors=None,
                # chunk files side by side (c.0.0.0, not c/0/0/0): one directory to fsync
                chunk_key_encoding={"name": "default", "separator": "."},
                overwrite=True,
            )
        return self._group[name]

    def _chunk(self, stream: str, slot: int, sample: int) -> Path:
        return self.root / f"{stream}{slot}" / f"c.{sample}.0.0"

    def reset(self, stream: str, slot: int) -> None:
        """Start a slot afresh before writing it whole."""
        key = f"{stream}{slot}"
        for future in self._writes.pop(key, []):  # first: a write queues its fsync
            future.exception()  # wait; its files are about to go anyway
        for future in self._pending.pop(key, []):
            future.exception()
        self._array(stream, slot, create=True)

    def read(self, stream: str, slot: int, start: int, stop: int) -> torch.Tensor:
        self.flush(stream, slot)
        data = torch.from_numpy(np.ascontiguousarray(self._array(stream, slot)[start:stop]))
        return data.view(self.dtype) if self.dtype == torch.bfloat16 else data

    def write(self, stream: str, slot: int, start: int, values: torch.Tensor,
              digest=None) -> None:  # fmt: skip
        """Store a micro-batch behind the compute; with `digest`, feed it the bytes stored
        (as `checksum` reads them), from the same host copy: one device-to-host copy a
        write. `values` may be changed or freed once this returns; `digest` is complete
        once the slot is flushed (`flush`, `sync`)."""
        while len(self._in_flight) >= self.WRITES_IN_FLIGHT:
            self._in_flight.popleft().exception()  # wait; an error raises at its slot's read
        values = values.detach()
        if values.device.type == "cuda":  # copied while the device goes on computing
            host = torch.empty(values.shape, dtype=self.dtype, pin_memory=True)
            host.copy_(values.to(self.dtype), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:  # a copy of its own: the caller may reuse `values`
            host, copied = values.to("cpu", self.dtype, copy=True), None
        future = self._writer.submit(self._store, stream, slot, start, host, copied, digest)
        self._in_flight.append(future)
        self._writes[f"{stream}{slot}"].append(future)

    def _store(self, stream: str, slot: int, start: int, host: torch.Tensor, copied,
               digest) -> None:  # fmt: skip
        """The writer thread's part of `write`, one micro-batch at a time, in order."""
        if copied is not None:
            copied.synchronize()
        if digest is not None:
            tensor_digest(digest, host, self.dtype)
        stored = host.view(torch.int16) if self.dtype == torch.bfloat16 else host
        self._array(stream, slot)[start : start + stored.shape[0]] = stored.numpy()
        if self._syncer is not None:
            chunks = [self._chunk(stream, slot, k) for k in range(start, start + len(host))]
            self._pending[f"{stream}{slot}"].append(self._syncer.submit(_fsync_files, chunks))

    def flush(self, stream: str, slot: int) -> None:
        """Wait for a slot's writes in flight; raises the error of one that failed."""
        for future in self._writes.pop(f"{stream}{slot}", []):
            future.result()

    def sync(self, stream: str, slot: int) -> None:
        """Make a slot durable: its writes done, its chunk and metadata files fsync'd, then
        its directory (zarr renames each chunk into place but never fsyncs). Raises the
        OSError of a background write or fsync that failed."""
        self.flush(stream, slot)
        top = self.root / f"{stream}{slot}"
        pending = self._pending.pop(f"{stream}{slot}", None)
        if pending is None:  # nothing synced in the background: every chunk now
            _fsync_files(sorted(top.glob("c.*")))
        for future in pending or []:
            future.result()
        _fsync_files([top / "zarr.json"])
        fsync_path(top)
        fsync_path(self.root)

    def matches(self, stream: str, slot: int, digest: str) -> bool:
        """Whether a slot on disk holds exactly what was recorded. A chunk that is missing,
        truncated or unreadable in any way counts as not matching."""
        try:
            return self.checksum(stream, slot) == digest
        except Exception:  # zarr raises many kinds for damaged chunks; all mean "redo it"
            return False

    def checksum(self, stream: str, slot: int, batch: int = 8) -> str:
        """SHA-256 of a slot's contents, read back from disk sample by sample."""
        digest = hashlib.sha256()
        for start in range(0, self.shape[0], batch):
            stop = min(start + batch, self.shape[0])
            digest.update(self.read(stream, slot, start, stop).view(-1).view(torch.uint8).numpy())
        return digest.hexdigest()


HELD = ("device", "host")  # where a block's windows can be held whole
KEEP = ("auto", *HELD, "store")  # "auto": where the memory plan says (plan.refine_keep)


def keep_text(keep: str, cuda: bool) -> str:
    """Where a block's held windows are, for the log and --dry-run."""
    return {
        "device": "held on the device, each read from the store once",
        "host": f"held in {'pinned ' * cuda}host memory, each read from the store once",
        "store": "read from the store on every epoch, a step ahead of the compute",
    }[keep]


class HeldWindows:
    """A block's windows of some streams, for a pass that reads them over and over
    (refinement's epochs), read from the store at most once each where they fit.

    keep "device" or "host": every window of every stream is read up front and held, on
    the device or in host memory (pinned on a GPU, copied over each time it is asked for);
    keep "store": each is read when asked, by a background thread one step ahead of the
    compute (`expect` tells it which windows come next). `reads` give a stream's windows
    on the host (pinned on a GPU) without timing themselves, as the background thread
    calls them; the waits for them are timed here, as "activations"."""

    def __init__(self, reads: dict[str, Callable[[int, int], torch.Tensor]],
                 windows: list[tuple[int, int]], keep: str, device: torch.device,
                 clock: Callable = lambda stage: contextlib.nullcontext()):  # fmt: skip
        if keep not in KEEP[1:]:
            raise ValueError(f"keep must be one of {KEEP[1:]}, got {keep!r}")
        self.reads, self.keep, self.device, self.clock = reads, keep, device, clock
        self.held: dict[tuple[str, int, int], torch.Tensor] = {}
        self._ahead: deque[tuple[str, int, int]] = deque()  # expected, not yet submitted
        self._pending: dict[tuple[str, int, int], Future] = {}
        self._reader = None
        if keep == "store":
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
            return
        # held tensors are used by autograd later: not inference tensors
        with clock("activations"), torch.inference_mode(False):
            for name, read in reads.items():
                for start, stop in windows:
                    batch = read(start, stop)
                    if keep == "device":
                        batch = batch.to(device, non_blocking=True)
                    self.held[name, start, stop] = batch

    def __call__(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Windows start:stop of stream `name` on the device, a tensor of their own (a
        block may write its input in place)."""
        key = (name, start, stop)
        if self.keep != "store":
            batch = self.held[key]
            if self.keep == "device" or self.device.type == "cpu":
                return batch.clone()
            return batch.to(self.device, non_blocking=True)
        future = self._pending.pop(key, None)
        with self.clock("activations"):
            batch = future.result() if future is not None else self.reads[name](start, stop)
        self._read_ahead()
        return batch.to(self.device, non_blocking=True)

    def expect(self, keys: list[tuple[str, int, int]]) -> None:
        """The windows the coming pass asks for, (stream, start, stop) in order: read ahead
        where they are not held. What an earlier pass left unasked is dropped."""
        if self._reader is None:
            return
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._ahead = deque(keys)
        self._read_ahead()

    def _read_ahead(self) -> None:
        """Keep one step ahead: a window of each stream in flight."""
        while self._ahead and len(self._pending) < len(self.reads):
            key = self._ahead.popleft()
            if key not in self._pending:
                self._pending[key] = self._reader.submit(self.reads[key[0]], *key[1:])

    def close(self) -> None:
        """Drop what is held and stop reading ahead (waiting for a read in flight)."""
        self.held.clear()
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()

    def __enter__(self) -> HeldWindows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_files(paths: list[Path]) -> None:
    for path in paths:
        fsync_path(path)


def tensor_digest(digest, values: torch.Tensor, dtype: torch.dtype):
    """Feed what `write` stores into a running hash, in the same byte form `checksum` reads
    (no copy of a contiguous host tensor already in `dtype`)."""
    digest.update(values.detach().to("cpu", dtype).contiguous().view(-1).view(torch.uint8).numpy())
    return digest


def finish_zarr_io(timeout: float = 60.0) -> None:
    """Wait for the work zarr's I/O thread has in flight. An interrupt stops the main thread
    where it waits on a read or write, but zarr's event loop goes on with it; at exit zarr
    gives that thread 0.2 s, then warns "Thread did not finish cleanly" and raises
    RuntimeError closing the loop. Called on the way out of an interrupted command."""
    from zarr.core import sync as zarr_sync

    loop = zarr_sync.loop[0]
    if loop is None or loop.is_closed():
        return

    async def the_others() -> None:
        mine = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not mine]
        await asyncio.gather(*others, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(the_others(), loop).result(timeout)
    except concurrent.futures.TimeoutError:
        pass  # zarr's own exit then warns, as it would have
