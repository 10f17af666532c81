"""Everything a compress run settles before its first block: the checkpoint and the model's
skeleton (on `meta`, no weights), every check that can fail early, the calibration windows
and this process's share of them, the CPU threads, the disk it needs, and the manifest that
a resumed run must match."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .calib import calibration_windows, leading_bos, load_text, text_sha256, tokenize
from .checkpoint import CheckpointReader
from .disk import disk_bytes, disk_needs, size_text
from .errors import NotEnoughResources, StreamSVDError
from .factorize import METHODS, Method
from .journal import read_manifest
from .model import (
    block_stages,
    build_skeleton,
    check_supported,
    compute_dtype,
    factorised_linears,
    find_blocks,
    load_config,
    max_positions,
)
from .modeling import linear_shape
from .names import ModelTensors
from .preflight import check_locations, check_shapes
from .quantize import QuantSettings, block_settings
from .refine import REFINE_MIN_WINDOWS
from .world import World

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    reader: CheckpointReader
    config: object  # the checkpoint's transformers config
    dtype: torch.dtype  # the checkpoint's, and the output's
    compute: torch.dtype  # the blocks' and the activation streams'
    model: nn.Module  # the skeleton, filled a block at a time
    tensors: ModelTensors  # the checkpoint's tensors, named as the model's parameters
    prefix: str  # of the decoder blocks, e.g. "model.layers"
    blocks: nn.ModuleList
    method: Method
    device: torch.device  # this process's
    windows: torch.Tensor | None  # the calibration windows (all of them), token ids
    batches: list[tuple[int, int]]  # this process's micro-batches: (start, stop) of windows
    threads: int | None  # CPU intra-op threads; None on a GPU
    disk: dict[str, int]  # bytes the run writes, by kind
    manifest: dict  # the settings a resumed run must match
    quant: QuantSettings | None  # --bits: how the factors are quantized
    stages: list[list[list[str]]] | None  # --sequential: each block's (model.block_stages)

    @property
    def hidden(self) -> int:
        return self.config.get_text_config().hidden_size


def prepare(cfg, world: World) -> Prepared:
    """Check `cfg` (a CompressConfig) against the checkpoint, the machine and the disk, and
    settle what the run needs; raises StreamSVDError before anything is written."""
    out = Path(cfg.out)
    if out.exists():
        leftover = (f" (if it is this run's finished result, {cfg.run_dir} is left over and "
                    "can be deleted)" if cfg.run_dir.exists() else "")  # fmt: skip
        raise StreamSVDError(
            f"output {out} already exists; remove it or choose another --out{leftover}"
        )
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise StreamSVDError(
            "--device cuda was asked for but no CUDA GPU is visible (to plan a GPU run "
            "here, use --dry-run with --device-memory)"
        )
    device = torch.device(world.device(cfg.device))
    if device.type == "cuda" and device.index is not None:  # a rank's own GPU (torchrun)
        torch.cuda.set_device(device)
    reader = CheckpointReader(cfg.model)
    config = load_config(cfg.model)
    dtype = reader.dtype()
    compute = compute_dtype(cfg.compute_dtype, dtype, device.type)
    model = build_skeleton(config, compute)
    tensors = ModelTensors(reader, model)
    check_shapes(model, tensors.shapes(), cfg.model)
    check_locations(cfg.model, cfg.out, cfg.run_dir)
    prefix, blocks = find_blocks(model)
    tensors.check_blocks(prefix)
    tensors.check_unused(prefix)
    check_supported(blocks)
    check_calibration_size(cfg, blocks, warn=world.writer)
    if world.writer and device.type == "cpu" and cfg.refine.precision == "bfloat16":
        warn_slow_bf16()
    quant = _quant_settings(cfg, blocks)
    stages = block_stages(model, blocks, cfg.ratio) if cfg.sequential else None
    windows, calibration = _calibration(cfg, config)
    batches = _share(cfg, world)
    threads = _cpu_threads(cfg, device)
    disk = disk_bytes(cfg, tensors, prefix, blocks, config.get_text_config().hidden_size,
                      len(cfg.streams))  # fmt: skip
    _check_disk(cfg, disk)
    manifest = {
        "streamsvd_version": __version__,
        "model_fingerprint": reader.fingerprint(),
        "method": cfg.method,
        "ratio": cfg.ratio,
        "rank_policy": "floor((1 - ratio) * m * n / (m + n)) for every block linear"
        if cfg.allocation == "uniform"
        else f"{cfg.allocation} allocation of the uniform rule's parameters",
        "allocation": cfg.allocation,
        "sequential": cfg.sequential,
        "refine": dataclasses.asdict(cfg.refine),
        "calibration": calibration,
        "dtype": str(dtype),
        "compute_dtype": str(compute),
        "batch_size": cfg.batch_size,
        "device_type": device.type,
        "cpu_threads": threads,
        "dense": cfg.dense,
        "n_blocks": len(blocks),
        # each process's activations hold its share of the windows: another number of
        # processes cannot take them over
        "processes": world.size,
        "quantization": dataclasses.asdict(quant) if quant else None,
    }
    return Prepared(reader, config, dtype, compute, model, tensors, prefix, blocks,
                    METHODS[cfg.method], device, windows, batches, threads, disk,
                    manifest, quant, stages)  # fmt: skip


def _quant_settings(cfg, blocks: nn.ModuleList) -> QuantSettings | None:
    """--bits, --group-size: checked against the model's widths, and the compressed-tensors
    package found."""
    quant = block_settings(cfg, blocks)
    if quant:
        quant.scheme()  # the compressed-tensors package is there
    return quant


def check_calibration_size(cfg, blocks: nn.ModuleList, warn: bool = True) -> None:
    """Before any work: refuse calibration with fewer tokens than the widest factorised
    layer has inputs, and warn (where `warn`) when refinement gets fewer windows than it was
    measured to learn from.

    Tokens: a Gram Σ x xᵀ over T tokens has rank at most T, so below a layer's n inputs its
    statistics are rank-deficient and the factorisation decides n − T directions by damping
    alone. On SmolLM2 with 8 windows of 128 tokens (1,024, against down_proj's 1,536
    inputs) the default's output scored perplexity 49,405 against the original's 18.99,
    and the run looked like any other (issue 41). That is refused, not warned: a warning
    scrolls past and the model it leaves looks finished, while a refusal costs seconds and
    names the fix. cfg.allow_few_tokens proceeds anyway (tests on tiny checkpoints,
    experiments on few tokens; the -eigen methods, exact on a singular Gram). The count is
    the whole run's, nsamples × seqlen, as every process's sums are added up. An expert gets
    at most that many, fewer as routed: how many is known only as the run goes, and its
    damping is counted and warned about then (stats.damped_cholesky_)."""
    tokens = cfg.nsamples * cfg.seqlen
    linears = [(name, linear_shape(layer)[1]) for block in blocks
               for name, layer in factorised_linears(block, cfg.ratio).items()]  # fmt: skip
    widest, inputs = max(linears, key=lambda item: item[1], default=(None, 0))
    if METHODS[cfg.method].needs and tokens < inputs and not cfg.allow_few_tokens:
        raise StreamSVDError(
            f"{cfg.nsamples} calibration windows of {cfg.seqlen} tokens are {tokens:,} "
            f"tokens, fewer than the {inputs:,} inputs of {widest}: its statistics would be "
            "rank-deficient and the compressed model far off (on SmolLM2 at 1,024 tokens for "
            f"1,536 inputs, perplexity in the tens of thousands); give at least {inputs:,} "
            f"tokens, e.g. --nsamples {-(-inputs // cfg.seqlen)} at --seqlen {cfg.seqlen}, or "
            "--allow-few-tokens to go on anyway"
        )
    epochs, held = cfg.refine.epochs, cfg.refine.holdout
    if warn and epochs and cfg.nsamples < REFINE_MIN_WINDOWS:
        kept = (
            f"each block keeps its best epoch on {held} of them, held out, or its closed "
            "form where no epoch beats it"
            if held
            else "nothing guards against that"
        )
        log.warning(
            "refinement trains each block for %d epochs on %d calibration windows; it was "
            "measured to beat the closed form on held-out text from %d windows, and on 8 it "
            "made a model worse than none (%s): give --nsamples %d or more, or --refine-epochs "
            "0 for the closed form alone", epochs, cfg.nsamples, REFINE_MIN_WINDOWS, kept,
            REFINE_MIN_WINDOWS,
        )  # fmt: skip


def native_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, AMX), as oneDNN says; None
    where this torch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def warn_slow_bf16() -> None:
    """bf16 autocast on a CPU without native bf16 multiplies ~10× slower than float32
    (measured on an AVX2 CPU): say so, since it buys nothing there."""
    if native_bf16() is False:
        log.warning(
            "--refine-precision bfloat16: this CPU has no native bf16 arithmetic, so "
            "refinement's bf16 products run several times slower than float32 ones here "
            "(~10× on an AVX2 CPU); --refine-precision float32 is faster on it"
        )


def _calibration(cfg, config) -> tuple[torch.Tensor | None, dict]:
    if not cfg.streams:
        return None, {}
    limit = max_positions(config.get_text_config())
    if limit is not None and cfg.seqlen > limit:
        raise StreamSVDError(
            f"seqlen {cfg.seqlen} exceeds the model's maximum of {limit} positions; lower --seqlen"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError) as exc:
        raise StreamSVDError(f"{cfg.model} has no usable tokenizer: {exc}") from exc
    text, source = load_text(cfg.calib)
    if cfg.bos_windows is None:  # as the tokenizer starts every text
        bos = leading_bos(tokenizer)
    elif cfg.bos_windows:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise StreamSVDError(f"--bos-windows: the tokenizer of {cfg.model} has no BOS token")
    else:
        bos = None
    windows = calibration_windows(tokenize(tokenizer, text), cfg.nsamples, cfg.seqlen, cfg.seed,
                                  bos)  # fmt: skip
    info = {"source": source, "text_sha256": text_sha256(text), "nsamples": cfg.nsamples,
            "seqlen": cfg.seqlen, "seed": cfg.seed}  # fmt: skip
    if bos is not None:
        info["bos"] = bos
    return windows, info


def calibration_batches(cfg) -> list[tuple[int, int]]:
    """Every process's micro-batches, (start, stop) of the calibration windows."""
    n, b = cfg.nsamples, cfg.batch_size
    return [(s, min(s + b, n)) for s in range(0, n, b)]


def _share(cfg, world: World) -> list[tuple[int, int]]:
    """This process's micro-batches, (start, stop) of the calibration windows."""
    n, b = cfg.nsamples, cfg.batch_size
    batches = calibration_batches(cfg)
    if len(batches) < world.size:
        raise StreamSVDError(
            f"{len(batches)} calibration micro-batches (--nsamples {n}, --batch-size {b}) "
            f"cannot be shared by {world.size} processes: give each at least one, "
            "with more --nsamples, a smaller --batch-size or fewer processes"
        )
    return world.share(batches)


def _cpu_threads(cfg, device: torch.device) -> int | None:
    """Intra-op threads for a CPU run. CPU kernels split their sums by thread count, which
    changes the low bits of the result, so a resumed run takes the count its run began
    with: the output is then byte-identical to an uninterrupted run."""
    if device.type != "cpu":
        return None
    resuming = cfg.journal and not cfg.restart and cfg.run_dir.is_dir()
    earlier = (read_manifest(cfg.run_dir) if resuming else None) or {}
    if earlier.get("cpu_threads") and earlier["cpu_threads"] != torch.get_num_threads():
        log.info("using %d CPU threads, as the run began with", earlier["cpu_threads"])
    return earlier.get("cpu_threads") or torch.get_num_threads()


def _check_disk(cfg, disk: dict[str, int]) -> None:
    parts = ", ".join(f"{k} {size_text(v)}" for k, v in disk.items() if v)
    for where, need, what in disk_needs(cfg, disk):
        free = shutil.disk_usage(where).free
        if need > free:
            raise NotEnoughResources(
                f"not enough disk space for the {what} files: this run still needs about "
                f"{size_text(need)} on the filesystem of {where} ({parts} in all), and "
                f"{size_text(free)} is free there; free some space, or choose a --workdir "
                "or --out on a larger filesystem"
            )
