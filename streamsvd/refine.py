"""Block refinement: after a block's linears are factorised in closed form, train the
block's low-rank factors by gradient so that the compressed block, fed the compressed
model's own inputs X′, reproduces the dense block's outputs:

    minimise  mean ‖λ·block(X) + (1 − λ)·block(X′) − block′(X′)‖²   over the calibration tokens.

The closed forms (svdllm-w, -u, -a) minimise each linear's own error one at a time; the
block's output passes every linear's error through attention, the MLP's nonlinearity and
the residual stream, which no per-linear objective sees. The target mixes, as svdllm-a's
objective does for one linear (factorize.svdllm_a), the original model's outputs block(X)
with the dense block's outputs on the compressed stream: at λ = 1 the block is asked to
cancel all the error earlier blocks handed it, which it cannot predict from X′, and on
held-out text that made SmolLM2 worse than no refinement (benchmarks/results/
refine_heldout.md). The dense block's outputs on X′ are computed once per block, before
training, and held until it ends. Both streams are on disk; where the memory plan fits
them (plan.refine_keep), each is read once and held across the epochs on the device or in
host memory, else read a micro-batch at a time, a step ahead of the compute
(activations.HeldWindows). The training memory is one block's trainable parameters, their
gradients and AdamW's two moments, one micro-batch's activations for backward, those
outputs, and the streams where held.

Training keeps the factors and AdamW's state in float32 whatever the compute dtype
(float64 for a float64 checkpoint, whose values float32 would round); its forward runs in
float32 too, or with `RefineSettings.precision` "bfloat16" in bf16 autocast (matrix products
in bf16 on float32 factors: on a GPU's tensor cores, many times float32's rate), AdamW
without weight decay, linear warm-up then cosine decay to zero, gradients clipped to norm 1.
The micro-batch order is shuffled per epoch by a generator seeded from the run's seed and
the block index, so a rerun of a block (resume) repeats it exactly. What the defaults are
and how they were chosen on held-out text: benchmarks/refine.py and
benchmarks/results/refine_heldout.md.

With a holdout (`RefineSettings.holdout`, off by default) the last calibration windows are
not trained on: the block is scored on them before the first epoch (the closed form) and
after each, and the factors that score best are kept, as AutoRound keeps its best
iteration. Where no epoch beats the closed form, refinement is declined and the block is
left exactly as the closed form made it: too little calibration text cannot make a block
worse than no refinement.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from . import faults
from .errors import StreamSVDError
from .modeling import LowRankLinear
from .world import World

Read = Callable[[int, int], torch.Tensor]  # (start, stop) -> a micro-batch on the device
Ahead = Callable[[list[tuple[int, int]]], None]  # the (start, stop) this rank's pass reads next

# 2-window steps at lr 3e-4 beat the closed form on held-out text at ratios 0.2, 0.4 and
# 0.6 (benchmarks/results/refine_heldout.md), so refinement is on by default, as issue 20
# asked of a setting that wins at all three; 2 epochs of 8-window steps at 1e-4 lost at 0.6,
# 8 epochs of 2-window steps at 1e-3 lost at 0.2. Epochs: 4, then 8, then 16 each won at all
# three over the fewer (16 against 4: -5.3%, -7.1%, -11.8%), each doubling the refinement's
# time; 16 is the default. λ was chosen at 0.4, the step size on single blocks first
# (refine_probe.md).
DEFAULT_EPOCHS = 16
DEFAULT_LR = 3e-4
DEFAULT_BATCH = 2  # windows per optimiser step, or the calibration batch where smaller
DEFAULT_TARGET = 0.25  # λ, as svdllm-a's UPDATE_FRACTION
WARMUP = 0.1  # share of the steps spent warming up (at least one step)
CLIP = 1.0  # gradient norm
PRECISIONS = ("float32", "bfloat16")  # of refinement's forward: float32, or bf16 autocast


@dataclass(frozen=True)
class RefineSettings:
    epochs: int = DEFAULT_EPOCHS  # 0: no refinement
    lr: float = DEFAULT_LR
    norms: bool = False  # also train the block's norms and the factorised linears' biases
    seed: int = 0
    target: float = DEFAULT_TARGET  # λ: the original outputs' share of the target
    batch: int = DEFAULT_BATCH  # windows per optimiser step; at most the run's calibration batch
    holdout: int = 0  # the last windows, scored not trained on; 0: keep the last epoch
    precision: str = "float32"  # the forward's: "bfloat16" runs it in bf16 autocast

    def __post_init__(self):
        if self.epochs < 0:
            raise StreamSVDError(f"refine epochs must be 0 or more, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise StreamSVDError(f"refine learning rate must be positive, got {self.lr}")
        if not 0 <= self.target <= 1:
            raise StreamSVDError(f"refine target λ must be in [0, 1], got {self.target}")
        if self.batch < 1:
            raise StreamSVDError(f"refine batch must be at least 1 window, got {self.batch}")
        if self.holdout < 0:
            raise StreamSVDError(f"refine holdout must be 0 or more windows, got {self.holdout}")
        if self.holdout and not self.epochs:
            raise StreamSVDError("a refine holdout needs refinement: --refine-epochs 1 or more")
        if self.precision not in PRECISIONS:
            raise StreamSVDError(
                f"refine precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )


def step_windows(refine_batch: int | None, batch_size: int) -> int:
    """Windows per refinement step: as asked, else DEFAULT_BATCH, never more than a
    calibration batch holds."""
    return refine_batch or min(DEFAULT_BATCH, batch_size)


def micro_batches(batches: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Each calibration batch (start, stop) cut into pieces of at most `size` windows:
    refinement's steps. Smaller steps, more of them: on held-out text a block's error fell
    further with more, smaller steps at the same epochs (benchmarks/results/
    refine_probe.md). At the calibration batch size or more, the batches as they are."""
    return [(a, min(a + size, stop)) for start, stop in batches for a in range(start, stop, size)]


def holdout_choices(steps: list[tuple[int, int]]) -> list[int]:
    """The windows that whole steps at the end of `steps` can hold out while leaving at
    least one step to train on, fewest first."""
    held, ends = 0, []
    for start, stop in reversed(steps[1:]):
        held += stop - start
        ends.append(held)
    return ends


def held_out_steps(steps: list[tuple[int, int]], windows: int) -> int:
    """How many steps at the end of `steps` (every rank's, in rank order: the same list on
    every rank) hold the last `windows` windows. Refused unless that is a whole number of
    steps and leaves at least one step to train on."""
    if windows == 0:
        return 0
    ends = holdout_choices(steps)
    if windows in ends:
        return ends.index(windows) + 1
    total = sum(stop - start for start, stop in steps)
    raise StreamSVDError(
        f"--refine-holdout {windows}: refinement's {len(steps)} steps hold {total} calibration "
        "windows; the held-out ones must be whole steps at the end and leave at least one "
        f"step to train on: choose one of {', '.join(map(str, ends)) or 'none'} (more "
        "--nsamples, or a smaller --refine-batch, for more choices)"
    )


# Refinement was measured to beat the closed form on held-out text when trained on 32
# windows (of 512 tokens): benchmarks/results/refine_heldout.md calibrates on 32 × 512 at
# ratios 0.2, 0.4 and 0.6, refine_probe*.md trains blocks on 32 windows and scores them on
# 16 others. On 8 windows (of 128 tokens) its 16 epochs made SmolLM2 worse than no
# refinement (issue 41). Fewer than 32 is unmeasured ground, so it is warned about,
# and refinement holds windows out by default there (`holdout_windows`).
REFINE_MIN_WINDOWS = 32


def holdout_windows(asked: int | None, epochs: int, steps: list[tuple[int, int]]) -> int:
    """Windows refinement holds out: as asked, else none without refinement or with
    REFINE_MIN_WINDOWS or more (measured there, holding 8 out lost on P1 and on held-out
    text: docs/method.md), else the most whole steps at the end holding at most a quarter
    of the windows (a step always left to train on): on too little calibration, a block
    then keeps its best epoch on them, or its closed form where no epoch beats it."""
    if asked is not None:
        return asked
    total = sum(stop - start for start, stop in steps)
    if not epochs or total >= REFINE_MIN_WINDOWS:
        return 0
    return max((held for held in holdout_choices(steps) if held <= total // 4), default=0)


def rank_piece(start: int, stop: int, rank: int, ranks: int) -> tuple[int, int]:
    """The windows of a step (start, stop) that `rank` of `ranks` trains on, as offsets
    into the step: contiguous pieces whose sizes differ by at most one (empty where the
    step has fewer windows than there are ranks)."""
    per, extra = divmod(stop - start, ranks)
    a = rank * per + min(rank, extra)
    return a, a + per + (rank < extra)


def piece_sizes(steps: list[tuple[int, int]], ranks: int) -> set[int]:
    """Every non-empty piece size the ranks train on: the block needs its arguments
    (position embeddings, mask) for each."""
    pieces = (rank_piece(a, b, r, ranks) for a, b in steps for r in range(ranks))
    return {b - a for a, b in pieces if b > a}


def trainable_names(block: nn.Module, norms: bool) -> list[str]:
    """The parameters refinement trains (relative names): every low-rank factor, and with
    `norms` the block's norm weights and the low-rank linears' biases. Dense linears that
    compression left alone (a router, a layer too narrow to factorise) stay as they are."""
    names = []
    for module_name, module in block.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, LowRankLinear):
            names += [f"{prefix}down.weight", f"{prefix}up.weight"]
            if norms and module.up.bias is not None:
                names.append(f"{prefix}up.bias")
        elif norms and "norm" in type(module).__name__.lower():
            names += [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)]
    return names


def trainable_bytes(params: int, holdout: bool = False) -> int:
    """Float32 parameter, gradient and AdamW's two moments; with a holdout, also the copy
    of the best factors seen."""
    return 4 * (5 if holdout else 4) * params


def saved_values_per_token(hidden: int, intermediate: int, ranks: int) -> int:
    """Float32 values one token's forward through a Llama block keeps for the backward
    pass, in hidden-wide vectors: the input and its norm (2), q/k/v (5/3 with GQA's
    narrower k and v), rotary's saved halves and outputs (3), k and v repeated to every
    head (2), attention's output and its contiguous copy (2), the residual sum and its norm
    (2): 14 in all; in intermediate-wide ones: gate, up, the activation and the product
    (4); and every low-rank factor's rank-wide output (`ranks`, their sum). Measured
    against SmolLM2's refine phase on CPU and a 7B-width block's on an H200."""
    return 14 * hidden + 4 * intermediate + ranks


def refine_block(block: nn.Module, arguments: dict[int, dict], batches: list[tuple[int, int]],
                 read_inputs: Read, read_targets: Read, settings: RefineSettings, index: int,
                 dtype: torch.dtype, world: World | None = None,
                 ahead: Ahead | None = None) -> dict:  # fmt: skip
    """Train the block in place. Each trained parameter ends rounded to `dtype` (the
    output's), in the dtype it had before, so that the block runs the values written;
    everything else ends as it was. Returns the mean loss of the first and the last epoch,
    the held-out loss before the first epoch and after each (empty without a holdout), the
    epoch kept (0: the closed form, refinement declined; without a holdout the last) and
    the names of the parameters it changed (none where declined).

    With several ranks (world.py), data-parallel over each step's windows: the ranks
    take the steps one process would (every rank's micro-batches, in rank order, shuffled
    by the same generator); the rank that holds a step's windows in its store broadcasts
    them, each rank trains on its piece (rank_piece), and the gradients are averaged over
    the step's windows before every rank takes the same optimiser step. N processes thus
    take one process's steps, up to rounding. The held-out loss is summed over the ranks'
    pieces as the training loss is: every rank keeps the same epoch. `ahead`: told what
    each pass will read (a streamed source reads ahead of the compute)."""
    world = world or World()
    names = trainable_names(block, settings.norms)
    before = {n: t.dtype for n, t in [*block.named_parameters(), *block.named_buffers()]}
    # float32, unless a float64 block would be rounded by it (an idle expert's untrained
    # factors must come back as they went in)
    wide = any(before[n] == torch.float64 for n in names)
    train = torch.float64 if wide else torch.float32
    autocast = torch.bfloat16 if settings.precision == "bfloat16" and not wide else None
    with torch.inference_mode(False), torch.enable_grad():
        # the block and its arguments were made in inference mode; autograd needs copies
        _retensor(block, lambda n, t: t.to(train, copy=True), set(names))
        arguments = {size: _clone_tree(a, train) for size, a in arguments.items()}
        params = [block.get_parameter(n) for n in names]
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        everyone = world.gather(batches)  # in rank order: one process's list, concatenated
        steps = [b for mine in everyone for b in mine]
        owners = [r for r, mine in enumerate(everyone) for _ in mine]
        trained_on = len(steps) - held_out_steps(steps, settings.holdout)
        schedule = warmup_cosine(optimizer, settings.epochs * trained_on)
        fetch = _Fetch(read_inputs, read_targets, batches[0], train, world, ahead)
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
        step_with = (params, optimizer, schedule, world)
        held_out = list(zip(steps[trained_on:], owners[trained_on:], strict=True))
        score = functools.partial(_heldout_loss, block, arguments, fetch, held_out, world)
        heldout_loss, overflowed = [], False
        if held_out:  # the closed form's
            loss, overflowed = score()
            heldout_loss.append(loss)
        best = [p.detach().clone() for p in params] if held_out else None
        epoch_loss, kept = [], 0
        for epoch in range(1, settings.epochs + 1):
            order = torch.randperm(trained_on, generator=gen).tolist()
            loss, nan = _epoch(block, arguments, fetch, steps, owners, order, step_with,
                               autocast)  # fmt: skip
            epoch_loss.append(loss)
            overflowed |= nan
            if held_out:
                loss, nan = score()
                heldout_loss.append(loss)
                overflowed |= nan
                if loss < heldout_loss[kept]:  # ties: the earlier, at the last the closed form
                    kept, best = epoch, [p.detach().clone() for p in params]
            faults.point("refine", index)
        if held_out:
            for p, value in zip(params, best, strict=True):
                p.data.copy_(value)
        else:
            kept = settings.epochs
        for p in params:  # the same on every rank already; rank 0's, to be sure
            world.broadcast_(p.data, 0)
        del optimizer, params, step_with, best
        _refuse_nonfinite(index, overflowed, epoch_loss)
        changed = set(names) if kept else set()  # declined: the closed form's bytes back
        _retensor(block, lambda n, t: (t.to(dtype) if n in changed else t).to(before[n]), set())
    return {"loss_first_epoch": epoch_loss[0], "loss_last_epoch": epoch_loss[-1],
            "heldout_loss": heldout_loss, "kept_epoch": kept,
            "trained": [n for n in names if n in changed]}  # fmt: skip


class _Fetch:
    """A step's inputs and targets, in the training dtype: this rank's piece of them.
    One process reads them; with several, the rank whose store holds them reads and
    broadcasts them (the others learn their shape from their own first micro-batch)."""

    def __init__(self, read_inputs: Read, read_targets: Read, first: tuple[int, int],
                 dtype: torch.dtype, world: World, ahead: Ahead | None = None):  # fmt: skip
        self.read_inputs, self.read_targets, self.dtype, self.world = (
            read_inputs, read_targets, dtype, world)  # fmt: skip
        self.ahead = ahead
        if world.distributed:
            probe = read_inputs(*first)
            self.window_shape, self.device = probe.shape[1:], probe.device

    def __call__(self, start: int, stop: int, owner: int) -> tuple[torch.Tensor, torch.Tensor]:
        world = self.world
        if not world.distributed:
            return self._read(start, stop)
        if world.rank == owner:
            x, y = self._read(start, stop)
        else:
            shape = (stop - start, *self.window_shape)
            x, y = (torch.empty(shape, dtype=self.dtype, device=self.device) for _ in "xy")
        world.broadcast_(x, owner, "refinement's windows")
        world.broadcast_(y, owner, "refinement's windows")
        a, b = rank_piece(start, stop, world.rank, world.size)
        return x[a:b], y[a:b]

    def expect(self, windows: list[tuple[int, int]], owners: list[int]) -> None:
        """A pass will fetch `windows` (with their owners) in this order: tell `ahead` the
        ones this rank reads."""
        if self.ahead is not None:
            mine = self.world.rank if self.world.distributed else None
            self.ahead([w for w, o in zip(windows, owners, strict=True) if mine in (None, o)])

    def _read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.read_inputs(start, stop).to(self.dtype)
        return x, self.read_targets(start, stop).to(self.dtype)


def _epoch(block: nn.Module, arguments: dict[int, dict], fetch: _Fetch,
           steps: list[tuple[int, int]], owners: list[int], order: list[int],
           step_with: tuple, autocast: torch.dtype | None) -> tuple[float, bool]:  # fmt: skip
    """One pass over the steps in `order`, an optimiser step each, the forward in
    `autocast` (`mixed_precision`): the mean training loss over every rank's windows, and
    whether inputs or targets held NaN or inf (not the optimiser's doing)."""
    world = step_with[-1]
    tally = _Tally()
    fetch.expect([steps[k] for k in order], [owners[k] for k in order])
    for k in order:
        start, stop = steps[k]
        x, y = fetch(start, stop, owners[k])
        if len(x) == 0:  # fewer windows in this step than ranks: adds nothing
            _take_step(*step_with, windows=0)
            continue
        loss = _loss(block, arguments, x, y, autocast)
        loss.backward()  # in the dtypes the forward chose
        _take_step(*step_with, windows=len(x))
        tally.add(loss, x, y)
        del x, y, loss
    total, tokens, overflowed = tally.read()
    return _mean_over_ranks(total, tokens, world), overflowed


def _heldout_loss(block: nn.Module, arguments: dict[int, dict], fetch: _Fetch,
                  held_out: list[tuple[tuple[int, int], int]],
                  world: World) -> tuple[float, bool]:  # fmt: skip
    """The block's mean loss on the held-out steps ((start, stop), owner), the training
    objective without gradients, over every rank's pieces; and whether their inputs or
    targets held NaN or inf."""
    tally = _Tally()
    fetch.expect([w for w, _ in held_out], [o for _, o in held_out])
    with torch.no_grad():
        for (start, stop), owner in held_out:
            x, y = fetch(start, stop, owner)
            if len(x) == 0:  # fewer windows in this step than ranks
                continue
            tally.add(_loss(block, arguments, x, y), x, y)
    total, windows, overflowed = tally.read()
    return _mean_over_ranks(total, windows, world), overflowed


class _Tally:
    """A loss summed over windows, and whether a non-finite loss came from inputs or
    targets holding NaN or inf, kept on the device and read once per pass: a step never
    waits for the host. (float64 sums of float32 losses: the same bytes as Python floats.)"""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.windows = 0
        self.bad_inputs: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = loss.detach()
        part = loss.double() * len(x)
        bad = ~torch.isfinite(loss) & ~(torch.isfinite(x).all() & torch.isfinite(y).all())
        self.total = part if self.total is None else self.total + part
        self.bad_inputs = bad if self.bad_inputs is None else self.bad_inputs | bad
        self.windows += len(x)

    def read(self) -> tuple[float, int, bool]:
        if self.total is None:
            return 0.0, 0, False
        return self.total.item(), self.windows, bool(self.bad_inputs)


def _loss(block: nn.Module, arguments: dict[int, dict], x: torch.Tensor, y: torch.Tensor,
          autocast: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """The block's mean squared error against the targets; its forward in `autocast`
    (None: as the block is), the error itself in the targets' dtype."""
    with mixed_precision(x.device.type, autocast):
        out = block(x, **arguments[len(x)])
    out = out[0] if isinstance(out, tuple) else out
    return nn.functional.mse_loss(out.to(y.dtype), y)


def mixed_precision(device_type: str, dtype: torch.dtype | None):
    """The context refinement's training forward runs in: torch's autocast to `dtype`
    (matrix products in it, on float32 factors), or none. The held-out score always runs
    without: it chooses the epoch kept, at full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def _mean_over_ranks(total: float, windows: int, world: World) -> float:
    """Sum over the ranks of a loss summed over windows, by the windows' count (every rank
    gets the same bytes)."""
    if world.distributed:
        sums = torch.tensor([total, windows], dtype=torch.float64)
        world.sum_([sums])
        total, windows = sums.tolist()
    return total / windows


def _refuse_nonfinite(index: int, overflowed: bool, epoch_loss: list[float]) -> None:
    """Stop where inputs or targets held NaN or inf, or the training loss did."""
    if overflowed:
        raise StreamSVDError(
            f"block {index + 1}: its inputs or targets hold NaN or inf: the activations "
            "overflowed; run the blocks in a wider dtype (compress --compute-dtype float32)"
        )
    if not all(math.isfinite(v) for v in epoch_loss):
        raise StreamSVDError(
            f"block {index + 1}: refinement diverged (loss {epoch_loss}); run with a lower "
            "--refine-lr, or --refine-epochs 0"
        )


def _take_step(params, optimizer, schedule, world: World, windows: int) -> None:
    """One optimiser step on the gradients averaged over every rank's `windows`."""
    _average_gradients(params, windows, world)
    nn.utils.clip_grad_norm_(params, CLIP)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def _average_gradients(params: list[nn.Parameter], windows: int, world: World) -> None:
    """Gradients of the mean loss over the step's windows on every rank (this rank's
    weighted by its `windows`); one process: as they are."""
    if not world.distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # every gradient and the window count in one buffer: one collective a step
    flat = torch.cat([p.grad.reshape(-1) * windows for p in params]
                     + [torch.tensor([float(windows)], device=params[0].device)])  # fmt: skip
    world.sum_([flat])
    count, offset = flat[-1], 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p) / count)
        offset += p.numel()


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int):
    """The learning rate rises linearly over the first WARMUP of `steps` (at least one),
    then decays to zero along a cosine."""
    warmup = max(1, round(WARMUP * steps))

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _retensor(block: nn.Module, convert, trainable: set[str]) -> None:
    """Replace every floating parameter and buffer of the block by convert(name, it), as
    a parameter that requires grad when its name is in `trainable`."""
    for module_name, module in block.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point():
                full = f"{prefix}{name}"
                module._parameters[name] = nn.Parameter(
                    convert(full, p.detach()), requires_grad=full in trainable
                )
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point():
                module._buffers[name] = convert(f"{prefix}{name}", b)


def _clone_tree(value, dtype: torch.dtype):
    """Tensors in nested dicts/tuples/lists cloned (outside inference mode), float ones in
    `dtype` to match the training block."""

    def clone(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone()

    return tree_map_only(torch.Tensor, clone, value)
