"""What a compress run will need, worked out before it starts: ranks, parameters, output
size, activation disk, peak host and device memory, and whether this machine has them.

Peak memory is the largest of the run's phases, each a sum of what is alive in it:

    fixed      the interpreter and libraries, the calibration text and windows, measured
               in a subprocess that does only that (`measure_baseline`)
    timing     the speed micro-benchmark the run times itself with before its first block,
               measured in the same subprocess (a few float64 matrices of 1024²)
    block      one block's weights (the safetensors pages it touches)
    sums       float64 statistics of every input group (`stats.sum_shapes`: the run
               allocates from the same description); a group's are freed after its last
               linear (`stats.release_points`), and on a GPU the groups not being
               factorised are parked in host memory
    forward    one micro-batch through the block, both streams' captured inputs, and the
               float64 token chunks the sums are accumulated from
    writes     the host copies of output micro-batches waiting for the store's writer
               thread (`ActivationStore.WRITES_IN_FLIGHT`; pinned, on a GPU)
    factorise  one linear at a time: the method's temporaries (`factorize.workspace`)
    compressed the block's factors so far, in the checkpoint dtype
    refine     with block refinement: the factors in float32 with their gradients and
               AdamW's two moments (`refine.trainable_bytes`; with --refine-holdout a
               copy of the best factors seen), and one micro-batch's
               float32 activations kept for the backward pass
    quantize   with --bits: the compressed stream's float64 Grams of one stage's input
               groups, and GPTQ's working set for the worst linear (`quantize_workspace`)
    rest       embedding, final norm and head, read whole to be copied through

The coefficients of the method temporaries were measured with `torch.linalg` on CPU;
`tests/test_scale.py` checks the whole estimate against real runs, and
`benchmarks/scale.py` reports both side by side at 7B-70B widths. Time per block comes from
`speed.py`: flop counts of the block's work over rates measured on the device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .activations import ActivationStore, keep_text
from .allocate import block_ranks
from .checkpoint import CheckpointReader
from .disk import disk_bytes, disk_needs, existing, side_file_bytes, size_text
from .errors import StreamSVDError
from .factorize import METHODS
from .model import (
    build_skeleton,
    check_supported,
    compute_dtype,
    factorised_linears,
    find_blocks,
    input_groups,
    load_config,
    sequential_stages,
)
from .modeling import linear_shape
from .names import ModelTensors
from .preflight import check_locations, check_shapes
from .prepare import check_calibration_size
from .quantize import QuantSettings, block_settings
from .refine import saved_values_per_token, step_windows, trainable_bytes
from .speed import bench_device_bytes, block_seconds, measure_speed, measure_store
from .stats import CHUNK_VALUES, cross_as_product, release_points, sums_bytes

F64 = 8
CGROUP = Path("/sys/fs/cgroup")
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
    fixed_bytes: dict[str, int]  # measured: "peak" of setup, "after" setup, "after_timing"
    host_phases: dict[str, int]  # peak host memory of each phase, fixed part included
    device_phases: dict[str, int]  # CUDA runs only: peak device memory of each phase
    seconds_per_block: dict[str, float] | None = None  # by stage; None: device not here
    allocation: str = "uniform"
    sequential: bool = False
    spectra_seconds_per_block: float | None = None  # the allocation's first pass, if any
    timing_note: str = ""  # where the time estimate comes from, or why there is none
    checks: list[dict] = field(default_factory=list)  # {what, need, have, ok}
    processes: int = 1  # torch.distributed: memory and time are each process's
    refine_streams: str = ""  # where refinement keeps a block's streams (refine_keep)

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


def linear_plans(block, ratio: float, quant: QuantSettings | None = None) -> list[LinearPlan]:
    """A block's linears with their shapes and the ranks `ratio` gives them (rounded to
    whole groups with `quant`, as the run does), in module order."""
    linears = factorised_linears(block, ratio)
    ranks = block_ranks(linears, ratio, quant)
    return [LinearPlan(name, linear_shape(layer), ranks[name]) for name, layer in linears.items()]


_PROBE = """
import json, sys
import psutil, torch
args = json.loads(sys.argv[1])
import streamsvd.run  # the run and its plan, as compress imports them
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
if args["device"].startswith("cuda") and torch.cuda.is_available():
    torch.zeros(1, device=args["device"])
fixed = {"peak": peak_rss_bytes(), "after": psutil.Process().memory_info().rss}
if args["timing"]:
    from streamsvd.memory import phase_peak_bytes, reset_peak
    from streamsvd.speed import measure_speed
    reset_peak()
    t = args["timing"]
    fixed["rates"] = measure_speed(args["device"], getattr(torch, t["dtype"]), t["method"],
                                   t["width"], getattr(torch, t["train"]))
    fixed["timing"] = phase_peak_bytes()
    fixed["after_timing"] = psutil.Process().memory_info().rss
print(json.dumps(fixed))
"""


def measure_baseline(cfg, timing: dict | None = None) -> dict:
    """Host bytes a run holds before its first block: a fresh interpreter that imports
    streamsvd, builds the skeleton and loads the calibration text and windows as compress
    does (and opens the CUDA context on a GPU run). `peak` is its high-water mark, `after`
    what stays resident. With `timing` (measure_speed's dtype name, method and width) it
    then runs the speed micro-benchmark as the run does, and adds its `rates`, `timing`,
    the high-water mark while it ran, and `after_timing`, what stays resident after it
    (kernels' code and buffers the benchmark brought in: the run holds them too, through
    every block)."""
    args = {
        "timing": timing,
        "model": str(cfg.model),
        "calib": cfg.calib,
        "calibrate": bool(cfg.streams),
        "nsamples": cfg.nsamples,
        "seqlen": cfg.seqlen,
        "seed": cfg.seed,
        "device": cfg.device,
    }
    # Run from the filesystem root with this very streamsvd first on the path: a folder
    # named streamsvd in the caller's working directory must not be imported instead.
    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    args["model"] = str(Path(args["model"]).resolve())
    if args["calib"] and Path(args["calib"]).exists():
        args["calib"] = str(Path(args["calib"]).resolve())
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)],
                            capture_output=True, text=True, cwd=os.sep, env=env)  # fmt: skip
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise StreamSVDError(f"could not measure the run's fixed memory: {tail[0]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_plan(cfg, fixed: dict[str, int] | None = None, device_memory: int | None = None,
              timing: bool = True, processes: int = 1, have: dict | None = None,
              warn: bool = True, model=None) -> Plan:  # fmt: skip
    """The plan of compress run `cfg` (a CompressConfig). `fixed`: the setup's memory as
    `measure_baseline` returns it, measured when not given. `device_memory`: bytes of the
    GPU the run is meant for, where that GPU is not visible here (planning on a login
    node); the time estimate then is unavailable. timing=False skips the micro-benchmark.
    processes: plan each of that many torch.distributed processes (world.py): it holds a
    block and whole sums as one process does, but streams only its share of the windows,
    and factorises its share of each stage's linears. have: the memory the run may use, as
    `memory_have` gives it (measured here when not given). warn=False: the calibration's
    warnings are not repeated, and `model`: its skeleton, not built again (a run planning
    itself has given the one and has the other)."""
    config, dtype, compute, model, tensors, prefix, blocks = _checked_model(cfg, model, warn)
    item, text, shapes = dtype.itemsize, config.get_text_config(), tensors.shapes()
    largest, largest_params = largest_block(shapes, prefix, len(blocks))
    quant = block_settings(cfg, blocks)
    linears = linear_plans(blocks[largest], cfg.ratio, quant)
    needs = METHODS[cfg.method].needs
    groups = input_groups(model, blocks[largest], cfg.ratio) if needs else []

    before, linear_before, linear_after = parameter_counts(shapes, blocks, cfg.ratio, quant)
    rest_bytes = item * sum(math.prod(s) for n, s in shapes.items()
                            if not n.startswith(prefix + "."))  # fmt: skip
    streams = cfg.streams
    per_stream = 2 * cfg.nsamples * cfg.seqlen * text.hidden_size * compute.itemsize
    disk = disk_bytes(cfg, tensors, prefix, blocks, text.hidden_size, len(streams))
    total_cfg, cfg = cfg, process_share(cfg, processes)  # memory and time: one process's
    output_bytes = before * item + side_file_bytes(cfg.model) if cfg.dense else disk["output"]

    can_time = timing and (torch.cuda.is_available() or not cfg.device.startswith("cuda"))
    width = max(lp.shape[1] for lp in linears)
    if fixed is None:
        bench = {"dtype": str(compute).removeprefix("torch."), "method": cfg.method,
                 "width": width, "train": train_dtype(cfg)}  # fmt: skip
        fixed = measure_baseline(cfg, bench if can_time else None)
    host, device = run_phases(cfg, fixed, text, linears, groups, largest_params * compute.itemsize,
                              rest_bytes, compute.itemsize, width)  # fmt: skip
    have = have or memory_have(total_cfg, device_memory)
    keep = refine_keep(cfg, host, device, refine_held_bytes(cfg, text.hidden_size, compute),
                       have)  # fmt: skip
    seconds, note, spectra = None, "", None
    if timing and not can_time:
        note = "unavailable: the GPU is not visible here (planned with --device-memory)"
    elif timing:
        rates = fixed.get("rates") or measure_speed(cfg.device, compute, cfg.method, width,
                                                    getattr(torch, train_dtype(cfg)))  # fmt: skip
        if streams:  # the activation store's speed, where the run will keep it
            rates |= measure_store(existing(Path(cfg.run_dir)), cfg.seqlen, text.hidden_size,
                                   compute)  # fmt: skip
        seconds, note, spectra = time_estimate(cfg, text, linears, groups, rates, processes, keep)
    plan = Plan(model=str(cfg.model), method=cfg.method, ratio=cfg.ratio, device=cfg.device,
                dtype=str(dtype).removeprefix("torch."), blocks=len(blocks), linears=linears,
                input_groups=groups, params_before=before,
                params_after=before - linear_before + linear_after,
                linear_params_before=linear_before, linear_params_after=linear_after,
                checkpoint_bytes=before * item, output_bytes=output_bytes, streams=streams,
                activation_bytes_per_stream=per_stream, disk_bytes=disk,
                fixed_bytes={k: v for k, v in fixed.items()
                             if k in ("peak", "after", "after_timing")},
                host_phases={k: int(v) for k, v in host.items()},
                device_phases={k: int(v) for k, v in device.items()},
                seconds_per_block=seconds, allocation=cfg.allocation, sequential=cfg.sequential,
                spectra_seconds_per_block=spectra, timing_note=note, processes=processes,
                refine_streams=keep)  # fmt: skip
    plan.checks = _checks(plan, total_cfg, have)
    return plan


def _checked_model(cfg, model, warn: bool) -> tuple:
    """The checkpoint's config, dtype and compute dtype, the model's skeleton (`model` where
    given), its tensors, the blocks' prefix and the blocks, checked as the run checks them
    before its first block (prepare.py)."""
    reader = CheckpointReader(cfg.model)
    config = load_config(cfg.model)
    dtype = reader.dtype()
    compute = compute_dtype(cfg.compute_dtype, dtype, cfg.device)
    model = model or build_skeleton(config, compute)
    tensors = ModelTensors(reader, model)  # named and shaped as the model's parameters
    prefix, blocks = find_blocks(model)
    tensors.check_blocks(prefix)
    tensors.check_unused(prefix)
    check_supported(blocks)
    check_calibration_size(cfg, blocks, warn)
    check_shapes(model, tensors.shapes(), cfg.model)
    check_locations(cfg.model, cfg.out, Path(cfg.run_dir))
    return config, dtype, compute, model, tensors, prefix, blocks


def parameter_counts(shapes: dict[str, tuple], blocks, ratio: float,
                     quant: QuantSettings | None) -> tuple[int, int, int]:  # fmt: skip
    """Parameters of the checkpoint, and of every block's factorised linears before and
    after (at the ranks the run gives them)."""
    every_linear = [lp for block in blocks for lp in linear_plans(block, ratio, quant)]
    linear_before = sum(math.prod(lp.shape) for lp in every_linear)
    linear_after = sum(lp.rank * sum(lp.shape) for lp in every_linear)
    return sum(math.prod(s) for s in shapes.values()), linear_before, linear_after


def run_phases(cfg, fixed: dict, text, linears: list[LinearPlan], groups: list[list[str]],
               block_bytes: int, rest_bytes: int, item: int,
               width: int) -> tuple[dict, dict]:  # fmt: skip
    """Peak host and (on a GPU) device bytes of the run's phases, in the order it takes
    them: the setup and the speed micro-benchmark (`fixed`), a block's phases
    (`block_memory`), and the embedding and head copied through ("rest")."""
    stages = sequential_stages([lp.name for lp in linears], groups) if cfg.sequential else None
    resident = max(fixed["after"], fixed.get("after_timing", 0))  # the run times itself first
    host, device = block_memory(cfg, text, linears, groups, block_bytes, item, resident, stages)
    if device:  # on a GPU the run's micro-benchmark comes first, on the device
        device = {"timing": bench_device_bytes(cfg.device, width), **device}
    first = {"setup": fixed["peak"]}
    if "timing" in fixed:
        first["timing"] = fixed["timing"]
    host = {**first, **host, "rest": resident + rest_bytes + WRITE_BUFFER}
    return host, device


def time_estimate(cfg, text, linears: list[LinearPlan], groups: list[list[str]], rates: dict,
                  processes: int, keep: str) -> tuple[dict, str, float | None]:  # fmt: skip
    """Seconds per block by stage (speed.block_seconds, refinement's streams where `keep`
    says), where they come from, and the seconds per block of the allocation's first pass
    (None for uniform). Each of `processes` factorises about its share of the linears."""
    seconds = block_seconds(dataclasses.replace(cfg, refine_streams=keep or "auto"), text,
                            linears, groups, rates)  # fmt: skip
    note = f"from a micro-benchmark of {rates['device_name']}"
    if processes > 1:
        for stage in ("cholesky", "svd", "update"):
            if stage in seconds:
                seconds["total"] -= seconds[stage] * (1 - 1 / processes)
                seconds[stage] /= processes
        note += "; per process, communication not counted"
    spectra = None
    if cfg.allocation != "uniform":  # its first pass is svdllm-w's statistics
        first = dataclasses.replace(cfg, method="svdllm-w", allocation="uniform",
                                    sequential=False)  # fmt: skip
        spectra = block_seconds(first, text, linears, groups, rates)["total"]
    return seconds, note, spectra


def plan_started_run(cfg, setup, world) -> Plan:
    """The plan of a run that has set up (`setup`: prepare.Prepared) and has blocks left,
    made once before its first block: the run takes from it where refinement keeps the
    streams, its time per block and each phase's planned peak (pipeline.Compressor's
    `planner`). Its fixed part is what this process holds now, against that plus what is
    still free (shared by the processes on this machine); its time, from a micro-benchmark
    of the device the run is on."""
    import psutil

    rss = psutil.Process().memory_info().rss
    free = host_memory_available()[0] // world.local_size
    have = {"host": (free + rss, "host memory")}
    if setup.device.type == "cuda":
        free = torch.cuda.mem_get_info(setup.device)[0]
        have["device"] = (free + torch.cuda.memory_reserved(setup.device), "device")
    return make_plan(cfg, {"peak": rss, "after": rss}, processes=world.size, have=have,
                     warn=False, model=setup.model)  # fmt: skip


def process_share(cfg, processes: int):
    """The settings as one of `processes` processes sees them: its share of the windows
    (the largest share, as world.share deals the micro-batches out)."""
    if processes <= 1:
        return cfg
    batches = math.ceil(cfg.nsamples / cfg.batch_size)
    if batches < processes:
        raise StreamSVDError(
            f"{batches} calibration micro-batches cannot be shared by {processes} processes: "
            "give each at least one (more --nsamples, a smaller --batch-size, or fewer processes)"
        )
    most = math.ceil(batches / processes)
    return dataclasses.replace(cfg, nsamples=min(cfg.nsamples, most * cfg.batch_size))


def block_memory(cfg, text, linears: list[LinearPlan], groups: list[list[str]],
                 block_bytes: int, item: int, base: int,
                 stages: list[list[str]] | None = None) -> tuple[dict, dict]:  # fmt: skip
    """Peak host and (on a GPU) device bytes of one block's phases: "statistics" (forward
    and sums) and "factorise" (the worst linear, in the order the run takes them: module
    order, each group's sums freed after its last linear, the others parked in host
    memory on a GPU). With `stages` (--sequential), each stage's sums are taken and
    freed before the next stage's, while the earlier stages' factors sit in the block
    beside its dense weights. The run allocates by the same `sum_shapes`,
    `release_points` and `workspace`."""
    method = METHODS[cfg.method]
    shape = {lp.name: lp.shape for lp in linears}
    group_of = {name: t for t in map(tuple, groups) for name in t}
    sums = {
        g: sums_bytes(shape[g[0]][1], {name: shape[name][0] for name in g}, method.needs)
        for g in set(group_of.values())
    }
    order = [name for stage in stages for name in stage] if stages else list(shape)
    release = release_points(order, group_of)

    tokens = min(cfg.batch_size, cfg.nsamples) * cfg.seqlen
    wide = max(lp.shape[1] for lp in linears)
    inter = getattr(text, "intermediate_size", None) or wide
    forward = tokens * (8 * text.hidden_size + 5 * inter) * item  # the block's activations
    if method.needs & {"comp", "cross"}:  # the other stream's captured inputs
        forward += tokens * (3 * text.hidden_size + inter) * item
    if method.needs:  # float64 token chunks of both streams and a block of W·x
        forward += 3 * min(tokens * wide, CHUNK_VALUES) * F64
    writes = ActivationStore.WRITES_IN_FLIGHT * tokens * text.hidden_size * item
    on_gpu = cfg.device.startswith("cuda")
    if on_gpu:  # attention scores, where the kernel materialises them (masked SDPA)
        batch = min(cfg.batch_size, cfg.nsamples)
        forward += 2 * batch * text.num_attention_heads * cfg.seqlen**2 * item

    by_name = {lp.name: lp for lp in linears}
    worst_device = worst_host = worst_sums = compressed = 0
    for stage in stages or [list(by_name)]:
        alive = {group_of[name]: sums[group_of[name]] for name in stage if name in group_of}
        worst_sums = max(worst_sums, sum(alive.values()) + compressed)
        for lp in map(by_name.get, stage):
            m, n = lp.shape
            group = group_of.get(lp.name)
            owns = (
                group is not None
                and "cross" in method.needs
                and cross_as_product([shape[name][0] for name in group], n)
            )
            work = method.workspace(m, n, lp.rank, owns) * F64
            current = alive.get(group, 0)
            if on_gpu:
                worst_device = max(worst_device, block_bytes + current + work + compressed)
                worst_host = max(worst_host, sum(alive.values()) - current)
            else:
                worst_host = max(worst_host, sum(alive.values()) + work + compressed)
            compressed += lp.rank * (m + n) * item
            for member in release.get(lp.name, []):
                alive.pop(group_of[member], None)
    host, device = {}, {}
    if on_gpu:
        device["statistics"] = block_bytes + worst_sums + forward
        device["factorise"] = worst_device
        host["block"] = base + block_bytes + compressed + WRITE_BUFFER + writes
        host["factorise"] = base + block_bytes + worst_host + compressed
    else:
        host["statistics"] = base + block_bytes + worst_sums + forward + writes
        host["factorise"] = base + block_bytes + worst_host
        host["write"] = base + block_bytes + compressed + WRITE_BUFFER
    if getattr(cfg, "bits", None):
        quantizing = quantize_memory(linears, groups, stages)
        if on_gpu:
            device["quantize"] = block_bytes + quantizing + compressed
        else:
            host["quantize"] = base + block_bytes + compressed + max(quantizing, forward)
    if getattr(cfg, "refine_epochs", 0):
        training = refine_memory(cfg, text, linears, item)
        if on_gpu:  # the original linears stay on the device for the target
            device["refine"] = block_bytes + training
        else:
            host["refine"] = base + block_bytes + compressed + training
    return host, device


def quantize_workspace(m: int, n: int, r: int) -> int:
    """Bytes GPTQ on one factor pair holds besides the Gram (step.BlockStep.quantize):
    building the inverse factor of an n-wide Gram (three float32 n×n, as LAPACK works on a
    copy: docs/quantization.md, "Memory and time"), or the factor kept
    with B's float32 copy and codes, B·G in float64, A's r×r Hessian and its factor, and
    A's float32 copy and codes, and both factors rotated (`quantize.rank_rotation`) in
    float32."""
    building = 3 * 4 * n * n
    sweeping = 4 * n * n + 8 * r * n + 8 * r * n + 3 * 8 * r * r + 8 * m * r + 4 * r * (m + n)
    return max(building, sweeping)


def quantize_memory(linears: list[LinearPlan], groups: list[list[str]],
                    stages: list[list[str]] | None) -> int:  # fmt: skip
    """Peak bytes of the quantize phase: a stage's float64 Grams (every input group of the
    stage, all taken before any is used), plus the worst linear's workspace."""
    by_name = {lp.name: lp for lp in linears}
    group_of = {name: tuple(g) for g in groups for name in g}
    worst = 0
    for stage in stages or [list(by_name)]:
        grams = {group_of.get(n, (n,)): by_name[n].shape[1] ** 2 * F64 for n in stage}
        work = max(quantize_workspace(*by_name[n].shape, by_name[n].rank) for n in stage)
        worst = max(worst, sum(grams.values()) + work)
    return worst


def refine_memory(cfg, text, linears: list[LinearPlan], item: int) -> int:
    """Bytes block refinement adds (refine.py): float32 factors, gradients and AdamW's
    moments, with a holdout the best factors' copy; the dense block's outputs on the whole
    compressed stream (the target's share 1 − λ, in the compute dtype); what one
    micro-batch's float32 forward keeps for the backward pass
    (`refine.saved_values_per_token`); attention scores where they are materialised (masked
    SDPA on a GPU)."""
    params = sum(lp.rank * sum(lp.shape) for lp in linears)
    batch = min(step_windows(getattr(cfg, "refine_batch", None), cfg.batch_size), cfg.nsamples)
    tokens = batch * cfg.seqlen  # one refinement step's windows
    wide = max(lp.shape[1] for lp in linears)
    inter = getattr(text, "intermediate_size", None) or wide
    ranks = sum(lp.rank for lp in linears)
    saved = tokens * saved_values_per_token(text.hidden_size, inter, ranks) * 4
    if cfg.device.startswith("cuda"):
        saved += 3 * batch * text.num_attention_heads * cfg.seqlen**2 * 4
    local = cfg.nsamples * cfg.seqlen * text.hidden_size * item if cfg.refine_target < 1 else 0
    kept = cfg.refine.holdout > 0  # the best factors' copy
    return trainable_bytes(params, kept) + local + saved


def train_dtype(cfg) -> str:
    """The dtype of refinement's matrix products, whose rate times it: bfloat16 under
    --refine-precision bfloat16, else float32. (Its memory is planned as float32's, an
    upper bound: autocast saves bf16 copies of the products' inputs for the backward, 34
    MiB against float32's 55 for a 2×512-token step of a SmolLM2 block.)"""
    return getattr(cfg, "refine_precision", "float32")  # refine.PRECISIONS: torch's dtype names


def refine_held_bytes(cfg, hidden: int, compute: torch.dtype) -> int:
    """Bytes of refinement's two streams held whole (activations.HeldWindows): the
    compressed stream's inputs and the original stream's outputs of this process's
    windows, in the compute dtype, as the store keeps them."""
    return 2 * cfg.nsamples * cfg.seqlen * hidden * compute.itemsize


def refine_keep(cfg, host: dict[str, int], device: dict[str, int], held: int,
                have: dict[str, tuple[int, str]]) -> str:  # fmt: skip
    """Where refinement keeps a block's streams between its epochs, and the phases' bytes
    updated to match (in place): "device" where the device's peak with them fits its
    memory, else "host" (pinned on a GPU) where the host's does, else "store": read from
    the store on every step, a step ahead of the compute. --refine-streams other than
    auto: as asked. "" without refinement."""
    if not getattr(cfg, "refine_epochs", 0):
        return ""
    keep = getattr(cfg, "refine_streams", "auto")
    on_host = host.get("refine", host.get("block", 0)) + held  # on a GPU: the block phase's
    if keep == "auto":
        keep = "store"
        if device and max(*device.values(), device["refine"] + held) <= have["device"][0]:
            keep = "device"
        elif max(*host.values(), on_host) <= have["host"][0]:
            keep = "host"
    if keep == "device":
        device["refine"] += held
    elif keep == "host":
        host["refine"] = on_host
    return keep


def largest_block(shapes: dict[str, tuple], prefix: str, n_blocks: int) -> tuple[int, int]:
    """(index, parameters) of the block with the most parameters. Blocks may differ
    (DeepSeek-V3's first blocks are dense, the rest mixtures of experts): memory and time
    are planned for the largest."""
    sizes = [0] * n_blocks
    for name, shape in shapes.items():
        if name.startswith(prefix + "."):
            sizes[int(name[len(prefix) + 1 :].split(".", 1)[0])] += math.prod(shape)
    largest = max(range(n_blocks), key=sizes.__getitem__)
    return largest, sizes[largest]


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


def memory_have(cfg, device_memory: int | None = None) -> dict[str, tuple[int, str]]:
    """The memory a run may use, (bytes, where the figure comes from): "host" always,
    "device" on a GPU (`device_memory` where given, else what is free on it now)."""
    have, source = host_memory_available()
    out = {"host": (have, f"host memory ({source})")}
    if cfg.device.startswith("cuda"):
        if device_memory is not None:
            out["device"] = (device_memory, "device memory (--device-memory)")
        elif torch.cuda.is_available():
            free = torch.cuda.mem_get_info(torch.device(cfg.device))[0]
            out["device"] = (free, "device memory (free)")
        else:
            raise StreamSVDError(
                "no CUDA GPU is visible to check the plan against: give the GPU's memory "
                "with --device-memory GIB (e.g. 24) to plan for it here"
            )
    return out


def _checks(plan: Plan, cfg, have: dict[str, tuple[int, str]]) -> list[dict]:
    checks = [{"what": have["host"][1], "need": plan.host_peak_bytes, "have": have["host"][0]}]
    if plan.device_phases:
        free, what = have["device"]
        checks.append({"what": what, "need": plan.device_peak_bytes, "have": free})
    for where, need, what in disk_needs(cfg, plan.disk_bytes):
        checks.append(
            {"what": f"disk for the {what} files at {where}", "need": need,
             "have": shutil.disk_usage(where).free}
        )  # fmt: skip
    for check in checks:
        check["ok"] = check["need"] <= check["have"]
    return checks


def duration_text(seconds: float) -> str:
    """Seconds for people: 42s, 7m 05s, 3h 12m."""
    s = round(seconds)
    if s < 60:
        return f"{max(seconds, 0):.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def format_plan(plan: Plan) -> str:
    lines = [
        f"plan: {plan.method} at ratio {plan.ratio} on {plan.device}, {plan.blocks} "
        f"block{'s' * (plan.blocks != 1)} of {len(plan.linears)} linears, {plan.dtype}"
        + (", statistics stage by stage within each block" if plan.sequential else ""),
        "  ranks (the largest block):"
        if plan.allocation == "uniform"
        else f"  ranks: the {plan.allocation} allocation chooses them from a first pass over "
        "the checkpoint; the same total as these uniform ones (the largest block):",
    ]
    alike: dict[tuple, int] = {}  # experts' linears listed once: "mlp.experts.*.up_proj"
    for lp in plan.linears:
        key = (re.sub(r"\.experts\.\d+\.", ".experts.*.", lp.name), lp.shape, lp.rank)
        alike[key] = alike.get(key, 0) + 1
    for (name, (m, n), rank), count in alike.items():
        times = f"  (× {count} experts)" if count > 1 else ""
        lines.append(f"    {name:<24} {m:>6} × {n:<6} -> rank {rank}{times}")
    pct = lambda a, b: f"{a / b:.1%}"  # noqa: E731
    lines += [
        f"  parameters    {plan.params_before:,} -> {plan.params_after:,} "
        f"({pct(plan.params_after, plan.params_before)})",
        f"  linear params {plan.linear_params_before:,} -> {plan.linear_params_after:,} "
        f"({pct(plan.linear_params_after, plan.linear_params_before)})",
        f"  checkpoint    {size_text(plan.checkpoint_bytes)} -> "
        f"output {size_text(plan.output_bytes)}",
        f"  activations   {size_text(plan.activation_bytes_per_stream)} per stream × "
        f"{len(plan.streams)} ({', '.join(plan.streams) or 'none: no calibration'})"
        + (
            f", each of the {plan.processes} processes holding its share"
            if plan.processes > 1
            else ""
        ),
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
    if plan.refine_streams:
        where = keep_text(plan.refine_streams, plan.device.startswith("cuda"))
        lines.append(f"  refinement    each block's streams {where}")
    if plan.seconds_per_block:
        per = plan.seconds_per_block
        lines.append(
            f"  time          about {duration_text(per['total'])} per block, "
            f"{duration_text(per['total'] * plan.blocks)} in all ("
            + ", ".join(f"{k} {v:,.1f}s" for k, v in per.items() if k != "total")
            + f"; {plan.timing_note})"
        )
    elif plan.timing_note:
        lines.append(f"  time          {plan.timing_note}")
    if plan.spectra_seconds_per_block:
        spectra = plan.spectra_seconds_per_block
        lines.append(
            f"  first pass    about {duration_text(spectra)} per block, "
            f"{duration_text(spectra * plan.blocks)} in all (each matrix's spectrum, for the "
            f"{plan.allocation} allocation; its memory is below the run's)"
        )
    if plan.processes > 1:
        lines.append(
            f"  processes     planned for {plan.processes} (torch.distributed): peak memory and "
            "time above are each process's, with its share of the calibration windows; the "
            "checks below assume one process per machine"
        )
    for c in plan.checks:
        mark = "ok" if c["ok"] else "NOT ENOUGH"
        lines.append(
            f"  {c['what']}: need {size_text(c['need'])}, have {size_text(c['have'])}: {mark}"
        )
    return "\n".join(lines)
