"""The settings of a compress run, each declared once: its type, its default and its
command-line help, from which `streamsvd compress`'s options are made (cli.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .activations import KEEP
from .allocate import ALLOCATIONS
from .errors import StreamSVDError
from .factorize import METHODS
from .model import COMPUTE_DTYPES
from .prepare import calibration_batches
from .quantize import BITS, GROUP_SIZES, QuantSettings
from .refine import (
    DEFAULT_BATCH,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_TARGET,
    PRECISIONS,
    REFINE_MIN_WINDOWS,
    RefineSettings,
    held_out_steps,
    holdout_windows,
    micro_batches,
    step_windows,
)

DEFAULT_METHOD = "svdllm-a"
DEFAULT_ALLOCATION = "uniform"


def option(default=dataclasses.MISSING, help: str = "", **flag):
    """A setting and its command-line option: `help` (where "%(default)s" names the
    default), and argparse's keywords that its type and default do not already say
    (choices, metavar, the option's name as `flag`). Bools are switches: --X where the
    default is off, --X/--no-X otherwise."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def _group_sizes(bits: int) -> str:
    return ", ".join(map(str, GROUP_SIZES[bits]))


@dataclass(frozen=True)
class CompressConfig:
    model: str = option(
        help="checkpoint folder (safetensors) or hub id (org/name: from the local Hugging Face "
        "cache, else downloaded into it); `streamsvd demo` compresses the bundled "
        "SmolLM2-135M-Instruct"
    )
    out: str = option(help="output directory (must not exist yet)")
    ratio: float = option(
        0.2,
        "fraction of the decoder's linear-layer parameters to remove (default %(default)s): "
        "of each layer's with --allocation uniform, spread unevenly by the others",
    )
    method: str = option(
        DEFAULT_METHOD,
        "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + " (default %(default)s)",
        choices=list(METHODS),
    )
    allocation: str = option(
        DEFAULT_ALLOCATION,
        "how the ratio's parameter budget is spread over the linears. uniform: the same ratio "
        "for each; grouped: SVD-LLM V2's per-type allocation; residual: by each error's weight "
        "on the residual stream. Other than uniform, a first pass over the checkpoint reads "
        "every matrix's spectrum (default %(default)s)",
        choices=list(ALLOCATIONS),
    )
    sequential: bool = option(
        True,
        "within each block, compress q/k/v, then o, then gate/up, then down, each taking its "
        "compressed-stream statistics after the ones before it are compressed (one pass over "
        "the calibration batches per stage; the default, chosen on held-out text: "
        "docs/method.md, Rank allocation). --no-sequential takes "
        "every linear's statistics from one run of the still-dense block: fewer forward "
        "passes, more memory for sums",
    )
    refine_epochs: int = option(
        DEFAULT_EPOCHS,
        "after each block's closed form, train its low-rank factors for N epochs over the "
        "calibration batches so that the compressed block, fed the compressed model's inputs, "
        "reproduces the original block's outputs (default %(default)s, with "
        f"{DEFAULT_BATCH}-window steps at lr {DEFAULT_LR:g}; 0: the closed form alone; how "
        "the default was chosen, and what fewer epochs save and cost: docs/method.md, Block "
        "refinement)",
        metavar="N",
    )
    refine_lr: float = option(
        DEFAULT_LR, "refinement's peak AdamW learning rate (default %(default)s)"
    )
    refine_target: float = option(
        DEFAULT_TARGET,
        "refinement's target is LAMBDA times the original model's block outputs plus 1 - "
        "LAMBDA times the original block's outputs on the compressed model's inputs; 1 asks "
        "each block to cancel all the error before it, as svdllm-a's λ does for one layer "
        "(default %(default)s)",
        metavar="LAMBDA",
    )
    refine_batch: int | None = option(
        None,
        "windows per refinement step, cut from the calibration batches (at most --batch-size; "
        f"default {DEFAULT_BATCH}, or --batch-size where smaller). "
        "Smaller steps, more of them, trained a block further on held-out text "
        "(benchmarks/results/refine_probe.md)",
        metavar="N",
    )
    refine_holdout: int | None = option(
        None,
        "hold the last N calibration windows out of refinement's training (whole refinement "
        "steps, fewer than --nsamples): each block is scored on them before its first epoch "
        "and after each, and the factors that score best are kept; where no epoch beats the "
        "closed form, refinement is declined for that block. 0: train on every window and "
        f"keep the last epoch (default: 0 from {REFINE_MIN_WINDOWS} windows, where holding "
        "out lost; below, the most whole steps up to a quarter of the windows)",
        metavar="N",
    )
    refine_norms: bool = option(
        False,
        "refinement also trains the block's norms and the factorised linears' biases "
        "(default: factors only)",
    )
    refine_precision: str = option(
        "float32",
        "the precision of refinement's forward and backward: float32, or bfloat16 (torch's "
        "autocast: matrix products in bf16, factors and optimizer state in float32; on a GPU "
        "many times faster, on CPUs without native bf16 slower; its effect on quality: "
        "docs/method.md, Block refinement) (default %(default)s)",
        choices=PRECISIONS,
    )
    refine_streams: str = option(
        "auto",
        "where refinement keeps each block's two streams between its epochs: held on the "
        "device, held in host memory (pinned on a GPU), or read from the store on every "
        "epoch, a step ahead of the compute; the output is the same bytes in every case "
        "(default %(default)s: the first that the memory plan fits, as --dry-run says; "
        "docs/memory.md)",
        choices=KEEP,
    )
    bits: int | None = option(
        None,
        "store the factors in this many bits: GPTQ on each factor pair, in the stream, after "
        "the block is factorised (and refined); written as compressed-tensors pack-quantized, "
        "which transformers (with compressed-tensors) and vLLM load (default: unquantized)",
        choices=BITS,
    )
    group_size: int | None = option(
        None,
        "one scale per N input columns of each factor row (default: the first of "
        f"{_group_sizes(4)} at 4 bits, or of {_group_sizes(8)} at 8 bits, that divides every "
        "layer's input width and is no larger than any rank; ranks are rounded to whole "
        "groups)",
        metavar="N",
    )
    quant_symmetric: bool = option(
        True,
        "with --bits, a zero point per group besides its scale (default symmetric: "
        "compressed-tensors 0.20 loads asymmetric packed weights in streamsvd only)",
        flag="--asymmetric",
        action="store_false",
    )
    calib: str | None = option(
        None,
        "calibration text: a local text file, or a Hugging Face dataset "
        "'name[:config[:split]]' when online (default: docstrings of the Python standard "
        "library, offline)",
    )
    nsamples: int = option(64, "calibration windows (default %(default)s)")
    seqlen: int = option(512, "tokens per window (default %(default)s)")
    seed: int = option(0, "seed for drawing windows (default %(default)s)")
    allow_few_tokens: bool = option(
        False,
        "go on with fewer calibration tokens (--nsamples × --seqlen) than the widest layer has "
        "inputs, which is refused otherwise: the statistics are then rank-deficient and the "
        "output far off (docs/reliability.md)",
    )
    bos_windows: bool | None = option(
        None,
        "start every calibration window with the tokenizer's BOS token (default: when the "
        "tokenizer adds one to every text, as Llama, Gemma and Mistral do, so that "
        "calibration sees the first position as the model does)",
    )
    batch_size: int = option(8, "windows per forward (default %(default)s)")
    # the command line's default is cuda where there is one (cli._add_device)
    device: str = option("cpu", "where blocks run", choices=["cpu", "cuda"])
    compute_dtype: str = option(
        "auto",
        "dtype the blocks and activations run in; the output keeps the checkpoint's. auto "
        "(default): float32 for float16 checkpoints, whose activations can overflow float16's "
        "range (65504), and for bf16 ones on a CPU (slow there without native bf16); else the "
        "checkpoint's own",
        choices=list(COMPUTE_DTYPES),
    )
    workdir: str | None = option(
        None,
        "run directory for activations, shards and the journal (default: OUT.work); deleted "
        "when the run finishes",
    )
    dense: bool = option(False, "write W = A·B as a standard checkpoint instead of the two factors")
    restart: bool = option(
        False, "discard an interrupted run in the workdir instead of resuming it"
    )
    # Not on the command line. False: no journal, fsyncs or checksums, so not resumable. For
    # measuring what the commit protocol costs (benchmarks/journal_overhead.py at c04e663), not
    # for real runs.
    journal: bool = True
    # Not on the command line. Read the next block's tensors into the page cache while this
    # one computes.
    prefetch: bool = True

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise StreamSVDError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise StreamSVDError(f"unknown method {self.method!r}; choose from {list(METHODS)}")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise StreamSVDError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise StreamSVDError(
                f"compute dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )
        if self.allocation not in ALLOCATIONS:
            raise StreamSVDError(
                f"unknown allocation {self.allocation!r}; choose from {list(ALLOCATIONS)}"
            )
        if self.allocation != "uniform" and not METHODS[self.method].needs:
            raise StreamSVDError(
                f"allocation {self.allocation!r} reads each matrix's spectrum on calibration "
                f"text, which method {self.method!r} does not take: use --allocation uniform "
                "or a calibrated method"
            )
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise StreamSVDError(f"device must be cpu or cuda, got {self.device!r}")
        refine = self.refine  # checks the refinement settings
        if self.refine_batch is not None and not 1 <= self.refine_batch <= self.batch_size:
            raise StreamSVDError(
                f"--refine-batch must be 1 to --batch-size ({self.batch_size}) windows, got "
                f"{self.refine_batch}: refinement's steps are cut from the calibration batches"
            )
        if self.refine_streams not in KEEP:
            raise StreamSVDError(
                f"--refine-streams must be one of {', '.join(KEEP)}, got {self.refine_streams!r}"
            )
        if self.refine_streams == "device" and not self.device.startswith("cuda"):
            raise StreamSVDError(
                "--refine-streams device holds the streams in GPU memory: it needs --device "
                "cuda (on a CPU, host memory is the device: --refine-streams host)"
            )
        if refine.holdout:  # whole steps at the end, at least one left to train on
            held_out_steps(micro_batches(calibration_batches(self), refine.batch),
                           refine.holdout)  # fmt: skip
        if self.bits is not None:
            QuantSettings(self.bits, self.group_size or 128, self.quant_symmetric)  # checks
            if self.dense:
                raise StreamSVDError(
                    "--dense writes each layer as one dense matrix, --bits quantizes the "
                    "factors: choose one (streamsvd export-dense dequantizes a quantized output)"
                )

    @property
    def refine(self) -> RefineSettings:
        batch = step_windows(self.refine_batch, self.batch_size)
        steps = micro_batches(calibration_batches(self), batch)
        holdout = holdout_windows(self.refine_holdout, self.refine_epochs, steps)
        return RefineSettings(self.refine_epochs, self.refine_lr, self.refine_norms, self.seed,
                              self.refine_target, batch, holdout,
                              self.refine_precision)  # fmt: skip

    @property
    def streams(self) -> tuple[str, ...]:
        """The activation streams the run carries: the method's, and both when blocks are
        refined (the original stream's outputs are the target, the compressed stream's
        inputs what the refined block is fed)."""
        both = self.refine_epochs or self.bits  # quantization reads the compressed stream
        return ("orig", "comp") if both else METHODS[self.method].streams

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(f"{self.out}.work")
