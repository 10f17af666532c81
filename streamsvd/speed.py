"""How long a block will take: the flops of a block's work, stage by stage, over the rates
this device reaches on the same kernels in a short micro-benchmark (a few seconds).

On a CPU rates are measured at a size of a thousand, where BLAS is a little less efficient
than at 8-28 thousand, so the estimate leans long on big shapes (`benchmarks/scale.py`
reports it against measured stage times). A GPU is timed at 4096: at 1024 an H200 reached a
twelfth of its 4096 rates, and the plan read 1.7-2.7x a 7B block's measured time; at 4096,
0.92-1.2x (benchmarks/results/gpu_check.md).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .experts import expert_index
from .factorize import METHODS, RSVD_OVERSAMPLE, RSVD_POWER_ITERATIONS
from .model import sequential_stages
from .stats import cross_as_product, damped_cholesky_

BENCH_N = 1024  # size of the micro-benchmark's matrices on a CPU
BENCH_N_CUDA = 4096  # and on a GPU, which 1024² products leave idle
# n×n float64 matrices the micro-benchmark holds at its peak: 5.9 at 1024, 6.7 at 2048
# (peak RSS over the start, on a CPU); 896 MiB at 4096
BENCH_MATRICES = 7
STORE_CHUNKS = 8  # activation chunks (one window each) written and read back to time the store
# Values an elementwise op reads or writes per token in one forward of a Llama-type block,
# beside its matmuls: norms, rotary, residual adds and GQA's repeated k/v (~30 per hidden
# value), the MLP's activation and product (~5 per intermediate value), and the attention
# probabilities' mask, softmax and dropout passes (~6 per head and key position).
ELEMENTWISE_PER_HIDDEN, ELEMENTWISE_PER_INTERMEDIATE, ELEMENTWISE_PER_SCORE = 30, 5, 6


def _best_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def bench_size(device: str, width: int) -> int:
    """The micro-benchmark's matrix size on `device` for a model of `width`."""
    return max(128, min(BENCH_N_CUDA if torch.device(device).type == "cuda" else BENCH_N, width))


def bench_device_bytes(device: str, width: int) -> int:
    """Device memory the micro-benchmark holds at its peak (a GPU run's first phase)."""
    return BENCH_MATRICES * bench_size(device, width) ** 2 * 8


def measure_speed(device: str, dtype: torch.dtype, method: str, width: int = BENCH_N,
                  train: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """Rates of this device: flop/s of float64 matrix products, triangular solves and the
    in-place Cholesky, flop/s of the block's forward matmuls in the checkpoint dtype and of
    refinement's in `train` (float32, or bfloat16 where it runs in bf16 autocast), and
    seconds per k³ of an eigendecomposition (and per m·n·k of an SVD where the method uses
    one). Seeded inputs; takes a few seconds. `width`: the model's, which caps the size
    (a tiny model is timed on its own small shapes, in milliseconds)."""
    dev = torch.device(device)
    n = bench_size(device, width)
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, dtype=torch.float64, device=dev, generator=gen)
    rhs = torch.randn(n // 2, n, dtype=torch.float64, device=dev, generator=gen)
    rates = {"device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "this CPU",
             "itemsize": dtype.itemsize}  # fmt: skip
    # One step at a time, each freeing its temporaries: the run times itself with this
    # before its first block, and the plan counts its peak (BENCH_MATRICES).
    with torch.inference_mode():
        rates |= _product_rates(a, dtype, dev, train)
        if method in ("svd", "rsvd", "svd-u"):
            rates["svd_mnk"] = _svd_seconds(a[: n // 2], dev) / (n * (n // 2) ** 2)
        gram = a @ a.mT
        gram.diagonal().add_(n)
        del a
        rates |= _factorisation_rates(gram, rhs, dev)
    return rates


def _product_rates(a: torch.Tensor, dtype: torch.dtype, dev: torch.device,
                   train: torch.dtype) -> dict:  # fmt: skip
    n = a.shape[0]
    rates = {"gemm64": 2 * n**3 / _best_seconds(lambda: a @ a, dev)}
    # the forward in the compute dtype; refinement's products in float32 or bf16 (refine.py)
    for name, kind in (("forward", dtype), ("train", train)):
        x = a.to(kind)
        rates[name] = 2 * n**3 / _best_seconds(lambda x=x: F.linear(x, x), dev)
    x = a.to(dtype)  # values per second of an elementwise op (norms, activations, softmax)
    rates["elementwise"] = 3 * n * n / _best_seconds(lambda: torch.addcmul(x, x, x), dev)
    return rates


def measure_store(root: Path, seqlen: int, hidden: int, dtype: torch.dtype) -> dict:
    """Bytes per second of the activation store on `root`'s filesystem, used as the run
    uses it: windows written one chunk each and hashed (on the store's writer thread, waited
    for), then read back. Not fsync'd: the run's fsyncs happen in a background thread while
    the next batch computes. The plan counts the writes whole, though they go behind the
    compute: a pass runs at most `ActivationStore.WRITES_IN_FLIGHT` micro-batches ahead of
    its writes, and on a CPU the writer thread takes cores the compute would use."""
    from .activations import ActivationStore

    nbytes = STORE_CHUNKS * seqlen * hidden * dtype.itemsize
    window = torch.randn(1, seqlen, hidden, generator=torch.Generator().manual_seed(0)).to(dtype)
    with tempfile.TemporaryDirectory(dir=root, prefix=".streamsvd-speed-") as tmp:
        store = ActivationStore(Path(tmp), STORE_CHUNKS, seqlen, hidden, dtype)
        store.reset("orig", 0)
        start, digest = time.perf_counter(), hashlib.sha256()
        for k in range(STORE_CHUNKS):
            store.write("orig", 0, k, window, digest)
        store.flush("orig", 0)
        wrote = time.perf_counter() - start
        start = time.perf_counter()
        for k in range(STORE_CHUNKS):
            store.read("orig", 0, k, k + 1)
        read = time.perf_counter() - start
    return {"store_write": nbytes / wrote, "store_read": nbytes / read}


def _svd_seconds(w: torch.Tensor, dev: torch.device) -> float:
    return _best_seconds(lambda: torch.linalg.svd(w, full_matrices=False), dev, 2)


def _trsm_seconds(low: torch.Tensor, rhs: torch.Tensor, dev: torch.device) -> float:
    return _best_seconds(
        lambda: torch.linalg.solve_triangular(low.mT, rhs, upper=True, left=False), dev
    )


def _factorisation_rates(gram: torch.Tensor, rhs: torch.Tensor, dev: torch.device) -> dict:
    n = gram.shape[0]
    solve = _trsm_seconds(torch.linalg.cholesky(gram), rhs, dev)
    cholesky = _best_seconds(lambda: damped_cholesky_(gram.clone()), dev)
    eigh = _best_seconds(lambda: torch.linalg.eigh(gram), dev, 2)
    return {"trsm": (n // 2) * n**2 / solve, "cholesky": n**3 / 3 / cholesky,
            "eigh_k3": eigh / n**3}  # fmt: skip


def activation_passes(cfg, stages: int, reads_comp: bool) -> tuple[int, int]:
    """How many times a block reads and writes a whole stream of activations: every stage's
    statistics read the original stream (and the compressed one where the method pairs
    them), the first writes the original's next; the advance reads and writes the
    compressed stream; refinement reads the compressed inputs and the targets once where
    it holds them (plan.refine_keep), else on every epoch, and the compressed inputs once
    more for the dense block's share of the target; quantizing reads the compressed
    stream once per stage."""
    reads = stages * (1 + reads_comp)
    writes = 1
    if "comp" in cfg.streams:
        reads, writes = reads + 1, writes + 1
    epochs = getattr(cfg, "refine_epochs", 0)
    if epochs and getattr(cfg, "refine_streams", "store") in ("device", "host"):
        reads += 2
    elif epochs:
        reads += 2 * epochs + (cfg.refine_target < 1)
    if getattr(cfg, "bits", None):  # the compressed stream once more per stage
        reads += stages
    return reads, writes


def routed_share(text, names: list[str]) -> dict[str, float]:
    """The share of the calibration tokens each linear sees: all of them, except for an
    expert's, which sees top-k of every E experts' tokens on average."""
    experts = {expert_index(n) for n in names} - {None}
    top_k = getattr(text, "num_experts_per_tok", None) or 1
    return {n: top_k / len(experts) if expert_index(n) else 1.0 for n in names}


# GPTQ quantizes a column at a time: about a dozen small kernels per column, whatever the
# width. Measured here (CPU, one thread): 125-190 µs a column for 64-256 rows.
GPTQ_COLUMN_SECONDS = 2e-4


def block_seconds(cfg, text, linears, groups: list[list[str]], rates: dict) -> dict[str, float]:
    """Estimated seconds of one block by stage (the StageTimer's names) and "total".
    linears: plan.LinearPlan; groups: names of linears that share inputs."""
    needs = METHODS[cfg.method].needs
    tokens = cfg.nsamples * cfg.seqlen
    shape = {lp.name: lp.shape for lp in linears}
    share = routed_share(text, list(shape))
    dense = 2 * sum(m * n * share[name] for name, (m, n) in shape.items())
    low = 2 * sum(lp.rank * sum(lp.shape) * share[lp.name] for lp in linears)
    attention = 4 * cfg.seqlen * text.hidden_size
    flops = dict.fromkeys(("forward", "stats", "cholesky", "update", "svd"), 0.0)
    stages = 1
    if needs and getattr(cfg, "sequential", False):  # once per stage (model.sequential_stages)
        stages = len(sequential_stages([lp.name for lp in linears], groups))
    flops["forward"], forwards = _forward_passes(cfg, stages, tokens, dense + attention,
                                                 low + attention)  # fmt: skip
    _sums_flops(needs, groups, shape, share, tokens, flops)
    seconds, eigh = _factorise_seconds(cfg.method, linears, rates, flops)
    epochs = getattr(cfg, "refine_epochs", 0)
    if epochs:  # forward and backward (twice the forward's flops) of the compressed block;
        # held-out windows: a forward alone, before the first epoch and after each
        held = cfg.refine.holdout * cfg.seqlen
        passes = epochs * (tokens - held) * 3 + (epochs + 1) * held
        seconds["refine"] = passes * (low + attention) / rates["train"]
    if getattr(cfg, "bits", None):  # step.BlockStep.quantize
        seconds["quantize"] = _quantize_seconds(groups, linears, share, tokens, rates, flops)
    seconds["forward"] = flops["forward"] / rates["forward"]
    if "elementwise" in rates:  # what is not matmuls: memory-bound elementwise passes
        values = _elementwise_values(cfg, text, shape)
        seconds["forward"] += forwards * tokens * values / rates["elementwise"]
    if "store_read" in rates and cfg.streams:  # activation I/O: each stream slot read/written
        reads, writes = activation_passes(cfg, stages, bool(needs & {"comp", "cross"}))
        stream = tokens * text.hidden_size * rates["itemsize"]
        seconds["activations"] = stream * (reads / rates["store_read"]
                                           + writes / rates["store_write"])  # fmt: skip
    seconds["stats"] = flops["stats"] / rates["gemm64"]
    seconds["cholesky"] = flops["cholesky"] / rates["cholesky"]
    seconds["update"] = seconds.get("update", 0.0) + flops["update"] / rates["gemm64"]
    seconds["svd"] = seconds.get("svd", 0.0) + flops["svd"] / rates["gemm64"] + eigh
    seconds = {k: v for k, v in seconds.items() if v > 0}
    seconds["total"] = sum(seconds.values())
    return seconds


def _forward_passes(cfg, stages: int, tokens: int, dense: float,
                    low: float) -> tuple[float, int]:  # fmt: skip
    """Flops of the passes a block makes over the calibration tokens, and how many passes
    (`dense`, `low`: flops per token of the dense and the compressed block): the dense
    block on each stream the method carries, once per stage, and the compressed one on X'
    where the method pairs them; for refinement, the targets and the advance the method
    has not made already; for quantizing, the compressed stream once per stage."""
    needs = METHODS[cfg.method].needs
    flops, forwards = 0.0, 0
    if needs:
        passes = len(METHODS[cfg.method].streams) * stages
        flops, forwards = tokens * (passes * dense), passes
        if needs & {"comp", "cross"}:
            flops, forwards = flops + tokens * low, forwards + 1
    if getattr(cfg, "refine_epochs", 0):
        if not needs:  # the dense block on the original stream, for the targets
            flops, forwards = flops + tokens * dense, forwards + 1
        if not needs & {"comp", "cross"}:  # the advance on the compressed stream
            flops, forwards = flops + tokens * low, forwards + 1
        if cfg.refine_target < 1:  # the dense block on the compressed stream, for the target
            flops, forwards = flops + tokens * dense, forwards + 1
    if getattr(cfg, "bits", None):  # the compressed stream, once per stage
        flops, forwards = flops + stages * tokens * low, forwards + stages
    return flops, forwards


def _sums_flops(needs: set, groups: list[list[str]], shape: dict, share: dict, tokens: int,
                flops: dict) -> None:  # fmt: skip
    """Add the statistics' flops of every input group to `flops` (their sums, W·C where the
    cross term is not a product, each Gram's Cholesky)."""
    for group in groups:
        n = shape[group[0]][1]
        outs = [shape[name][0] for name in group]
        sums = len(needs & {"orig", "comp"}) * 2 * n * n
        if "cross" in needs:
            sums += 4 * sum(outs) * n if cross_as_product(outs, n) else 2 * n * n
            if not cross_as_product(outs, n):  # W·C from C, per linear
                flops["update"] += sum(2 * m * n * n for m in outs)
        flops["stats"] += tokens * sums * share[group[0]]
        flops["cholesky"] += n**3 / 3


def _factorise_seconds(method: str, linears, rates: dict,
                       flops: dict) -> tuple[dict[str, float], float]:  # fmt: skip
    """Each linear's factorisation: seconds by stage of what is timed by its own rate
    (SVD, triangular solves), its flops added to `flops`, and the eigendecompositions'
    seconds."""
    seconds, eigh = {}, 0.0
    for lp in linears:
        m, n = lp.shape
        r, k = lp.rank, min(m, n)
        if method in ("svd", "svd-u"):
            seconds["svd"] = seconds.get("svd", 0.0) + rates["svd_mnk"] * m * n * k
            if method == "svd-u":  # as svdllm-u's refit
                flops["update"] += 2 * r * n * (n + m) + 2 * r * r * n
            continue
        if method == "rsvd":
            q = min(r + RSVD_OVERSAMPLE, m, n)
            flops["svd"] += 2 * m * n * q * (2 * RSVD_POWER_ITERATIONS + 2)
            seconds["svd"] = seconds.get("svd", 0.0) + rates["svd_mnk"] * q * q * n
            continue
        if method == "svdllm-a":
            flops["update"] += 2 * m * n * n  # (1 − λ)·W·L
            seconds["update"] = seconds.get("update", 0.0) + m * n * n / rates["trsm"]
        else:  # W·L
            flops["svd"] += 2 * m * n * n
        flops["svd"] += 2 * k * k * max(m, n) + 2 * r * m * n  # the Gram; B or A
        seconds["svd"] = seconds.get("svd", 0.0) + r * n * n / rates["trsm"]
        eigh += rates["eigh_k3"] * k**3
        if method == "svdllm-u":
            flops["update"] += 2 * r * n * (n + m) + 2 * r * r * n
    return seconds, eigh


def _quantize_seconds(groups: list[list[str]], linears, share: dict, tokens: int, rates: dict,
                      flops: dict) -> float:  # fmt: skip
    """GPTQ's seconds on a block (step.BlockStep.quantize): each group's inverse factor and
    each factor pair's sweep, column by column; its Grams' flops added to `flops`."""
    shape = {lp.name: lp.shape for lp in linears}
    quantize = 0.0
    for group in groups:
        n = shape[group[0]][1]
        flops["stats"] += tokens * 2 * n * n * share[group[0]]
        quantize += 4 / 3 * n**3 / rates["cholesky"]  # the inverse factor
    for lp in linears:
        (m, n), r = lp.shape, lp.rank
        sweep = 2 * r * n * n + 2 * m * r * r + 2 * r * n * n + 2 * r * r * n  # + B·G·Bᵀ
        quantize += sweep / rates["gemm64"] + 4 / 3 * r**3 / rates["cholesky"]
        quantize += (n + r) * GPTQ_COLUMN_SECONDS
    return quantize


def _elementwise_values(cfg, text, shape: dict) -> float:
    """Values the elementwise ops of one forward read or write per token (norms, rotary,
    activations, the attention probabilities)."""
    heads = getattr(text, "num_attention_heads", 1) or 1
    intermediate = max((shape[n][0] for n in shape if n.endswith(("up_proj", "fc1"))),
                       default=4 * text.hidden_size)  # fmt: skip
    return (ELEMENTWISE_PER_HIDDEN * text.hidden_size
            + ELEMENTWISE_PER_INTERMEDIATE * intermediate
            + ELEMENTWISE_PER_SCORE * heads * cfg.seqlen)  # fmt: skip
