"""What a compress run writes to disk and whether there is room for it: bytes by kind
(activations, output shards, dense export), the filesystems they go to, sizes for people.
The run checks the disk with these before its first block (prepare.py) and names them when
a write fails (rundir.py); the plan (plan.py) shows them."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .allocate import block_ranks
from .journal import disk_used
from .model import compute_dtype, factorised_linears
from .modeling import linear_shape
from .quantize import block_settings, factor_bytes


def size_text(n: float) -> str:
    """Bytes for people: 512 B, 4.0 KiB, 1,234.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (to ask about its filesystem)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def side_file_bytes(model: str | os.PathLike) -> int:
    """Bytes of the files copied beside the shards (config, tokenizer, ...)."""
    return sum(
        p.stat().st_size
        for p in Path(model).iterdir()
        if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".pt", ".gguf"))
    )


def disk_bytes(cfg, reader, prefix: str, blocks, hidden: int, n_streams: int) -> dict[str, int]:
    """Bytes a compress run writes, by kind: "activations" (two slots per stream, each
    sample's chunk plus a file-system block of rounding), "output" (the shards: block
    linears as factors at their ranks, every other tensor as is, and the side files) and
    "dense export" when asked for. The plan shows it; the run checks the disk with it."""
    item = reader.dtype().itemsize
    quant = block_settings(cfg, blocks)
    low_rank = {}  # weight name -> (shape, rank)
    for i, block in enumerate(blocks):
        linears = factorised_linears(block, cfg.ratio)
        for name, rank in block_ranks(linears, cfg.ratio, quant).items():
            low_rank[f"{prefix}.{i}.{name}.weight"] = (linear_shape(linears[name]), rank)
    shards = dense = 0
    for name, shape in reader.shapes().items():
        dense += math.prod(shape) * item
        if name in low_rank:
            (m, n), rank = low_rank[name]
            shards += factor_bytes(m, n, rank, item, quant)
        else:
            shards += math.prod(shape) * item
    per_chunk = (
        cfg.seqlen * hidden * compute_dtype(cfg.compute_dtype, reader.dtype(), cfg.device).itemsize
    )
    per_chunk += 4096
    return {
        "activations": n_streams * 2 * cfg.nsamples * per_chunk,
        "output": shards + side_file_bytes(cfg.model),
        "dense export": dense if cfg.dense else 0,
    }


def disk_needs(cfg, disk: dict[str, int]) -> list[tuple[Path, int, str]]:
    """(a directory on each filesystem the run writes to, bytes still to write there, what
    they are), from `disk_bytes`. What a run directory being resumed already holds counts
    as written. Output shards are hard links when the output is on the run directory's
    filesystem, copies otherwise."""
    run_dir = Path(cfg.run_dir)
    runs_on, outs_on = existing(run_dir), existing(Path(cfg.out).parent)
    used = disk_used(run_dir) if run_dir.exists() and not cfg.restart else 0
    run_bytes = max(0, disk["activations"] + disk["output"] - used)
    if os.stat(outs_on).st_dev == os.stat(runs_on).st_dev:
        return [(runs_on, run_bytes + disk["dense export"], "run and output")]
    return [(runs_on, run_bytes, "run"), (outs_on, disk["output"] + disk["dense export"], "output")]
