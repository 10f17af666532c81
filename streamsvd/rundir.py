"""The run directory and its commit protocol: the journal, the activation store, the
shards, and how a stage becomes done.

A stage (block 0's inputs, a block, a block's spectra, the embedding shard) is committed in
one order: its files written under temporary names, renamed and fsync'd; every stream's next
activations complete and fsync'd; then the journal entry, with checksums of both. A crash at
any instant leaves the stage done or not done, and `resume_point` finds which. In a
distributed run (world.py) every rank's activations are durable before rank 0 records the
stage, and no rank goes on until it has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import weakref
from pathlib import Path

import torch

from . import __version__, faults
from .activations import ActivationStore
from .checkpoint import (
    atomic_write_bytes,
    copy_side_files,
    file_sha256,
    fsync_path,
    save_shard,
    shard_name,
    shard_shapes,
    write_index,
)
from .disk import disk_needs, existing, size_text
from .errors import NotEnoughResources, RunIOError, StreamSVDError
from .journal import JOURNAL, Journal, RunLock, record_error
from .lowrank import export_dense, self_describing
from .modeling import SECTION
from .quantize import QuantSettings
from .sources import changed_read, changed_since, describe, file_stat, refusal, shard_stats
from .world import World

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"  # the journal stage holding each rank's shard stats (sources.py)


class RunDir:
    """One run's directory (cfg.run_dir), as one rank sees it: rank 0 holds the lock and
    writes the journal and shards; every rank keeps its own share of the activations.
    `batches` are this rank's micro-batches, `timer` the run's StageTimer."""

    def __init__(self, cfg, world: World, timer, manifest: dict, *, n_blocks: int,
                 batches: list[tuple[int, int]], hidden: int, compute: torch.dtype,
                 device: torch.device, disk: dict[str, int]):  # fmt: skip
        self.cfg, self.world, self.timer = cfg, world, timer
        self.n_blocks = n_blocks
        self.streams = cfg.streams
        self.durable = cfg.journal
        self.compute, self.device, self.disk = compute, device, disk
        self.lock = RunLock(cfg.run_dir).acquire() if world.writer else RunLock(cfg.run_dir)
        weakref.finalize(self, self.lock.release)
        try:
            self.journal = Journal(cfg.run_dir, manifest, restart=cfg.restart,
                                   durable=self.durable, writer=world.writer)  # fmt: skip
        except BaseException:
            self.lock.release()
            raise
        world.barrier("opening the run directory")  # rank 0 may have just (re)made it
        if world.distributed:  # rank 0's journal decides for every rank
            settings = {k: v for k, v in manifest.items() if k != "cpu_threads"}  # a rank's own
            world.check_same({"settings": settings}, "in the run's settings")
            self.journal.stages = world.agree(self.journal.stages, what="reading the journal")
        self.shards = cfg.run_dir / "shards"
        self.shards.mkdir(exist_ok=True)
        self.store = None
        if self.streams:  # each rank stores its own windows: its share of the micro-batches
            where = "activations" + (f"-rank{world.rank}" if world.distributed else "")
            self.offset = batches[0][0]  # this rank's first window
            self.store = ActivationStore(cfg.run_dir / where, batches[-1][1] - self.offset,
                                         cfg.seqlen, hidden, compute, self.durable)  # fmt: skip

    # -- resuming ----------------------------------------------------------------------
    def resume_point(self) -> int:
        """First block to compute. Every file the journal vouches for is checked against its
        checksum; a stage whose files differ is forgotten and recomputed, and files the
        journal does not vouch for (half-written shards, shards of blocks not recorded)
        are deleted, never used. With activation streams, a block whose inputs are gone
        means rebuilding the streams from block 0."""
        n_blocks = self.n_blocks
        bad = rest_bad = None
        if self.world.writer:  # the files are rank 0's; the others take its word
            bad = [
                i
                for i in range(n_blocks)
                if self.journal.done(f"block.{i}") and not self.shard_ok(f"block.{i}", i)
            ]
            rest_bad = self.journal.done("rest") and not self.shard_ok("rest", None)
        bad, rest_bad = self.world.agree((bad, rest_bad))  # fmt: skip
        if bad:
            if self.streams:  # their inputs are gone: rebuild the streams from block 0
                log.warning("shard of block(s) %s is missing or corrupt: starting over from "
                            "block 1", [i + 1 for i in bad])  # fmt: skip
                self.forget_blocks(range(n_blocks))
            else:  # blocks are independent: redo only the bad ones
                log.warning("shard of block(s) %s is missing or corrupt: recomputing",
                            [i + 1 for i in bad])  # fmt: skip
                self.forget_blocks(bad)
        if rest_bad:
            log.warning("shard of the embedding and head is missing or corrupt: recomputing")
            self.journal.forget_from(["rest"])
        done = 0
        while done < n_blocks and self.journal.done(f"block.{done}"):
            done += 1
        if self.streams and done < n_blocks and self.journal.done("inputs"):
            entry = self.journal.entry(f"block.{done - 1}" if done else "inputs")
            lost = [
                s
                for s in self.streams
                if not self.store.matches(s, done % 2, self.mine(entry["activations"][s]))
            ]
            if lost:
                log.warning("stored %s activations (inputs of block %d) are missing or corrupt",
                            "/".join(lost), done + 1)  # fmt: skip
            if not all(self.world.gather(not lost)):  # any rank's: start over, all together
                log.warning("starting over from block 1")
                self.forget_blocks(range(n_blocks))
                done = 0
        if self.world.writer:
            self._discard_unvouched()
        return done

    def mine(self, recorded):
        """This rank's checksum of a stream, as the journal recorded it: one for a single
        process, one per rank otherwise."""
        return recorded[self.world.rank] if isinstance(recorded, list) else recorded

    def shard_ok(self, stage: str, block: int | None) -> bool:
        return self.file_ok(self.shards / shard_file(block), self.journal.entry(stage))

    def file_ok(self, path: Path, entry: dict) -> bool:
        """Whether a file the journal vouches for (`entry`: what `save` returned) is as it
        was written: by its stat where that was recorded and is unchanged, else by hashing
        it whole."""
        if not path.exists():
            return False
        if entry.get("stat") is not None and file_stat(path) == entry["stat"]:
            return True
        return file_sha256(path) == entry["sha256"]

    def forget_blocks(self, blocks) -> None:
        stages = [f"block.{i}" for i in blocks] + (["inputs"] if self.streams else [])
        self.journal.forget_from(stages)

    def _discard_unvouched(self) -> None:
        keep = {shard_file(i) for i in range(self.n_blocks) if self.journal.done(f"block.{i}")}
        if self.journal.done("rest"):
            keep.add(shard_file(None))
        for path in sorted(self.shards.iterdir()):
            if path.name not in keep:
                log.info("discarding %s: the journal does not vouch for it", path)
                path.unlink()

    # -- the checkpoint, as the finished stages read it (sources.py) --------------------------
    def start(self, stage: str, tensors) -> None:
        """Before `stage` reads the checkpoint (`tensors`, the run's ModelTensors), on every
        rank at once: every rank is at the same stage with the same journal (else all stop,
        before any sum mixes two blocks), and the checkpoint is still what the finished
        stages read (else refused, naming what changed). The first call of a run records
        each rank's shard stats; a stat that changed with the content the same is recorded
        anew."""
        changed, problem, now = [], None, None
        if self.durable:
            now = shard_stats(tensors.reader)
            if self.journal.done(CHECKPOINT):
                known = self.mine(self.journal.entry(CHECKPOINT)["stats"])
                changed = sorted(s for s in set(now) | set(known) if now.get(s) != known.get(s))
                if changed:
                    with self.timer("load"):
                        problem = changed_read(tensors, self.journal.stages, set(changed))
        if self.world.distributed:
            with self.timer("communicate"):
                self.world.check_same({"stage": stage, "journal": self.journal_digest()},
                                      f"before {describe(stage)}")  # fmt: skip
                every = self.world.gather((problem, changed, now))
        else:
            every = [(problem, changed, now)]
        for rank, (problem, _, _) in enumerate(every):
            if problem:
                raise refusal(problem + (f" (on rank {rank})" if self.world.distributed else ""))
        if self.durable and (not self.journal.done(CHECKPOINT) or any(c for _, c, _ in every)):
            if self.journal.done(CHECKPOINT):
                log.info("the checkpoint's files %s changed on disk, but what the finished "
                         "stages read from them is the same: going on",
                         sorted({s for _, c, _ in every for s in c}))  # fmt: skip
            self.record(CHECKPOINT, {"stats": [n for _, _, n in every]})

    def check_read(self, stage: str, read: dict[str, str]) -> None:
        """Refuse tensors `stage` has just read (name -> digest) that a finished stage read
        with other content: e.g. an embedding changed since block 1's inputs were computed."""
        what = changed_since(self.journal.stages, read)
        if what is not None:
            raise refusal(f"{what}, and {describe(stage)} has just read it changed")

    def journal_digest(self) -> str:
        """SHA-256 of the journal's stages, as this rank holds them."""
        return hashlib.sha256(json.dumps(self.journal.stages, sort_keys=True).encode()).hexdigest()

    # -- committing ------------------------------------------------------------------------
    def commit(self, stage: str, info: dict, same: dict | None = None) -> None:
        """Record a stage once every rank's part of it is durable. Each rank's activation
        checksums are gathered into the entry (one per rank); rank 0's entry (it wrote the
        shard) is every rank's, once every rank is shown to have committed the same stage
        over the same journal, with the same `same` (name -> value: what the ranks must agree
        on, e.g. the digest of the factors written). Returns after the journal holds it on
        every rank, so that no rank overwrites the stage's inputs before it is recorded."""
        if self.world.distributed:
            with self.timer("communicate"):
                agreed = {"stage": stage, "journal": self.journal_digest(), **(same or {})}
                self.world.check_same(agreed, f"committing {describe(stage)}")
                acts = info.get("activations")
                if acts is not None:
                    every = self.world.gather(acts)
                    info["activations"] = {s: [a[s] for a in every] for s in acts}
                self.world.barrier(f"committing {stage}")
                info = self.world.agree(info)
        self.record(stage, info)
        with self.timer("communicate"):
            self.world.barrier(f"recording {stage}")

    def record(self, stage: str, info: dict) -> None:
        """The journal entry alone (rank 0's stages no other rank takes part in)."""
        with self.writing(self.journal.workdir / JOURNAL):
            self.journal.record(stage, info)

    def save(self, tensors: dict[str, torch.Tensor], path: Path, fault) -> dict:
        """Write a shard (rank 0 alone): temporary name, fsync, rename. Returns what the
        stage's journal entry records of it: its SHA-256 (None on the other ranks) and the
        stat that `file_ok` checks on resume. `fault` runs before the rename."""
        if not self.world.writer:
            return {"sha256": None}
        with self.timer("write"), self.writing(path):
            sha = save_shard(tensors, path, self.durable, fault)
            return {"sha256": sha, "stat": _settled_stat(path) if sha else None}

    def sync(self, slot: int, streams: tuple | None = None) -> None:
        """Make the streams' activations in `slot` durable before a stage is recorded."""
        streams = self.streams if streams is None else streams
        if self.durable and streams:
            with self.writing(self.store.root), self.timer("activations"):
                for stream in streams:
                    self.store.sync(stream, slot)

    # -- activations ---------------------------------------------------------------------
    def reader(self, i: int):
        """Block i's input batches: stream slot i % 2."""

        def read(stream: str, start: int, stop: int) -> torch.Tensor:
            with self.writing(self.store.root):
                return self.read(stream, i % 2, start, stop)

        return read

    def writer(self, i: int, digests: dict):
        """Block i's output batches into slot (i + 1) % 2, fed to each stream's checksum."""

        def write(stream: str, start: int, values: torch.Tensor) -> None:
            with self.writing(self.store.root):
                self.write(stream, (i + 1) % 2, start, values, digests[stream])
                faults.point("activations" if stream == "orig" else "comp-activations", i)

        return write

    def host_reader(self, i: int):
        """Block i's input batches as `reader`'s, but left on the host (pinned on a GPU)
        and untimed: for a reader that holds them or reads ahead on a thread of its own
        (activations.HeldWindows), which times its waits itself."""

        def read(stream: str, start: int, stop: int) -> torch.Tensor:
            with self.writing(self.store.root):
                return self.host_batch(stream, i % 2, start, stop)

        return read

    def host_batch(self, stream: str, slot: int, start: int, stop: int) -> torch.Tensor:
        """A micro-batch of a stream on the host, pinned on a GPU (windows numbered as in
        the whole run)."""
        batch = self.store.read(stream, slot, start - self.offset, stop - self.offset)
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def read(self, stream: str, slot: int, start: int, stop: int) -> torch.Tensor:
        """A micro-batch of a stream on the device (windows numbered as in the whole run).
        The one host-to-device copy of the run's activations: on a GPU from pinned memory,
        asynchronously (the caching host allocator keeps the pinned buffer alive until the
        copy is done)."""
        with self.timer("activations"):
            batch = self.host_batch(stream, slot, start, stop)
            if self.device.type == "cuda":
                return batch.to(self.device, non_blocking=True)
            return batch

    def write(self, stream: str, slot: int, start: int, values, digest) -> None:
        """Store a micro-batch of a stream and feed it to the stream's checksum."""
        with self.timer("activations"):
            self.store.write(stream, slot, start - self.offset, values,
                             digest if self.durable else None)  # fmt: skip

    # -- the output ------------------------------------------------------------------------
    def assemble(self, config: dict, classes: tuple[str, str, str]) -> dict[str, int]:
        """Assemble the output beside its final name, marked incomplete in its config.json
        until every shard and the index are in, then rename it into place: an output
        directory that exists is a finished one. With --dense the factors are assembled in
        the run directory and exported from there. Rerun after a crash, this starts over.
        `config`: the checkpoint's config.json; classes: its config, model and base model
        class names.
        Returns every linear's rank."""
        cfg, out = self.cfg, Path(self.cfg.out)
        partial = out.with_name(out.name + ".partial")
        staging = cfg.run_dir / "assembled" if cfg.dense else partial
        ranks = {}
        for i in range(self.n_blocks):
            ranks.update(self.journal.entry(f"block.{i}")["ranks"])
        config.pop("quantization_config", None)  # an input's own: read dequantized
        quantization = self.journal.manifest.get("quantization")
        if quantization:  # compressed-tensors' description, which transformers and vLLM read
            config["quantization_config"] = QuantSettings(**quantization).config()
        config[SECTION] = {
            "version": __version__,
            "method": cfg.method,
            "ratio": cfg.ratio,
            "allocation": cfg.allocation,
            "sequential": cfg.sequential,
            "refine": dataclasses.asdict(cfg.refine),
            "calibration": self.journal.manifest["calibration"],
            "ranks": ranks,
            "quantization": self.journal.manifest.get("quantization"),
            "complete": False,  # whoever loads this directory now is told it is incomplete
        }
        with self.writing(staging):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            atomic_write_bytes(staging / "config.json", json.dumps(config, indent=2).encode())
            files = [shard_file(None)] + [shard_file(i) for i in range(self.n_blocks)]
            weight_map = {}
            for k, file in enumerate(files):
                target = shard_name(k + 1, len(files))
                _link_or_copy(self.shards / file, staging / target)
                weight_map.update({n: target for n in shard_shapes(staging / target)})
                faults.point("finish")
            write_index(staging, weight_map)
            copy_side_files(Path(cfg.model), staging)
            config = self_describing(config, staging, *classes)
            config[SECTION]["complete"] = True
            atomic_write_bytes(staging / "config.json", json.dumps(config, indent=2).encode())
            if cfg.dense:
                with self.timer("write"):
                    export_dense(staging, out)
            else:
                os.replace(staging, out)
            fsync_path(out.parent)
        shutil.rmtree(cfg.run_dir)
        return ranks

    # -- errors ----------------------------------------------------------------------------
    def record_error(self, message: str) -> None:
        """For `streamsvd status`: rank 0's error (another rank's failure reaches rank 0 as
        one naming it)."""
        if self.world.writer:
            record_error(self.cfg.run_dir, message)

    def io_error(self, exc: OSError) -> StreamSVDError:
        """A clear message for a failed read or write, naming the path (and the space
        needed when the disk is full)."""
        path = exc.filename or "an unknown path"
        kept = "Nothing unfinished was recorded as done and finished blocks are kept"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = existing(Path(path) if exc.filename else self.cfg.run_dir)
            need = sum(
                n
                for d, n, _ in disk_needs(self.cfg, self.disk)
                if os.stat(d).st_dev == os.stat(where).st_dev
            )
            free = shutil.disk_usage(where).free
            inodes = " (so it may be out of inodes: see df -i)" if free > need else ""
            return NotEnoughResources(
                f"no space left on device writing {path}: the run still needs about "
                f"{size_text(need)} on that filesystem and {size_text(free)} is free{inodes}. "
                f"{kept}: free some space and run the same command again to resume"
            )
        return RunIOError(
            f"I/O error on {path}: {exc.strerror or exc}. {kept}: fix the cause and run the "
            "same command again to resume"
        )

    @contextlib.contextmanager
    def writing(self, path: Path):
        """Name `path` in an OSError raised inside that names no file itself (a failed
        write() or fsync() does not)."""
        try:
            yield
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(path)
            raise


def shard_file(block: int | None) -> str:
    """A block's shard in the run directory; None: the embedding/head shard."""
    return "rest.safetensors" if block is None else f"block-{block:05d}.safetensors"


def _settled_stat(path: Path, wait: float = 0.1) -> list[int] | None:
    """`path`'s stat once its filesystem's clock (probed on its folder) has moved past its
    ctime, so that any later change to the file changes the stat: a change within the same
    tick could leave every field as it was (git's "racily clean" files). None where the
    clock does not move on within `wait` seconds (whole-second timestamps): the file is
    then hashed on resume."""
    stat, folder = file_stat(path), path.parent
    deadline = time.monotonic() + wait
    while True:
        os.utime(folder)  # the folder's times to the filesystem's "now"
        if os.stat(folder).st_ctime_ns > stat[2]:
            return stat
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no space, already durable), or a durable copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        fsync_path(dst)
