"""What a run reports: seconds by stage (`StageTimer`), the summary compress returns and
the CLI prints, each rank's part of it, and refinement's account of itself."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from .checkpoint import CheckpointReader
from .memory import peak_rss_bytes
from .stats import Rescues

log = logging.getLogger(__name__)


# The work any compressor must do: read the checkpoint, run the blocks, accumulate the
# statistics, factorise, write the output. The other stages (activation I/O, dtype
# conversions) and untimed time (setup, journal, idle) are overhead.
WORK_STAGES = (
    "load",
    "forward",
    "stats",
    "cholesky",
    "svd",
    "update",
    "refine",
    "quantize",
    "write",
)


class StageTimer:
    """Wall seconds per named stage. Stages nest: time inside an inner stage counts for it
    alone, not also for the stage around it, so the stages never add up to more than the
    wall time. With `cuda`, each stage boundary is a CUDA event recorded on the current
    stream, so that kernels count for the stage that queued them; the events are resolved
    (one wait, for the last of them) when `seconds` is read, once per block, never between
    stages, which would stall the copies and kernels queued ahead."""

    def __init__(self, cuda: bool = False):
        self._seconds: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [stage, since] of the stages entered, innermost last
        self._cuda = cuda
        self._pending: list[tuple] = []  # CUDA: (stage, start event, end event) unresolved

    @contextlib.contextmanager
    def __call__(self, stage: str):
        now = self._now()
        if self._open:  # pause the enclosing stage
            self._add(self._open[-1][0], self._open[-1][1], now)
        self._open.append([stage, now])
        try:
            yield
        finally:
            now = self._now()
            self._add(stage, self._open.pop()[1], now)
            if self._open:
                self._open[-1][1] = now

    @property
    def seconds(self) -> dict[str, float]:
        """Stage -> seconds of the stages ended so far (on CUDA: waits for their events)."""
        if self._pending:
            self._pending[-1][2].synchronize()  # the last event: every earlier one is done
            for stage, start, end in self._pending:
                self._seconds[stage] += start.elapsed_time(end) / 1000  # ms
            self._pending.clear()
        return self._seconds

    def _now(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _add(self, stage: str, start, end) -> None:
        if self._cuda:
            self._pending.append((stage, start, end))
        else:
            self._seconds[stage] += end - start


def peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def rank_summary(run) -> dict:
    """What each rank reports of itself to the run's summary."""
    return {"peak_rss_mb": round(peak_rss_mb(), 1),
            "refine_streams": run.refine_keep,  # ranks may keep them in different places
            "stage_seconds": {k: round(v, 2) for k, v in sorted(run.timer.seconds.items())},
            "phase_peaks": run.phase_peaks}  # fmt: skip


def run_summary(run, seconds: float, ranks: dict) -> dict:
    """The run's summary (`run`: a pipeline.Compressor that has assembled its output;
    `ranks`: every linear's), as compress returns it and the CLI prints it."""
    shapes_before = run.tensors.shapes()
    before = sum(math.prod(shape) for shape in shapes_before.values())
    after = sum(math.prod(shape) for shape in CheckpointReader(run.cfg.out).shapes().values())
    linear_before = linear_after = 0
    for name, rank in ranks.items():
        m, n = shapes_before[f"{name}.weight"]
        linear_before += m * n
        linear_after += rank * (m + n)
    in_blocks = {n: s for n, s in shapes_before.items() if n.startswith(run.prefix + ".")}
    factorised = {f"{name}.weight" for name in ranks}
    # what was left as it was, by kind: "layers.*.input_layernorm.weight", ...
    left_dense = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in in_blocks if n not in factorised})
    expert_tokens = {}
    for i in range(len(run.blocks)):
        expert_tokens |= run.journal.entry(f"block.{i}").get("expert_tokens", {})
    summary = {
        "method": run.cfg.method,
        "ratio": run.cfg.ratio,
        "allocation": run.cfg.allocation,
        "sequential": run.cfg.sequential,
        "refine": dataclasses.asdict(run.cfg.refine),
        "refine_streams": run.refine_keep,  # where this run's refinement held them
        "quantization": run.setup.manifest["quantization"],
        "spectra_seconds": round(run.spectra_seconds, 2),  # the allocation's first pass
        "params_before": before,
        "params_after": after,
        "linear_params_before": linear_before,  # block linears' weights, biases excluded
        "linear_params_after": linear_after,
        # the share of the blocks' parameters that became low-rank
        "low_rank_share": round(linear_before / sum(map(math.prod, in_blocks.values())), 4),
        "left_dense": left_dense,
        "size_on_disk_bytes": sum(p.stat().st_size for p in Path(run.cfg.out).iterdir()),
        "out": str(Path(run.cfg.out).resolve()),
        "seconds": round(seconds, 2),  # this session's
        **all_sessions(run, seconds),
        "stage_seconds": {k: round(v, 2) for k, v in sorted(run.timer.seconds.items())},
        "other_seconds": round(max(0.0, seconds - sum(run.timer.seconds.values())), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "dtype": str(run.dtype).removeprefix("torch."),
        "compute_dtype": str(run.compute).removeprefix("torch."),
        "phase_peaks": run.phase_peaks,
        "block_seconds": run.block_seconds,
    }
    refined = [run.journal.entry(f"block.{i}").get("refine") for i in range(len(run.blocks))]
    summary |= refine_summary(refined)
    summary["numerical_rescues"] = rescues_summary(run)
    if expert_tokens:  # calibration tokens the router sent each expert (top-k counted)
        summary["expert_tokens"] = expert_tokens
        summary["experts_without_tokens"] = [e for e, n in expert_tokens.items() if n == 0]
    if run.device.type == "cuda":
        summary["peak_cuda_mb"] = peak_cuda_mb(run)
    return summary


def peak_cuda_mb(run) -> float:
    """The run's device peak. Each phase resets CUDA's peak counter to measure its own, so
    the peak from before the last phase began is kept in `run.device_peak`."""
    peak = max(run.device_peak, torch.cuda.max_memory_allocated(run.device))
    return round(peak / 2**20, 1)


def all_sessions(run, seconds: float) -> dict:
    """The run's time across resumes: this session's `seconds`, plus, for each block an
    earlier session finished, the time that session spent up to it since its previous
    block (journaled with the block). What an interrupted session did after its last
    finished block was lost with it, and is not counted."""
    mine = {b["block"] for b in run.block_seconds}
    earlier = [run.journal.entry(f"block.{i}").get("session") for i in range(len(run.blocks))
               if i not in mine]  # fmt: skip
    earlier = [e for e in earlier if e]  # none in a journal older than this field
    return {"seconds_all_sessions": round(seconds + sum(e["seconds"] for e in earlier), 2),
            "sessions": 1 + len({e["started"] for e in earlier})}  # fmt: skip


def rescues_summary(run) -> dict:
    """The blocks' Cholesky rescues as journaled (so a resumed run counts them all):
    Grams damped by level, dead channels, and each escalation with its full name."""
    entries = []
    for i in range(len(run.blocks)):
        entry = run.journal.entry(f"block.{i}").get("rescues", {})
        escalated = [{**e, "gram": f"{run.prefix}.{i}.{e['gram']}"}
                     for e in entry.get("escalated", [])]  # fmt: skip
        entries.append({**entry, "escalated": escalated})
    return Rescues.total(entries).as_dict()


def refine_losses(refined: dict) -> dict:
    """What a block's refinement journals: its mean training losses, first and last epoch,
    and with a holdout the held-out losses and the epoch kept (0: declined)."""
    losses = {k: v for k, v in refined.items() if k.startswith("loss")}
    if refined.get("heldout_loss"):
        losses |= {k: refined[k] for k in ("heldout_loss", "kept_epoch")}
    return losses


def losses_line(losses: dict) -> str:
    """A block's refinement for its log line ("" without refinement)."""
    if not losses:
        return ""
    line = (f", refinement loss {losses['loss_first_epoch']:.4g} (first epoch) → "
            f"{losses['loss_last_epoch']:.4g} (last)")  # fmt: skip
    return line + (f"; {kept_epoch_line(losses)}" if "heldout_loss" in losses else "")


def kept_epoch_line(refined: dict) -> str:
    """What a block's refinement kept, with a holdout: one line for the log."""
    losses, kept = refined["heldout_loss"], refined["kept_epoch"]
    epochs = len(losses) - 1
    if kept == 0:
        return (f"refinement declined: no epoch beat the closed form on the held-out windows "
                f"(held-out loss {losses[0]:.4g}; best epoch {min(losses[1:]):.4g})")  # fmt: skip
    return (f"refinement kept epoch {kept} of {epochs} (held-out loss {losses[0]:.4g} → "
            f"{losses[kept]:.4g})")  # fmt: skip


def refine_summary(refined: list[dict | None]) -> dict:
    """The summary's account of refinement from the blocks' journal entries: each block's
    mean training loss, first and last epoch, and with a holdout its held-out loss (the
    closed form's and the kept factors') and the epoch kept; how many blocks declined.
    Where most blocks declined, says so once: the calibration text is likely too little
    for refinement to learn from."""
    rows = [{"block": i, "first_epoch": r["loss_first_epoch"], "last_epoch": r["loss_last_epoch"]}
            | ({"heldout_closed_form": r["heldout_loss"][0],
                "heldout_kept": r["heldout_loss"][r["kept_epoch"]],
                "kept_epoch": r["kept_epoch"]} if "heldout_loss" in r else {})
            for i, r in enumerate(refined) if r]  # fmt: skip
    if not rows:
        return {}
    held = [r for r in rows if "kept_epoch" in r]
    if not held:
        return {"refine_losses": rows}
    declined = sum(r["kept_epoch"] == 0 for r in held)
    if 2 * declined > len(held):
        log.warning(
            "refinement was declined on %d of %d blocks: their closed form scored best on the "
            "held-out calibration windows, so refinement could not learn from the rest; more "
            "calibration text (--nsamples) would let it, or --refine-epochs 0 saves its time",
            declined, len(held),
        )  # fmt: skip
    return {"refine_losses": rows, "refine_declined": declined}
