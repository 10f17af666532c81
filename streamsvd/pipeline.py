"""The loop over blocks: load one block, stream calibration through it, factorise its
linears, advance both activation streams, write its shard, record it, free it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import faults
from .activations import keep_text
from .allocate import block_ranks
from .checkpoint import (
    check_finite,
)
from .config import CompressConfig
from .disk import size_text
from .errors import NotEnoughResources, StreamSVDError
from .experts import expert_index
from .factorize import METHODS
from .memory import phase_peak_bytes, reset_peak
from .model import (
    before_blocks,
    block_arguments,
    catch_block_inputs,
    empty,
    factorised_linears,
    fill,
    unfill,
)
from .output import block_tensors
from .prepare import calibration_batches, prepare
from .quantize import DAMP
from .refine import (
    micro_batches,
    piece_sizes,
)
from .report import (
    StageTimer,
    losses_line,
    peak_rss_mb,
    rank_summary,
    refine_losses,
    run_summary,
)
from .rundir import RunDir, shard_file
from .sources import combined_sha256, read_digests
from .spectra import SpectraPass
from .stats import Rescues, escalation_text
from .step import BlockStep
from .world import World

log = logging.getLogger(__name__)

PLAIN = METHODS["svd"]  # for a linear without calibration statistics


class Compressor(SpectraPass):
    """One compress run (or one rank's part of it: world.py). Construct, then call run().

    `planner(cfg, setup, world)` makes the run's plan (plan.plan_started_run; the run does
    not import the estimate), called once, before the first block, when blocks are left:
    the run takes where refinement keeps the streams (--refine-streams auto), the time
    per block it logs, and each phase's planned peak that an out-of-memory error names.
    Without one, there is no estimate, and auto keeps the streams in the store."""

    def __init__(self, cfg: CompressConfig, world: World | None = None, planner=None):
        self.cfg = cfg
        self.planner = planner
        self.world = world = world or World()
        self.timer = StageTimer(cuda=cfg.device.startswith("cuda"))
        self.phase_peaks: dict[str, dict] = {}  # phase -> peak memory over the blocks
        self.device_peak = 0  # bytes: the process's device peak before the last phase began
        self.block_seconds: list[dict] = []  # per block computed here: stage -> seconds
        self.setup = setup = prepare(cfg, world)  # prepare.py: checks, windows, manifest
        self.device, self.compute, self.dtype = setup.device, setup.compute, setup.dtype
        self.model, self.tensors, self.config = setup.model, setup.tensors, setup.config
        self.prefix, self.blocks, self.method = setup.prefix, setup.blocks, setup.method
        self.streams, self.batches, self.windows = cfg.streams, setup.batches, setup.windows
        self.rundir = RunDir(cfg, world, self.timer, setup.manifest, n_blocks=len(self.blocks),
                             batches=setup.batches, hidden=setup.hidden, compute=self.compute,
                             device=self.device, disk=setup.disk)  # fmt: skip
        self.journal, self.store = self.rundir.journal, self.rundir.store
        self.ranks: dict[str, int] | None = None  # the allocation's; None: the uniform rule
        self.spectra_seconds = 0.0  # spent in this process on the allocation's first pass
        self.refine_keep = ""  # where refinement keeps the streams, once the run starts
        self.plan = None  # the planner's, once the run starts

    # -- the run -----------------------------------------------------------------------
    def run(self) -> dict:
        """Compress, resuming where the run directory's journal says; on failure the error
        is kept in the run directory for `streamsvd status`."""
        threads = torch.get_num_threads()
        if self.setup.threads:
            torch.set_num_threads(self.setup.threads)
        try:
            return self._run()
        except OSError as exc:
            error = self.rundir.io_error(exc)
            self.rundir.record_error(str(error))
            raise error from exc
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as errors.Terminated
            self.rundir.record_error(str(exc) or "interrupted (KeyboardInterrupt)")
            raise
        except Exception as exc:
            what = str(exc) if isinstance(exc, StreamSVDError) else f"{type(exc).__name__}: {exc}"
            self.rundir.record_error(what)
            raise
        finally:
            torch.set_num_threads(threads)
            self.rundir.lock.release(remove=not self.cfg.run_dir.exists())  # gone: the run finished

    def _run(self) -> dict:
        start = time.perf_counter()
        # this session, in each block's journal entry: a resumed run's summary adds them up
        self.session = {"started": datetime.now().isoformat(timespec="microseconds"),
                        "last_commit": start}  # fmt: skip
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.cuda.reset_peak_memory_stats()
        n_blocks = len(self.blocks)
        self.rundir.start("run", self.tensors)  # the checkpoint is what finished stages read
        self.ranks = self._allocation()  # first: its pass rewrites what resume_point checks
        first = self.rundir.resume_point()
        if first == n_blocks:
            log.info("resuming: all %d blocks are done", n_blocks)
        elif any(s == "inputs" or s.startswith("block.") for s in self.journal.stages):
            log.info("resuming at block %d/%d", first + 1, n_blocks)
        block_kwargs = self._embedding_stage()
        bar = tqdm(total=n_blocks, initial=first, desc="Compressing", unit="block",
                   disable=None if self.world.writer else True)  # fmt: skip
        if first < n_blocks:
            self._plan_rest(bar, n_blocks - first)
        with torch.inference_mode():
            for i in range(first, n_blocks):
                if not self.journal.done(f"block.{i}"):
                    self._compress_block(i, block_kwargs[i])
                bar.update(1)
        bar.close()
        with self.timer("communicate"):
            self.world.barrier("the last block")
        self.rundir.start("rest", self.tensors)
        if not self.world.writer:  # rank 0 assembles the output; the others wait for it
            with self.timer("communicate"):
                self.world.gather(rank_summary(self))
                self.world.barrier("assembling the output")
            return {"rank": self.world.rank, **rank_summary(self)}
        self._write_rest()
        ranks_summaries = self.world.gather(rank_summary(self))
        source = json.loads((Path(self.cfg.model) / "config.json").read_text())
        base = self.model.get_submodule(self.model.base_model_prefix)
        classes = (type(self.config).__name__, type(self.model).__name__, type(base).__name__)
        ranks = self.rundir.assemble(source, classes)
        summary = run_summary(self, time.perf_counter() - start, ranks)
        if self.world.distributed:
            summary["processes"] = self.world.size
            summary["per_process"] = ranks_summaries
        self.world.barrier("assembling the output")
        return summary

    def _plan_rest(self, bar, left: int) -> None:
        """Plan the blocks left (the planner's plan), and say where refinement keeps the
        streams and how long a block should take."""
        self.plan = self.planner(self.cfg, self.setup, self.world) if self.planner else None
        keep = self.cfg.refine_streams if self.cfg.refine_epochs else ""
        if keep == "auto":
            keep = self.plan.refine_streams if self.plan else "store"
        if keep:
            log.info("refinement keeps each block's streams %s",
                     keep_text(keep, self.device.type == "cuda"))  # fmt: skip
        self.refine_keep = keep
        if self.plan:
            planned = self.plan.seconds_per_block["total"]
            log.info("estimated %.0fs per block, %.0fs for the %d left (device micro-benchmark)",
                     planned, planned * left, left)  # fmt: skip
            bar.set_postfix_str(f"plan {planned:.0f}s/block")

    def _embedding_stage(self, stage: str = "inputs", streams: tuple | None = None) -> list[dict]:
        """Fill what runs before block 0 (every non-block tensor but the LM head: token and
        learned position embeddings, ...), record block 0's inputs for every stream (or
        `streams`) as `stage`, return the keyword arguments each block is called with
        (position embeddings, mask)."""
        streams = self.streams if streams is None else streams
        self.rundir.start(stage, self.tensors)
        before = before_blocks(self.model, self.prefix, list(self.tensors))
        tensors = self.tensors.tensors(before)
        check_finite(tensors, self.setup.reader.path)
        read = self._digests(stage, tensors)
        fill(self.model, tensors, "cpu")
        del tensors
        first = self.blocks[0]
        with torch.inference_mode():
            sizes = {stop - start for start, stop in self._batches()}
            if self.cfg.refine_epochs:  # refinement's steps, and every rank's piece of them
                steps = micro_batches(calibration_batches(self.cfg), self.cfg.refine.batch)
                sizes |= {stop - start for start, stop in steps}
                sizes |= piece_sizes(steps, self.world.size)
            arguments = block_arguments(self.model, self.blocks, sizes, self.cfg.seqlen,
                                        self.device)  # fmt: skip
            if streams and not self.journal.done(stage):
                with self.timer("forward"), self.rundir.writing(self.store.root):
                    digests = {s: hashlib.sha256() for s in streams}
                    for stream in streams:
                        self.store.reset(stream, 0)
                    for start, stop in self._batches():
                        hidden, _ = catch_block_inputs(self.model, first, self.windows[start:stop])
                        for stream in streams:
                            self.rundir.write(stream, 0, start, hidden, digests[stream])
                        faults.point("inputs", 0)
                self.rundir.sync(0, streams)
                acts = {s: d.hexdigest() for s, d in digests.items()}
                self.rundir.commit(stage, {"activations": acts, "read": read},
                                   {"read": combined_sha256(read)})  # fmt: skip
        unfill(self.model, before)
        return arguments

    def _batches(self):
        return self.batches

    def _compress_block(self, i: int, block_kwargs: dict) -> None:
        """Compute block i and commit it: shard written, fsync'd and renamed; both streams'
        next activations complete and fsync'd; only then the journal entry, with checksums
        of both. A crash at any instant leaves the block done or not done."""
        faults.point("between", i)
        t0, stages_before = time.perf_counter(), dict(self.timer.seconds)
        block, prefix, quant = self.blocks[i], f"{self.prefix}.{i}", self.setup.quant
        stages = self.setup.stages[i] if self.cfg.sequential else None
        original, read = self._load_block(i, f"block.{i}")
        linears = factorised_linears(block, self.cfg.ratio)
        step = BlockStep(block, linears, block_kwargs, self._batches(), self.device,
                         self.timer, i, world=self.world,
                         whitening_damping=DAMP if quant else 0.0, rescues=Rescues())  # fmt: skip
        allocated = {n: self.ranks[f"{prefix}.{n}"] for n in linears} if self.ranks else None
        ranks = block_ranks(linears, self.cfg.ratio, quant, allocated)
        digests = {stream: hashlib.sha256() for stream in self.streams}
        if self.streams:
            self._reset_next("orig", i)
        refine = self.cfg.refine
        keep_dense = refine.epochs > 0 and refine.target < 1  # for refinement's target
        factors, tokens = step.compress(self.method, ranks, self.rundir.reader(i),
                                        self.rundir.writer(i, digests) if self.streams else None,
                                        self.dtype, self.compute, self.cfg.sequential, stages,
                                        self._phase, keep_dense)  # fmt: skip
        rescues = self._block_rescues(i, step.rescues)
        refined, quantized = {}, {}
        if refine.epochs:
            with self._phase("refine"):
                refined = step.refine(refine, self.rundir.host_reader(i),
                                      self.rundir.host_reader(i + 1), self.dtype,
                                      self.refine_keep)  # fmt: skip
        if quant:
            with self._phase("quantize"):
                quantized = step.quantize(quant, self.rundir.reader(i), stages, self.dtype)
        tensors = block_tensors(self.model, block, prefix, original, linears, factors,
                                refined.get("trained", []), quantized, self.dtype)  # fmt: skip
        if "comp" in self.streams:
            self._reset_next("comp", i)
            step.advance(self.rundir.reader(i), self.rundir.writer(i, digests))
        losses = refine_losses(refined)
        ranks = {f"{prefix}.{name}": rank for name, rank in ranks.items()}
        info = {"expert_tokens": {f"{prefix}.{expert_index(name)}": count  # routed to each
                                  for name, count in tokens.items() if expert_index(name)},
                **({"refine": losses} if losses else {}),
                **({"rescues": rescues} if rescues else {}), "read": read}  # fmt: skip
        self._commit_block(i, tensors, ranks, digests, info)
        empty(block)
        spent = {k: v - stages_before.get(k, 0.0) for k, v in self.timer.seconds.items()}
        spent = {k: round(v, 2) for k, v in spent.items() if v > 0}
        total = time.perf_counter() - t0
        self.block_seconds.append({"block": i, "total": round(total, 2), **spent})
        log.info("block %d/%d: ranks %s, %.1fs, peak RSS %.0f MB%s", i + 1, len(self.blocks),
                 sorted(set(ranks.values())), total, peak_rss_mb(),
                 losses_line(losses))  # fmt: skip

    def _reset_next(self, stream: str, i: int) -> None:
        """Empty the stream's slot that block i writes (the next block's inputs)."""
        with self.rundir.writing(self.store.root):
            self.store.reset(stream, (i + 1) % 2)

    def _commit_block(self, i: int, tensors: dict, ranks: dict, digests: dict, info: dict):
        """Block i's commit: the streams' next activations durable, its shard written, then
        its journal entry: the shard's checksum, `ranks`, the streams' checksums (`digests`),
        `info` (what it read, ...) and this session's time since its last block."""
        with self.timer("write"):
            self.rundir.sync((i + 1) % 2)  # the writes done: the digests complete
        digests = {stream: digest.hexdigest() for stream, digest in digests.items()}
        shard = self.rundir.save(
            tensors, self.rundir.shards / shard_file(i), lambda: faults.point("shard-write", i)
        )  # rank 0 records its sha256 and stat
        faults.point("before-journal", i)
        same = {"read": combined_sha256(info["read"])}  # every rank read, and wrote, the same
        now = time.perf_counter()  # the session's time since its last block: setup included
        session = {"started": self.session["started"],
                   "seconds": round(now - self.session["last_commit"], 2)}  # fmt: skip
        self.session["last_commit"] = now
        if self.world.distributed:
            same["written"] = combined_sha256(read_digests(tensors))
        self.rundir.commit(f"block.{i}", {**shard, "ranks": ranks, "activations": digests,
                                          **info, "session": session}, same)  # fmt: skip
        faults.point("journaled", i)

    def _block_rescues(self, i: int, mine: Rescues) -> dict:
        """Block i's Cholesky rescues (stats.damped_cholesky_), every rank's together (each
        factorised its share of the linears), for its journal entry; damping past the
        routine level is a warning naming the layers."""
        rescues = Rescues.total(self.world.gather(mine.as_dict()))
        if rescues.escalated and self.world.writer:
            first = rescues.escalated[0]
            first = {**first, "gram": f"{self.prefix}.{i}.{first['gram']}"}  # the full name
            more = len(rescues.escalated) - 1
            log.warning("block %d/%d: %s%s; the calibration cannot support these statistics, "
                        "and this block's factors may be far off: give more calibration "
                        "tokens (--nsamples, --seqlen)", i + 1, len(self.blocks),
                        escalation_text(first),
                        f" (and {more} more Gram{'s' * (more > 1)})" if more else "")  # fmt: skip
        return rescues.as_dict() if rescues else {}

    @contextlib.contextmanager
    def _phase(self, phase: str):
        """Record the phase's peak host (and device) memory, and turn a CUDA out-of-memory
        error into a message naming the phase and what the plan says it needs."""
        reset_peak()
        if self.device.type == "cuda":  # the run's peak so far is kept before it is reset
            self.device_peak = max(self.device_peak, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
            peaks = self.phase_peaks.setdefault(phase, {})
            peaks["host_mb"] = max(peaks.get("host_mb", 0), round(phase_peak_bytes() / 2**20))
            if self.device.type == "cuda":
                device = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
                peaks["device_mb"] = max(peaks.get("device_mb", 0), device)
        except torch.OutOfMemoryError as exc:
            need = self.plan.device_phases.get(phase) if self.plan else None
            raise NotEnoughResources(
                f"{self.device} ran out of memory in the {phase} phase "
                + (f"(the plan puts its peak at {size_text(need)}) " if need else "")
                + "; lower --batch-size, free the GPU of other processes, or run on a device "
                "with more memory; finished blocks are kept, so the same command resumes"
            ) from exc

    def _load_block(self, i: int, stage: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Fill block i from the checkpoint for `stage` and start reading the next block's
        tensors into the page cache. Returns the tensors (full names) and what was read
        (name -> SHA-256, for the journal: sources.py)."""
        self.rundir.start(stage, self.tensors)
        block_prefix = f"{self.prefix}.{i}"
        with self.timer("load"):
            names = self.tensors.under(block_prefix)
            original = self.tensors.tensors(names)
            check_finite(original, self.setup.reader.path)  # reads every page in, too
            read = self._digests(stage, original)
            fill(self.blocks[i], {n[len(block_prefix) + 1 :]: t for n, t in original.items()},
                 self.device)  # fmt: skip
        if self.cfg.prefetch and i + 1 < len(self.blocks):
            names = self.tensors.under(f"{self.prefix}.{i + 1}")
            threading.Thread(target=self.tensors.prefetch, args=(names,), daemon=True).start()
        return original, read

    def _digests(self, stage: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
        """SHA-256 of each checkpoint tensor `stage` has read, refused if a finished stage
        read it with other content; none without a journal (nothing to resume)."""
        if not self.rundir.durable:
            return {}
        read = read_digests(tensors)
        self.rundir.check_read(stage, read)
        return read

    def _write_rest(self) -> None:
        """Embedding, final norm, LM head: copied through unchanged in a shard of their own."""
        if self.journal.done("rest"):
            return
        names = [n for n in self.tensors if not n.startswith(self.prefix + ".")]
        shard = self.rundir.shards / shard_file(None)
        tensors = self.tensors.tensors(names)
        read = self._digests("rest", tensors)  # not changed since block 1's inputs were made
        saved = self.rundir.save(tensors, shard, lambda: faults.point("rest"))
        self.rundir.record("rest", {**saved, "read": read})
