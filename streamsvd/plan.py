"""What a compress run will need, worked out before it starts: ranks, parameters, output
size, activation disk, peak host and device memory, and whether this machine has them.

Peak memory is the largest of the run's phases, each a sum of what is alive in it:

    fixed      the interpreter and libraries, the calibration text and windows, measured
               in a subprocess that does only that (`measure_baseline`)
    block      one block's weights (the safetensors pages it touches)
    stats      float64 Grams of every input group of the block (n² each: G, G', C)
    forward    one micro-batch through the block, and its float64 copy for the Grams
    factorise  one linear at a time: W in float64 plus the method's temporaries
    compressed the block's factors so far, in the checkpoint dtype
    rest       embedding, final norm and head, read whole to be copied through

The coefficients of the method temporaries (multiples of m·n, n² and min(m, n)² float64
values) were measured with `torch.linalg` on CPU; `tests/test_scale.py` checks the whole
estimate against real runs, and `benchmarks/memory.py` reports both side by side.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointReader
from .errors import StreamSVDError
from .factorize import METHODS, RSVD_OVERSAMPLE, rank_for
from .journal import disk_used
from .model import (
    before_blocks,
    build_skeleton,
    capture_inputs,
    catch_block_inputs,
    fill,
    find_blocks,
    linear_layers,
    load_config,
    run_block,
    shared_input_groups,
    to_device,
)

F64 = 8
CGROUP = Path("/sys/fs/cgroup")
# Temporaries of one factorisation, in float64 values (measured on CPU, see module doc).
SVD_MN, SVD_K2 = 3.0, 3.0  # torch.linalg.svd of m×n: LAPACK copy, U, Vh, workspace
CHOLESKY_N2 = 5.0  # damped_cholesky: clone, symmetrised copy, identity, factor
RSVD_MQ = 2.5  # randomized_svd: the (m + n)·q bases and products, then an SVD of q×n
WRITE_BUFFER = 32 << 20  # writing a shard: the tensors are written from where they are,
# then read back in 16 MiB chunks for the checksum


@dataclass(frozen=True)
class LinearPlan:
    name: str  # relative to its block, e.g. "mlp.down_proj"
    shape: tuple[int, int]  # (out_features, in_features)
    rank: int


@dataclass
class Plan:
    model: str
    method: str
    ratio: float
    device: str
    dtype: str
    blocks: int
    linears: list[LinearPlan]  # one block's; every block has the same
    input_groups: list[list[str]]  # linears reading the same input share statistics
    params_before: int
    params_after: int
    linear_params_before: int
    linear_params_after: int
    checkpoint_bytes: int
    output_bytes: int
    streams: tuple[str, ...]
    activation_bytes_per_stream: int  # two slots (block i's inputs, block i+1's)
    disk_bytes: dict[str, int]  # what the run writes, by kind
    fixed_bytes: dict[str, int]  # measured: "peak" of setup, "after" setup
    host_phases: dict[str, int]  # peak host memory of each phase, fixed part included
    device_phases: dict[str, int]  # CUDA runs only: peak device memory of each phase
    checks: list[dict] = field(default_factory=list)  # {what, need, have, ok}

    @property
    def host_peak_bytes(self) -> int:
        return max(self.host_phases.values())

    @property
    def device_peak_bytes(self) -> int | None:
        return max(self.device_phases.values()) if self.device_phases else None

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["host_peak_bytes"] = self.host_peak_bytes
        out["device_peak_bytes"] = self.device_peak_bytes
        return out


def svd_temp(m: int, n: int) -> float:
    return SVD_MN * m * n + SVD_K2 * min(m, n) ** 2


def factorize_temp(method: str, m: int, n: int, rank: int) -> float:
    """float64 values alive at the peak of one factorisation of an m×n W, W excluded."""
    mn, n2 = m * n, n * n
    if method == "svd":
        return svd_temp(m, n)
    if method == "rsvd":
        q = min(rank + RSVD_OVERSAMPLE, m, n)
        return RSVD_MQ * (m + n) * q + svd_temp(q, n)
    cholesky = CHOLESKY_N2 * n2
    whitened = n2 + mn + svd_temp(m, n)  # L, W·L, its SVD
    if method in ("svdllm-w", "svdllm-u"):
        return max(cholesky, whitened)
    if method == "svdllm-a":  # K and the target stay alive through the whitened SVD
        return max(n2 + cholesky, 3 * n2 + 3 * mn, 2 * n2 + 2 * mn + whitened)
    raise StreamSVDError(f"no memory model for method {method!r}")


def input_groups(model, block) -> list[list[str]]:
    """Which of a block's linears read the very same tensor, found by running the block on
    `meta` (no memory, any width): only the embedding rows it looks up are ever touched."""
    prefix, blocks = find_blocks(model)
    params = dict(model.named_parameters())
    fakes = {  # untouched empty tensors: no RSS
        name: torch.empty(params[name].shape, dtype=params[name].dtype)
        for name in before_blocks(model, prefix, list(params))
    }
    fill(model, fakes, "cpu")
    hidden, kwargs = catch_block_inputs(model, blocks[0], torch.zeros(1, 4, dtype=torch.long))
    names = list(linear_layers(block))
    with torch.inference_mode(), capture_inputs(block, names) as seen:
        run_block(block, hidden.to("meta"), to_device(kwargs, "meta"))
    return shared_input_groups(seen)


_PROBE = """
import json, sys
import psutil, torch
args = json.loads(sys.argv[1])
import streamsvd.pipeline
from streamsvd.memory import peak_rss_bytes, return_freed_memory
return_freed_memory()  # as the CLI does
from streamsvd.calib import calibration_windows, load_text, tokenize
from streamsvd.model import build_skeleton, load_config
from streamsvd.checkpoint import CheckpointReader
build_skeleton(load_config(args["model"]), CheckpointReader(args["model"]).dtype())
if args["calibrate"]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args["model"])
    ids = tokenize(tok, load_text(args["calib"])[0])
    windows = calibration_windows(ids, args["nsamples"], args["seqlen"], args["seed"])
if args["device"].startswith("cuda"):
    torch.zeros(1, device=args["device"])
peak = peak_rss_bytes()
print(json.dumps({"peak": peak, "after": psutil.Process().memory_info().rss}))
"""


def measure_baseline(cfg) -> dict[str, int]:
    """Host bytes a run holds before its first block: a fresh interpreter that imports
    streamsvd, builds the skeleton and loads the calibration text and windows as compress
    does (and opens the CUDA context on a GPU run). `peak` is its high-water mark, `after`
    what stays resident."""
    args = {
        "model": str(cfg.model),
        "calib": cfg.calib,
        "calibrate": bool(METHODS[cfg.method].needs),
        "nsamples": cfg.nsamples,
        "seqlen": cfg.seqlen,
        "seed": cfg.seed,
        "device": cfg.device,
    }
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise StreamSVDError(f"could not measure the run's fixed memory: {tail[0]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_plan(cfg, fixed: dict[str, int] | None = None) -> Plan:
    """The plan of compress run `cfg` (a CompressConfig). `fixed`: the setup's memory as
    `measure_baseline` returns it, measured when not given."""
    from .pipeline import streams_for

    reader = CheckpointReader(cfg.model)
    config = load_config(cfg.model)
    dtype = reader.dtype()
    item = dtype.itemsize
    model = build_skeleton(config, dtype)
    prefix, blocks = find_blocks(model)
    method = METHODS[cfg.method]
    shapes = {name: tuple(shape) for name, shape in reader.shapes().items()}
    text = config.get_text_config()

    linears = []
    for name, layer in linear_layers(blocks[0]).items():
        m, n = layer.out_features, layer.in_features
        linears.append(LinearPlan(name, (m, n), rank_for(m, n, cfg.ratio)))
    groups = input_groups(model, blocks[0]) if method.needs else []

    # parameters and bytes
    before = sum(math.prod(s) for s in shapes.values())
    linear_before = len(blocks) * sum(math.prod(lp.shape) for lp in linears)
    linear_after = len(blocks) * sum(lp.rank * sum(lp.shape) for lp in linears)
    after = before - linear_before + linear_after
    block_bytes = sum(math.prod(shapes[n]) for n in shapes if _in_block(n, prefix, 0)) * item
    block_after = block_bytes - sum(
        (math.prod(lp.shape) - lp.rank * sum(lp.shape)) * item for lp in linears
    )
    rest_bytes = sum(math.prod(s) for n, s in shapes.items() if not n.startswith(prefix + "."))
    rest_bytes *= item
    streams = streams_for(method)
    per_stream = 2 * cfg.nsamples * cfg.seqlen * text.hidden_size * item
    disk = disk_bytes(cfg, reader, prefix, blocks, text.hidden_size, len(streams))
    output_bytes = before * item + side_file_bytes(cfg.model) if cfg.dense else disk["output"]

    # memory
    if fixed is None:
        fixed = measure_baseline(cfg)
    base = fixed["after"]
    stats = sum(len(_stat_sums(method.needs)) * linear_in(linears, g[0]) ** 2 for g in groups)
    stats *= F64
    tokens = min(cfg.batch_size, cfg.nsamples) * cfg.seqlen
    wide = max(lp.shape[1] for lp in linears)
    n_streams_run = 2 if method.needs & {"comp", "cross"} else 1
    forward = tokens * (8 * text.hidden_size + 5 * getattr(text, "intermediate_size", wide)) * item
    forward += (tokens * wide * F64 * n_streams_run) if method.needs else 0
    on_gpu = cfg.device.startswith("cuda")
    if on_gpu:  # attention scores, where the kernel materialises them (masked SDPA)
        batch = min(cfg.batch_size, cfg.nsamples)
        forward += 2 * batch * text.num_attention_heads * cfg.seqlen**2 * item
    factor = max(
        (lp.shape[0] * lp.shape[1] + factorize_temp(cfg.method, *lp.shape, lp.rank)) * F64
        + (prev.rank * sum(prev.shape) * F64 if prev else 0)
        for prev, lp in zip([None, *linears[:-1]], linears, strict=True)
    )
    host = {"setup": fixed["peak"]}
    device = {}
    if on_gpu:
        host["block"] = base + block_bytes + block_after + WRITE_BUFFER
        host["rest"] = base + rest_bytes + WRITE_BUFFER
        device["statistics"] = block_bytes + stats + forward
        device["factorise"] = block_bytes + block_after + stats + factor
    else:
        host["statistics"] = base + block_bytes + stats + forward
        host["factorise"] = base + block_bytes + block_after + stats + factor
        host["write"] = base + block_bytes + block_after + stats + WRITE_BUFFER
        host["rest"] = base + rest_bytes + WRITE_BUFFER
    plan = Plan(
        model=str(cfg.model),
        method=cfg.method,
        ratio=cfg.ratio,
        device=cfg.device,
        dtype=str(dtype).removeprefix("torch."),
        blocks=len(blocks),
        linears=linears,
        input_groups=groups,
        params_before=before,
        params_after=after,
        linear_params_before=linear_before,
        linear_params_after=linear_after,
        checkpoint_bytes=before * item,
        output_bytes=output_bytes,
        streams=streams,
        activation_bytes_per_stream=per_stream,
        disk_bytes=disk,
        fixed_bytes=dict(fixed),
        host_phases={k: int(v) for k, v in host.items()},
        device_phases={k: int(v) for k, v in device.items()},
    )
    plan.checks = _checks(plan, cfg)
    return plan


def linear_in(linears: list[LinearPlan], name: str) -> int:
    return next(lp.shape[1] for lp in linears if lp.name == name)


def _in_block(name: str, prefix: str, i: int) -> bool:
    return name.startswith(f"{prefix}.{i}.")


def _stat_sums(needs: frozenset[str]) -> list[str]:
    return [s for s in ("orig", "comp", "cross") if s in needs]


def host_memory_available() -> tuple[int, str]:
    """Bytes this process may still use, and where the limit comes from: the tighter of
    available RAM and the memory limit of its cgroup (or of a cgroup above it)."""
    import psutil

    have, source = psutil.virtual_memory().available, "available RAM"
    for limit, usage in _cgroup_limits():
        if limit - usage < have:
            have, source = limit - usage, "cgroup memory limit"
    return have, source


def _cgroup_limits() -> list[tuple[int, int]]:
    """(limit, usage) in bytes of every memory cgroup from this process's up to the root
    that sets a limit; cgroup v1 and v2."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            root, files = CGROUP / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        elif controllers == "":
            root, files = CGROUP, ("memory.max", "memory.current")
        else:
            continue
        folder = root / path.lstrip("/")
        while folder.is_relative_to(root):
            try:
                limit = (folder / files[0]).read_text().strip()
                usage = int((folder / files[1]).read_text())
            except (OSError, ValueError):
                limit = ""
            if limit.isdigit() and int(limit) < 1 << 60:
                out.append((int(limit), usage))
            if folder == root:
                break
            folder = folder.parent
    return out


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
    low_rank = {
        f"{prefix}.{i}.{name}.weight"
        for i, block in enumerate(blocks)
        for name in linear_layers(block)
    }
    shards = dense = 0
    for name, shape in reader.shapes().items():
        dense += math.prod(shape) * item
        if name in low_rank:
            m, n = shape
            shards += rank_for(m, n, cfg.ratio) * (m + n) * item
        else:
            shards += math.prod(shape) * item
    per_chunk = cfg.seqlen * hidden * item + 4096
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


def existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (to ask about its filesystem)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _checks(plan: Plan, cfg) -> list[dict]:
    have, source = host_memory_available()
    checks = [{"what": f"host memory ({source})", "need": plan.host_peak_bytes, "have": have}]
    if plan.device_phases:
        free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
        checks.append(
            {"what": "device memory (free)", "need": plan.device_peak_bytes, "have": free}
        )
    for where, need, what in disk_needs(cfg, plan.disk_bytes):
        checks.append(
            {"what": f"disk for the {what} files at {where}", "need": need,
             "have": shutil.disk_usage(where).free}
        )  # fmt: skip
    for check in checks:
        check["ok"] = check["need"] <= check["have"]
    return checks


def size_text(n: float) -> str:
    """Bytes for people: 512 B, 4.0 KiB, 1,234.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_plan(plan: Plan) -> str:
    lines = [
        f"plan: {plan.method} at ratio {plan.ratio} on {plan.device}, {plan.blocks} "
        f"block{'s' * (plan.blocks != 1)} of {len(plan.linears)} linears, {plan.dtype}",
        "  ranks (every block):",
    ]
    for lp in plan.linears:
        m, n = lp.shape
        lines.append(f"    {lp.name:<24} {m:>6} × {n:<6} -> rank {lp.rank}")
    pct = lambda a, b: f"{a / b:.1%}"  # noqa: E731
    lines += [
        f"  parameters    {plan.params_before:,} -> {plan.params_after:,} "
        f"({pct(plan.params_after, plan.params_before)})",
        f"  linear params {plan.linear_params_before:,} -> {plan.linear_params_after:,} "
        f"({pct(plan.linear_params_after, plan.linear_params_before)})",
        f"  checkpoint    {size_text(plan.checkpoint_bytes)} -> "
        f"output {size_text(plan.output_bytes)}",
        f"  activations   {size_text(plan.activation_bytes_per_stream)} per stream × "
        f"{len(plan.streams)} ({', '.join(plan.streams) or 'none: no calibration'})",
        "  peak host     "
        + size_text(plan.host_peak_bytes)
        + "  ("
        + ", ".join(f"{k} {size_text(v)}" for k, v in plan.host_phases.items())
        + ")",
    ]
    if plan.device_phases:
        lines.append(
            "  peak device   "
            + size_text(plan.device_peak_bytes)
            + "  ("
            + ", ".join(f"{k} {size_text(v)}" for k, v in plan.device_phases.items())
            + ")"
        )
    for c in plan.checks:
        mark = "ok" if c["ok"] else "NOT ENOUGH"
        lines.append(
            f"  {c['what']}: need {size_text(c['need'])}, have {size_text(c['have'])}: {mark}"
        )
    return "\n".join(lines)
