"""One block step: a block's weights and its input streams in; statistics, factors,
spectra and the streams' next batches out. No journal and no files: the run
(pipeline.py) hands the step its batches through `read` and takes the next stream's
batches through `write`, then commits what the step returns. Each pass of a run (the
spectra pass that rank allocation needs, the compression pass) is a short loop over blocks
calling the same step.

Two ways to take a block's statistics:
- together (--no-sequential): every linear's inputs come from one run of the still-dense
  block;
- sequential (the default): the block's linears are compressed in the order the block
  computes them (q/k/v, then o, then gate/up, then down), and each stage's
  compressed-stream inputs come after the stages before it are compressed, as GPTQ's
  true-sequential mode does. It costs one pass over the calibration batches per stage
  instead of one in all.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import faults
from .activations import HeldWindows
from .experts import same_routing
from .factorize import METHODS, Clock, Method, untimed
from .model import capture_inputs, run_block, shared_input_groups
from .modeling import LowRankLinear, linear_shape, linear_weight, replace_module
from .quantize import (
    QuantSettings,
    gptq,
    inverse_factor,
    packed_tensors,
    rank_rotation,
    unpacked_weight,
)
from .refine import RefineSettings, micro_batches, refine_block
from .stats import InputStats, Rescues, release_points
from .world import World

Read = Callable[[str, int, int], torch.Tensor]  # (stream, start, stop) -> batch on the device
Write = Callable[[str, int, torch.Tensor], None]  # (stream, start, batch)

PLAIN = METHODS["svd"]  # for a linear without calibration statistics


@dataclass
class BlockStep:
    """A filled block (weights on the device) and how to run it; `linears` are the ones
    compression factorises, in the block's registration order."""

    block: nn.Module
    linears: dict[str, nn.Module]
    arguments: dict[int, dict]  # the block's keyword arguments by batch size
    batches: list[tuple[int, int]]  # (start, stop) of each calibration micro-batch
    device: torch.device
    clock: Clock = untimed  # stage name -> context manager timing it (report.StageTimer)
    index: int = 0  # the block's index, for fault points
    dense: dict[str, nn.Module] = field(default_factory=dict)  # kept for refine's target
    world: World = field(default_factory=World)  # `batches` are this rank's share
    # The whitening's ridge, a fraction of each Gram's mean diagonal (stats.damped_cholesky_).
    # compress --bits sets GPTQ's 1%: a nearly singular compressed-stream Gram (as after a
    # low-rank v_proj, the o_proj inputs) otherwise gives B = Σ^½ Vᵀ L⁻¹ entries thousands
    # of times the rest, and their rounding error swamps the layer (docs/quantization.md).
    whitening_damping: float = 0.0
    # Where the Grams' Cholesky damping is counted (stats.damped_cholesky_), for the run to
    # journal and report; None: an escalation is logged as it happens (the spectra pass).
    rescues: Rescues | None = None

    # -- statistics ------------------------------------------------------------------------
    def statistics(self, needs: frozenset[str], read: Read, write: Write | None,
                   names: list[str] | None = None, dense: dict[str, nn.Module] | None = None,
                   dealt: bool = False) -> dict[str, InputStats]:  # fmt: skip
        """Float64 sums of the inputs of `names` (default: every factorised linear), shared
        within groups that read the same tensor; `dealt`: only for the ranks that factorise
        the group's linears (`factorise` deals `names` out), the others keep token counts
        alone. The original stream runs the block with
        `dense` modules put back in place of compressed ones, so that it stays the original
        model's; with `write`, its outputs are the next block's original-stream inputs.
        Both streams reach the experts the original stream's router chose, so that an
        expert's statistics pair each token's two inputs."""
        names = list(self.linears) if names is None else names
        stats: dict[str, InputStats] = {}
        for start, stop in self.batches:
            with self.clock("forward"), same_routing(self.block):
                with _swapped(self.block, dense or {}):
                    x = read("orig", start, stop)
                    with capture_inputs(self.block, names) as seen:
                        if write is not None:
                            write("orig", start, run_block(self.block, x, self.arguments))
                        else:
                            _run_until_seen(self.block, x, self.arguments, names, seen)
                    del x
                seen_c = {}
                if needs & {"comp", "cross"}:
                    xc = read("comp", start, stop)
                    with capture_inputs(self.block, names) as seen_c:
                        _run_until_seen(self.block, xc, self.arguments, names, seen_c)
                    del xc
            with self.clock("stats"):
                self._add_batch(stats, needs, seen, seen_c)
            del seen, seen_c
        if self.world.distributed:
            with self.clock("communicate"):
                self._add_up(stats, needs, names if dealt else None)
        return stats

    def _add_batch(self, stats: dict[str, InputStats], needs: frozenset[str], seen: dict,
                   seen_c: dict) -> None:  # fmt: skip
        """Add one batch's captured inputs to the sums: `seen` on the original stream (or,
        where only the compressed stream is summed, the compressed one), `seen_c` on the
        compressed stream. Linears reading the same tensor share one group, made the first
        time they appear (an expert's, in the first batch that routes a token to it), and
        each group takes its inputs once."""
        new = {name: x for name, x in seen.items() if name not in stats}
        for group in shared_input_groups(new):
            weights = {name: linear_weight(self.linears[name]) for name in group}
            shared = InputStats(seen[group[0]].shape[-1], needs, self.device, weights,
                                self.whitening_damping, ", ".join(group),
                                self.rescues)  # fmt: skip
            stats.update({name: shared for name in group})
        first = {}  # each group's first linear seen in this batch
        for name in seen:
            first.setdefault(id(stats[name]), name)
        for name in first.values():
            stats[name].add(seen[name] if "orig" in needs or "cross" in needs else None,
                            seen_c.get(name))  # fmt: skip

    def _add_up(self, stats: dict[str, InputStats], needs: frozenset[str],
                dealt: list[str] | None = None) -> None:  # fmt: skip
        """Every rank's sums added up, so that each holds the whole calibration set's; with
        `dealt` (the names `factorise` deals out, linear k to rank k mod N), only the ranks
        that factorise a group's linears get its sums: into the one that does (reduce, half
        an all_reduce's traffic; the others free theirs: at 70B width down_proj's Gram is
        6.1 GiB, docs/memory.md), or into all where several do. Token counts go to every
        rank. A group only some ranks saw (an expert their tokens never reached) starts at
        zero on the others. Groups are reduced in one order (by their names) everywhere."""
        owner = {name: self.world.owner(k) for k, name in enumerate(dealt or [])}
        self.world.barrier(f"block {self.index + 1}'s statistics")  # names a rank that hangs
        groups = {id(g): (tuple(n for n in stats if stats[n] is g), g.dim) for g in stats.values()}
        everyone = sorted({group for seen in self.world.gather(list(groups.values()))
                           for group in map(tuple, seen)})  # fmt: skip
        for members, dim in everyone:
            if members[0] not in stats:
                weights = {name: linear_weight(self.linears[name]) for name in members}
                shared = InputStats(dim, needs, self.device, weights, self.whitening_damping,
                                    ", ".join(members), self.rescues)  # fmt: skip
                stats.update({name: shared for name in members})
            group = stats[members[0]]
            tokens = torch.tensor([group.tokens], dtype=torch.float64, device=group.G.device
                                  if group.G is not None else self.device)  # fmt: skip
            self.world.sum_([tokens])
            group.tokens = int(tokens.item())
            owners = {owner.get(name) for name in members}
            if None in owners or len(owners) > 1:
                self.world.sum_(group.tensors())
                continue
            (dst,) = owners
            self.world.reduce_(group.tensors(), dst)
            if dst != self.world.rank:
                group.drop_sums()

    # -- factors -----------------------------------------------------------------------------
    def factorise(self, method: Method, stats: dict[str, InputStats], ranks: dict[str, int],
                  dtype: torch.dtype, compute: torch.dtype,
                  names: list[str] | None = None) -> dict[str, tuple]:  # fmt: skip
        """Factorise `names` (default: all) at their ranks and put the low-rank modules in
        the block, in the compute dtype; returns each one's (down, up) weights as written,
        in `dtype`, in host memory. A group's sums are freed after its last linear. An
        expert the router sent no calibration token has no statistics: the best it can get
        is W's own truncated SVD."""
        names = list(self.linears) if names is None else names
        release = release_points(names, stats)  # group -> its last linear
        written = {}
        world = self.world
        owned = [n for k, n in enumerate(names) if world.owner(k) == world.rank]
        for name in owned:
            linear = self.linears[name]
            group = stats.get(name)
            if group is not None and self.device.type == "cuda":
                for other in {id(g): g for g in stats.values()}.values():  # park the rest
                    other.to(self.device if other is group else "cpu")
            own = group.for_linear(name) if group is not None else None
            how = method if own is not None or not method.needs else PLAIN
            A, B = how.factorize(linear_weight(linear), own, ranks[name], self.clock)
            faults.point("svd", self.index)
            new = LowRankLinear.from_factors(A, B, linear.bias, dtype)  # as written
            del A, B, own
            if release.get(name) is not None:  # the group's last linear: free its sums
                for member in release[name]:
                    stats.pop(member, None)
                group = None
            written[name] = (new.down.weight.detach().cpu(), new.up.weight.detach().cpu())
            # the block runs the values written, in the compute dtype (.to is in place)
            replace_module(self.block, name, new.to(compute))
        if world.distributed:
            stats.clear()
            with self.clock("communicate"):
                written = self._exchange_factors(names, written, ranks, dtype, compute)
        return written

    def _exchange_factors(self, names: list[str], written: dict, ranks: dict[str, int],
                          dtype: torch.dtype, compute: torch.dtype) -> dict:  # fmt: skip
        """Each linear's factors, as written, from the rank that computed them to every
        other, which puts them in its block: every rank then runs the same block. They
        travel on the device (NCCL between GPUs): a receiving rank copies them to the host
        once, for the shard's checksum."""
        self.world.barrier(f"block {self.index + 1}'s factors")  # names a rank that hangs
        out = {}
        for k, name in enumerate(names):
            linear = self.linears[name]
            m, n = linear_shape(linear)
            if name in written:  # ours, in host memory: sent from a device copy
                down, up = (t.to(self.device) for t in written[name])
            else:
                down = torch.empty((ranks[name], n), dtype=dtype, device=self.device)
                up = torch.empty((m, ranks[name]), dtype=dtype, device=self.device)
            self.world.broadcast_(down, self.world.owner(k))
            self.world.broadcast_(up, self.world.owner(k))
            if name in written:
                out[name] = written[name]
            else:
                out[name] = (down.cpu(), up.cpu())
                new = LowRankLinear.from_factors(up, down, linear.bias, dtype)
                replace_module(self.block, name, new.to(compute))
            del down, up
        return out

    def compress(self, method: Method, ranks: dict[str, int], read: Read, write: Write | None,
                 dtype: torch.dtype, compute: torch.dtype, sequential: bool = False,
                 stages: list[list[str]] | None = None, phase: Clock = untimed,
                 keep_dense: bool = False) -> tuple[dict, dict]:  # fmt: skip
        """Statistics and factors of the whole block: ((down, up) weights as written by
        linear, calibration tokens each linear saw). Sequential: stage by stage (`stages`,
        from `sequential_stages`), each stage's compressed-stream inputs taken after the
        stages before it are compressed, the original stream through the original weights.
        `phase(name)` wraps the statistics and the factorisation (the run records each
        one's peak memory). keep_dense: keep the block's original linears for `refine`,
        which frees them once it has the dense block's outputs."""
        if not sequential:
            stages = [list(self.linears)]
        written, tokens, dense = {}, {}, {}
        for k, names in enumerate(stages):
            stats = {}
            if method.needs:
                with phase("statistics"):
                    stats = self.statistics(method.needs, read, write if k == 0 else None,
                                            names, dense, dealt=True)  # fmt: skip
            elif k == 0 and write is not None:  # no sums, but the original stream goes on
                with phase("statistics"):
                    self.statistics(frozenset(), read, write, [], dense)
            tokens.update({n: stats[n].tokens if n in stats else 0 for n in names})
            dense.update({n: self.linears[n] for n in names})
            with phase("factorise"), self.clock("convert"):  # cholesky, svd, update apart
                written.update(self.factorise(method, stats, ranks, dtype, compute, names))
        if keep_dense:
            self.dense = dense
        return written, tokens

    def refine(self, settings: RefineSettings, read: Read, read_next: Read, dtype: torch.dtype,
               keep: str = "store") -> dict:  # fmt: skip
        """Train the compressed block (refine.py), fed the compressed stream's inputs
        (`read`), towards λ times the original stream's outputs, which the statistics wrote
        to the next block's inputs (`read_next`), plus 1 − λ times the dense block's outputs
        on the compressed stream, computed here first. Trained values are rounded to
        `dtype`, as written. `read` and `read_next` give host batches, untimed
        (RunDir.host_reader); `keep` says where the windows stay between epochs
        (activations.HeldWindows: "device", "host", or "store", read ahead)."""
        steps = micro_batches(self.batches, settings.batch)
        reads = {
            "comp": functools.partial(read, "comp"),
            "orig": functools.partial(read_next, "orig"),
        }
        with HeldWindows(reads, steps, keep, self.device, self.clock) as windows:
            local = {}
            if settings.target < 1:
                windows.expect([("comp", start, stop) for start, stop in steps])
                with self.clock("forward"), _swapped(self.block, self.dense):
                    for start, stop in steps:
                        local[start] = run_block(self.block, windows("comp", start, stop),
                                                 self.arguments)  # fmt: skip
                self.dense = {}  # not needed for training

            def target(start: int, stop: int) -> torch.Tensor:
                y = windows("orig", start, stop)
                if not local:
                    return y
                return torch.lerp(local[start].float(), y.float(), settings.target)

            def ahead(pieces: list[tuple[int, int]]) -> None:  # inputs, then targets
                windows.expect([(s, a, b) for a, b in pieces for s in ("comp", "orig")])

            with self.clock("refine"):
                return refine_block(self.block, self.arguments, steps,
                                    functools.partial(windows, "comp"), target, settings,
                                    self.index, dtype, self.world, ahead)  # fmt: skip

    def quantize(self, settings: QuantSettings, read: Read, stages: list[list[str]] | None,
                 dtype: torch.dtype) -> dict[str, dict]:  # fmt: skip
        """GPTQ on every factor pair, stage by stage (as GPTQ's true-sequential mode): a
        stage's Hessians come from the compressed stream run through the block with the
        stages before it already quantized. B (rank × in) reads the layer's inputs: its
        Hessian is their Gram G; A (out × rank) reads B·x with B as quantized: B G Bᵀ. The
        block then holds the values loaders compute from what is written (`unpacked_weight`),
        in the compute dtype. Returns each linear's packed tensors, {"down": ..., "up": ...}.

        In a distributed run a stage's linears are dealt out as factorisations are: the
        rank that quantizes one broadcasts its packed tensors, and every rank puts the
        values loaders compute from them in its block, so the ranks write and run the same
        bits (GPTQ's rounding decisions are never left to each rank's own arithmetic)."""
        packed = {}
        world = self.world
        for names in stages or [list(self.linears)]:
            grams = self._compressed_grams(read, names)
            release = release_points(names, grams)
            owned = {n for k, n in enumerate(names) if world.owner(k) == world.rank}
            inverses = {}  # group -> its Gram's inverse factor, shared by the group's linears
            for name in names:
                group = grams.get(name)  # None: no calibration token reached it (an expert)
                if name in owned:
                    with self.clock("quantize"):
                        G = group.Gc if group is not None else None
                        if G is not None and id(group) not in inverses:
                            inverses[id(group)] = inverse_factor(G, torch.float32)
                        low = self.block.get_submodule(name)
                        packed[name], new = self._quantize_pair(low, G, inverses.get(id(group)),
                                                                settings, dtype)  # fmt: skip
                        replace_module(self.block, name, new)
                    faults.point("quantize", self.index)
                if release.get(name) is not None:  # the group's last linear
                    inverses.pop(id(group), None)
                    for member in release[name]:
                        grams.pop(member, None)
            if world.distributed:
                with self.clock("communicate"):
                    self._exchange_packed(names, packed, settings)
        return packed

    def _exchange_packed(self, names: list[str], packed: dict, settings: QuantSettings) -> None:
        """Each linear's packed factors from the rank that quantized them to every other,
        which puts the pair as loaders compute it from them in its block (`_loaded_pair`,
        as the quantizing rank does)."""
        self.world.barrier(f"block {self.index + 1}'s quantized factors")  # names a hung rank
        for k, name in enumerate(names):
            owner = self.world.owner(k)
            what = f"block {self.index + 1}'s quantized factors (rank {owner} sending)"
            packed[name] = self.world.agree(packed.get(name), owner, what)
            if owner != self.world.rank:
                low = self.block.get_submodule(name)
                on_device = {f: {key: t.to(self.device) for key, t in part.items()}
                             for f, part in packed[name].items()}  # fmt: skip
                new = _loaded_pair(low, on_device["down"], on_device["up"], settings.scheme())
                replace_module(self.block, name, new)

    def _quantize_pair(self, low: LowRankLinear, G: torch.Tensor | None,
                       Hinv: torch.Tensor | None, settings: QuantSettings,
                       dtype: torch.dtype) -> tuple[dict, LowRankLinear]:  # fmt: skip
        """GPTQ of one factor pair, rotated in its rank space first (`rank_rotation`): B
        against G (through Hinv, its inverse factor), then A against B G Bᵀ with B as
        quantized; without G, each value rounded to its nearest code (an identity Hinv
        spreads no error). Returns the packed tensors (host memory) and the pair as loaders
        compute it from them, in the block's dtype."""
        scheme = settings.scheme()
        args = (settings.bits, settings.group_size, settings.symmetric)
        B, A = low.down.weight.detach(), low.up.weight.detach()
        R = rank_rotation(B.shape[0]).to(B.device, torch.float32)
        B, A = R.T @ B.float(), A.float() @ R  # the same product, easier to quantize
        del R
        if Hinv is None:
            Hinv = torch.eye(B.shape[1], device=B.device)
        down = packed_tensors(gptq(B, None, *args, Hinv=Hinv, scale_dtype=dtype), settings, dtype)
        Bq = unpacked_weight(down, scheme).to(B.device)
        if G is None:
            A_inverse = torch.eye(B.shape[0], device=B.device)
        else:
            Bq64 = Bq.to(torch.float64)
            A_inverse = inverse_factor((Bq64 @ G) @ Bq64.T, torch.float32)
            del Bq64
        up = packed_tensors(gptq(A, None, *args, Hinv=A_inverse, scale_dtype=dtype), settings,
                            dtype)  # fmt: skip
        new = _loaded_pair(low, down, up, scheme)
        return {"down": _host(down), "up": _host(up)}, new

    def _compressed_grams(self, read: Read, names: list[str]) -> dict[str, InputStats]:
        """Float64 Grams of `names`' inputs on the compressed stream, through the block as it
        is now (its own routing), summed over every rank's share."""
        needs = frozenset({"comp"})
        stats: dict[str, InputStats] = {}
        for start, stop in self.batches:
            with self.clock("forward"):
                xc = read("comp", start, stop)
                with capture_inputs(self.block, names) as seen:
                    _run_until_seen(self.block, xc, self.arguments, names, seen)
                del xc
            with self.clock("stats"):
                self._add_batch(stats, needs, seen, seen)
            del seen
        if self.world.distributed:
            with self.clock("communicate"):
                self._add_up(stats, needs, names)  # dealt out as `quantize` deals them
        return stats

    def advance(self, read: Read, write: Write) -> None:
        """Run the (compressed) block on the compressed stream: the next block's input."""
        with self.clock("forward"):
            for start, stop in self.batches:
                write("comp", start, run_block(self.block, read("comp", start, stop),
                                               self.arguments))  # fmt: skip

    # -- spectra -------------------------------------------------------------------------------
    def spectra(self, read: Read, write: Write | None) -> tuple[dict[str, torch.Tensor], dict]:
        """Each linear's whitened spectrum on the original stream: σ² of W·S (S Sᵀ = X Xᵀ),
        descending; each σ² that truncation drops adds exactly itself to ‖(W − W')X‖².
        Plus the calibration tokens each linear saw. What rank allocation needs."""
        stats = self.statistics(frozenset({"orig"}), read, write)
        out, tokens = {}, {}
        release = release_points(list(self.linears), stats)
        for name, linear in self.linears.items():
            group = stats.get(name)
            tokens[name] = group.tokens if group is not None else 0
            W = linear_weight(linear).to(self.device, torch.float64)
            if group is None:  # no tokens: W's own spectrum
                Y = W
            else:
                with self.clock("cholesky"):
                    L = group.whitener("orig")
                Y = W @ L
            with self.clock("svd"):
                gram = Y @ Y.mT if Y.shape[0] <= Y.shape[1] else Y.mT @ Y
                out[name] = torch.linalg.eigvalsh(gram).flip(0).clamp_(min=0).cpu()
            del W, Y, gram
            if release.get(name) is not None:
                for member in release[name]:
                    stats.pop(member, None)
        return out, tokens


def _host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in tensors.items()}


def _loaded_pair(low: LowRankLinear, down: dict, up: dict, scheme) -> LowRankLinear:
    """The factor pair as loaders compute it from its packed tensors (on the block's
    device), in the block's dtype, with `low`'s bias."""
    device = low.up.weight.device
    Bq = unpacked_weight(down, scheme).to(device)
    Aq = unpacked_weight(up, scheme).to(device)
    bias = low.up.bias.detach() if low.up.bias is not None else None
    return LowRankLinear.from_factors(Aq, Bq, bias, Aq.dtype).to(low.up.weight.dtype)


class _Enough(Exception):
    """Raised once a forward has reached every linear it was run for."""


def _run_until_seen(block: nn.Module, x: torch.Tensor, arguments: dict, names: list[str],
                    seen: dict) -> None:  # fmt: skip
    """Run the block only as far as it takes for every linear in `names` to have its input
    in `seen` (capture_inputs): statistics need nothing after the last of them, and a
    sequential stage early in the block costs a fraction of a forward."""

    def enough(module, args, output):
        if len(seen) == len(names):
            raise _Enough

    handles = [block.get_submodule(name).register_forward_hook(enough) for name in names]
    try:
        run_block(block, x, arguments)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _swapped(block: nn.Module, modules: dict[str, nn.Module]):
    """Within: `modules` (relative names) in place of the block's own."""
    old = {name: block.get_submodule(name) for name in modules}
    for name, module in modules.items():
        replace_module(block, name, module)
    try:
        yield
    finally:
        for name, module in old.items():
            replace_module(block, name, module)
