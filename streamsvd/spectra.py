"""The spectra pass, for allocations other than uniform: the original checkpoint streamed
once before the compression pass, keeping each linear's whitened spectrum and its block's
residual-stream energy, from which `allocate` spreads the ratio's budget. Journaled and
resumable as the compression pass is; a part of `pipeline.Compressor`, whose run directory,
journal, store and ranks it uses."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import faults
from .allocate import Matrix, allocate
from .model import empty, factorised_linears
from .modeling import linear_shape
from .sources import combined_sha256, read_digests
from .step import BlockStep

log = logging.getLogger("streamsvd.pipeline")  # its lines read as the run's, as before


class SpectraPass:
    """The spectra pass's part of `pipeline.Compressor`."""

    def _allocation(self) -> dict[str, int] | None:
        """Rank of every block linear (full names) by the configured allocation, from the
        spectra pass; None for uniform, which needs no pass.

        The allocation is journaled ("allocation") once the spectra pass is complete, and
        a resume takes the recorded one without running the pass again. Called before
        `resume_point`, and no stage of the compression pass is recorded before it: so the
        spectra pass, which writes the original stream's slots the compression pass reads,
        runs only while the compression pass has recorded nothing, and never rewrites stored
        inputs that `resume_point` verified."""
        if self.cfg.allocation == "uniform":
            return None
        if self.journal.done("allocation"):
            return self.journal.entry("allocation")["ranks"]
        compressing = [s for s in self.journal.stages if s == "inputs" or s.startswith("block.")]
        if compressing:  # no allocation they were made with is recorded: make them anew
            self.journal.forget_from(compressing)
        start = time.perf_counter()
        self._spectra_pass()
        self.spectra_seconds = time.perf_counter() - start
        matrices = []
        for i, block in enumerate(self.blocks):
            entry = self.journal.entry(f"spectra.{i}")
            sigma2 = load_file(self._spectra_file(i))
            for name, linear in factorised_linears(block, self.cfg.ratio).items():
                matrices.append(Matrix(f"{self.prefix}.{i}.{name}", linear_shape(linear),
                                       sigma2[name], entry["energy"]))  # fmt: skip
        ranks = allocate(matrices, self.cfg.ratio, self.cfg.allocation)
        self.rundir.commit("allocation", {"ranks": ranks}, {"ranks": combined_sha256(ranks)})
        return self.journal.entry("allocation")["ranks"]  # rank 0's

    def _spectra_file(self, i: int) -> Path:
        return self.cfg.run_dir / "spectra" / f"block-{i:05d}.safetensors"

    def _spectra_pass(self) -> None:
        """Stream the original checkpoint once, keeping only each linear's whitened spectrum
        (kilobytes a block) and its block's residual-stream energy. Journaled like the
        compression pass: killed, it resumes at the first block not recorded, or from
        block 0 when the original stream's stored inputs of that block are gone."""
        n_blocks = len(self.blocks)
        done = 0
        while (done < n_blocks and self.journal.done(f"spectra.{done}")
               and self.rundir.file_ok(self._spectra_file(done),
                                       self.journal.entry(f"spectra.{done}"))):  # fmt: skip
            done += 1
        done = self.world.agree(done)  # rank 0's files
        if done == n_blocks:
            return
        self.journal.forget_from([f"spectra.{i}" for i in range(done, n_blocks)])
        entry = "spectra.inputs" if done == 0 else f"spectra.{done - 1}"
        inputs_ok = self.journal.done(entry) and self.store.matches(
            "orig", done % 2, self.rundir.mine(self.journal.entry(entry)["activations"]["orig"])
        )
        if not all(self.world.gather(inputs_ok)):
            self.journal.forget_from(["spectra.inputs"] + [f"spectra.{i}" for i in range(done)])
            done = 0
        log.info("spectra pass for the %s allocation: block %d/%d", self.cfg.allocation,
                 done + 1, n_blocks)  # fmt: skip
        arguments = self._embedding_stage("spectra.inputs", ("orig",))
        self._spectra_file(0).parent.mkdir(exist_ok=True)
        bar = tqdm(total=n_blocks, initial=done, desc="Spectra", unit="block", disable=None)
        with torch.inference_mode():
            for i in range(done, n_blocks):
                self._spectra_block(i, arguments[i])
                bar.update(1)
        bar.close()

    def _spectra_block(self, i: int, block_kwargs: dict) -> None:
        """Block i's spectra, committed as a block of the compression pass is: file
        written, the next inputs durable, then the journal entry."""
        faults.point("spectra-between", i)
        block = self.blocks[i]
        _, weights = self._load_block(i, f"spectra.{i}")
        step = BlockStep(block, factorised_linears(block, self.cfg.ratio), block_kwargs,
                         self._batches(), self.device, self.timer, i, world=self.world)  # fmt: skip
        digests = {"orig": hashlib.sha256()}
        energy = torch.zeros((), dtype=torch.float64, device=self.device)
        read = self.rundir.reader(i)

        def read_measuring(stream: str, start: int, stop: int) -> torch.Tensor:
            x = read(stream, start, stop)
            energy.add_(torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)
            return x

        with self.rundir.writing(self.store.root):
            self.store.reset("orig", (i + 1) % 2)
        with self._phase("spectra"):
            sigma2, _ = step.spectra(read_measuring, self.rundir.writer(i, digests))
        self.world.sum_([energy])
        with self.timer("write"):
            self.rundir.sync((i + 1) % 2, ("orig",))
        shard = self.rundir.save(sigma2, self._spectra_file(i),
                                 lambda: faults.point("spectra-write", i))  # fmt: skip
        info = {"energy": float(energy), "activations": {"orig": digests["orig"].hexdigest()}}
        same = {"read": combined_sha256(weights)}
        if self.world.distributed:
            same["written"] = combined_sha256(read_digests(sigma2))
        self.rundir.commit(f"spectra.{i}", {**shard, **info, "read": weights}, same)
        empty(block)
