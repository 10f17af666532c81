"""Second-moment statistics of a linear layer's inputs, accumulated in float64, and an
in-place Cholesky factorisation that survives singular Grams.

Memory is the point of this module: at 70B width one n×n float64 sum of down_proj's inputs
is 6.1 GiB. So sums are accumulated from token chunks (no float64 copy of a whole batch),
the cross sum is kept as the smaller of C (n×n) and W·C (m×n per linear), and the Cholesky
factor overwrites its Gram instead of taking copies. `sum_shapes` is the one description
of what a group holds, used both to allocate it and by the plan to count it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .errors import StreamSVDError

log = logging.getLogger(__name__)

# Which sums a method needs: "orig" G = Σ x xᵀ over the original stream, "comp" G' = Σ x' x'ᵀ
# over the compressed stream, "cross" C = Σ x x'ᵀ pairing the two streams token by token.
NEEDS = ("orig", "comp", "cross")
CHUNK_VALUES = 1 << 22  # float64 values converted at a time while accumulating (32 MiB)
# The sums' dtype. float64 always; benchmarks/sum_precision.py (7e71916) set float32 (factorised in
# float64 all the same) to measure what float32 sums would cost.
SUM_DTYPE = torch.float64
CHOLESKY_BLOCK = 1024  # panel width of the in-place blocked Cholesky
F64 = 8
# damped_cholesky_'s damping steps, powers of ten of a Gram's mean diagonal, tried in order
# after no damping at all
DAMPING_STEPS = range(-8, 4)


def cross_as_product(outs: list[int], n: int) -> bool:
    """Keep the cross sum as W·C per linear (Σ m·n values) rather than C (n² values) when
    that is smaller: down_proj at 70B width holds 8192×28672 instead of 28672²."""
    return bool(outs) and sum(outs) < n


def sum_shapes(n: int, outs: dict[str, int], needs: frozenset[str]) -> dict[str, tuple]:
    """The float64 sums an input group of width n holds, by name: "G", "Gc", and "C" or
    "WC.<linear>" for each linear (outs: out_features by linear name)."""
    shapes = {}
    if "orig" in needs:
        shapes["G"] = (n, n)
    if "comp" in needs:
        shapes["Gc"] = (n, n)
    if "cross" in needs:
        if cross_as_product(list(outs.values()), n):
            shapes.update({f"WC.{name}": (m, n) for name, m in outs.items()})
        else:
            shapes["C"] = (n, n)
    return shapes


def sums_bytes(n: int, outs: dict[str, int], needs: frozenset[str]) -> int:
    return sum(a * b for a, b in sum_shapes(n, outs, needs).values()) * F64


class InputStats:
    """Float64 sums over calibration tokens of the inputs of one group of linears that read
    the same tensor (n = in_features). `weights` (name -> W, (m, n)) are the group's
    weights, needed when the cross sum is kept as W·C.

    Factorising consumes the sums: `whitener` overwrites a Gram with its factor, and
    `weighted_cross` hands over the W·C buffer."""

    def __init__(self, dim: int, needs: frozenset[str], device: torch.device | str,
                 weights: dict[str, torch.Tensor] | None = None,
                 damping: float = 0.0, name: str = "",
                 rescues: Rescues | None = None):  # fmt: skip
        outs = {name: w.shape[0] for name, w in (weights or {}).items()}
        shapes = sum_shapes(dim, outs, needs)
        zeros = lambda s: torch.zeros(s, dtype=SUM_DTYPE, device=device)  # noqa: E731
        self.dim = dim
        self.G = zeros(shapes["G"]) if "G" in shapes else None  # (n, n)
        self.Gc = zeros(shapes["Gc"]) if "Gc" in shapes else None  # (n, n)
        self.C = zeros(shapes["C"]) if "C" in shapes else None  # (n, n)
        self.WC = {  # linear name -> (m, n): Σ (W x) x'ᵀ
            k.removeprefix("WC."): zeros(s) for k, s in shapes.items() if k.startswith("WC.")
        }
        self._weights = weights if self.WC else None
        self._factors: dict[str, torch.Tensor] = {}
        self.tokens = 0
        # A ridge for `whitener`, a fraction of the Gram's mean diagonal: set by compress
        # --bits, whose factors must stay quantizable (BlockStep.whitening_damping).
        self.damping = damping
        self.name = name  # the group's linears, for messages: "mlp.gate_proj, mlp.up_proj"
        self.rescues = rescues  # where the Cholesky's damping is counted; None: logged only

    def add(self, x: torch.Tensor | None, xc: torch.Tensor | None) -> None:
        """x, xc: (..., n) inputs of the same tokens from the original / compressed stream."""
        x = None if x is None else x.reshape(-1, x.shape[-1])
        xc = None if xc is None else xc.reshape(-1, xc.shape[-1])
        total = (x if x is not None else xc).shape[0]
        step = max(1, CHUNK_VALUES // self.dim)
        for s in range(0, total, step):
            xs = None if x is None else x[s : s + step].to(SUM_DTYPE)  # (t, n)
            xcs = None if xc is None else xc[s : s + step].to(SUM_DTYPE)
            if self.G is not None:
                self.G.addmm_(xs.T, xs)
            if self.Gc is not None:
                self.Gc.addmm_(xcs.T, xcs)
            if self.C is not None:
                self.C.addmm_(xs.T, xcs)
            for name, WC in self.WC.items():
                W = self._weights[name]
                rows = max(1, CHUNK_VALUES // self.dim)
                for r in range(0, W.shape[0], rows):  # W·x a row block at a time
                    WC[r : r + rows].addmm_(W[r : r + rows].to(SUM_DTYPE) @ xs.T, xcs)
        self.tokens += total

    def whitener(self, which: str = "comp") -> torch.Tensor:
        """The lower Cholesky factor of G ("orig") or G' ("comp"), computed in place on the
        first call (the Gram is gone afterwards) and shared by the group's linears."""
        if which not in self._factors:
            gram = self.G if which == "orig" else self.Gc
            if gram is None:
                raise StreamSVDError(f"no {which} Gram was accumulated for this layer")
            gram = gram.to(torch.float64)  # a copy only where the sums are not float64
            what = self._what("G" if which == "orig" else "G'")
            self._factors[which] = damped_cholesky_(gram, what, self.damping, self.rescues,
                                                    self.tokens)  # fmt: skip
        return self._factors[which]

    def cholesky(self, gram: torch.Tensor, what: str) -> torch.Tensor:
        """`damped_cholesky` of a matrix made from these sums (B·G'·Bᵀ), counted and named
        as the group's own Grams are."""
        return damped_cholesky(gram, self._what(what), self.rescues, self.tokens)

    def _what(self, gram: str) -> str:
        return f"{self.name} {gram}" if self.name else gram

    def weighted_cross(self, W: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """W·C (m, n) float64, owned by the caller: the stored product for linear `name`
        (handed over), or computed from C a row block at a time."""
        if self.WC:
            if name not in self.WC:
                raise StreamSVDError(f"no W·C sum kept for linear {name!r}")
            return self.WC.pop(name).to(torch.float64)
        out = torch.empty(W.shape, dtype=torch.float64, device=self.C.device)
        rows = max(1, CHUNK_VALUES // self.dim)
        C = self.C.to(torch.float64)
        for r in range(0, W.shape[0], rows):
            torch.mm(W[r : r + rows].to(torch.float64), C, out=out[r : r + rows])
        return out

    def for_linear(self, name: str) -> LinearStats:
        return LinearStats(self, name)

    def tensors(self) -> list[torch.Tensor]:
        sums = [self.G, self.Gc, self.C, *self.WC.values(), *self._factors.values()]
        return list({id(t): t for t in sums if t is not None}.values())

    def drop_sums(self) -> None:
        """Free the sums, keeping the token count: on a rank that factorises none of the
        group's linears (step.BlockStep._add_up)."""
        self.G = self.Gc = self.C = None
        self.WC, self._factors = {}, {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> InputStats:
        """Move every sum (and factor) to `device`, in place: on a GPU, sums not in use are
        parked in host memory."""
        moved = {id(t): t.to(device) for t in self.tensors()}
        for attr in ("G", "Gc", "C"):
            t = getattr(self, attr)
            if t is not None:
                setattr(self, attr, moved[id(t)])
        self.WC = {k: moved[id(t)] for k, t in self.WC.items()}
        self._factors = {k: moved[id(t)] for k, t in self._factors.items()}
        return self


@dataclass
class LinearStats:
    """One linear's view of its group's sums: what a factorisation method receives."""

    group: InputStats
    name: str

    @property
    def G(self) -> torch.Tensor | None:
        return self.group.G

    @property
    def Gc(self) -> torch.Tensor | None:
        return self.group.Gc

    @property
    def C(self) -> torch.Tensor | None:
        return self.group.C

    def whitener(self, which: str = "comp") -> torch.Tensor:
        return self.group.whitener(which)

    def cholesky(self, gram: torch.Tensor, what: str) -> torch.Tensor:
        return self.group.cholesky(gram, what)

    def weighted_cross(self, W: torch.Tensor) -> torch.Tensor:
        return self.group.weighted_cross(W, self.name)


@dataclass
class Rescues:
    """What `damped_cholesky_` did to make Grams factorisable, counted for a run's summary:
    Grams damped, by damping step (a power of ten times the mean diagonal: "1e-08"), input
    channels found dead, and each Gram damped past the routine level, described."""

    damped: dict[str, int] = field(default_factory=dict)
    dead_channels: int = 0
    # {"gram", "damping", "routine", "tokens", "inputs"}: the Gram, its damping step and the
    # routine one, the tokens it was summed from (None: not known) and its width
    escalated: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.damped or self.dead_channels)

    def as_dict(self) -> dict:
        return {"damped": dict(sorted(self.damped.items())), "dead_channels": self.dead_channels,
                "escalated": list(self.escalated)}  # fmt: skip

    @classmethod
    def total(cls, entries: list[dict]) -> Rescues:
        """The sum of `as_dict` entries (blocks, or ranks of one block)."""
        out = cls()
        for entry in entries:
            for level, count in entry.get("damped", {}).items():
                out.damped[level] = out.damped.get(level, 0) + count
            out.dead_channels += entry.get("dead_channels", 0)
            out.escalated += entry.get("escalated", [])
        return out


def damped_cholesky(gram: torch.Tensor, what: str = "Gram", rescues: Rescues | None = None,
                    tokens: int | None = None) -> torch.Tensor:  # fmt: skip
    """`damped_cholesky_` on a float64 copy: the Gram is left as it was."""
    return damped_cholesky_(gram.to(torch.float64, copy=True), what, 0.0, rescues, tokens)


def damped_cholesky_(gram: torch.Tensor, what: str = "Gram", least: float = 0.0,
                     rescues: Rescues | None = None,
                     tokens: int | None = None) -> torch.Tensor:  # fmt: skip
    """Overwrite a float64 Gram G (n×n, contiguous) with lower-triangular L, L Lᵀ = G + δI,
    δ as small as works (at least `least` times the mean diagonal), and return it. No n×n
    copy is taken.

    A Gram can be singular (dead channels, fewer tokens than dimensions) or so
    ill-conditioned that its factor is useless. Dead channels (zero diagonal) get a unit
    diagonal, as GPTQ does. Then δ starts at 0 and escalates from 1e-8 to 1e3 times the
    mean diagonal, by factors of 10, until the factorisation succeeds with
    min(diag L)² ≥ 1e-12 · max(diag G). A failed attempt has overwritten only the lower
    triangle, which is restored from the upper one. For a finite PSD matrix the last step
    always succeeds, so this never crashes and never returns NaN.

    Every damping is counted in `rescues` and logged. Damping up to `routine_step` only
    settles what rounding left undecided, and is logged at DEBUG. Past it, or at any
    step on a Gram summed from fewer `tokens` than its n inputs (rank-deficient: n − tokens
    directions no calibration token reached), the damping stands in for statistics the
    calibration cannot support: an escalation, recorded in `rescues` for the run to report
    (one warning a block, naming the layers), or a WARNING here where no `rescues` is given.
    The level alone would not tell: SmolLM2 calibrated on 2,048 tokens needed no damping at
    all, and on 1,024 every down_proj (1,536 inputs) needed only the smallest step, for an
    output whose perplexity was in the thousands (issue 41). An expert the router sent
    fewer tokens than its inputs counts as an escalation too.
    """
    if gram.dtype != torch.float64 or not gram.is_contiguous():
        raise TypeError("damped_cholesky_ needs a contiguous float64 matrix")
    if not torch.isfinite(gram.sum()):  # a NaN or inf anywhere makes the sum non-finite
        raise StreamSVDError(
            f"{what} has NaN or inf entries: the calibration inputs overflowed; run the "
            "blocks in a wider dtype (compress --compute-dtype float32)"
        )
    diag = gram.diagonal()
    dead = diag <= 0
    if dead.any():
        diag[dead] = 1.0
        log.info("%s: %d dead input channels given unit variance", what, int(dead.sum()))
        if rescues is not None:
            rescues.dead_channels += int(dead.sum())
    scale, biggest = float(diag.mean()), float(diag.max())
    if least:
        diag.add_(least * scale)
    n, b = gram.shape[0], CHOLESKY_BLOCK
    # What an attempt overwrites and the strict upper triangle cannot give back.
    diagonal_blocks = [gram[c : c + b, c : c + b].clone() for c in range(0, n, b)]
    for step in [None, *DAMPING_STEPS]:
        damp = 0.0 if step is None else scale * 10.0**step
        if damp:
            _restore_(gram, diagonal_blocks, damp)
        if _cholesky_lower_(gram, b):
            pivots = gram.diagonal()
            if bool(torch.isfinite(pivots).all()) and float(pivots.min()) ** 2 >= 1e-12 * biggest:
                if damp:
                    _count_damping(what, step, damp, scale, n, tokens, rescues)
                return gram.tril_()
    raise StreamSVDError(f"{what}: Cholesky failed even with damping {damp:.3g}")


def routine_step(n: int) -> int:
    """The largest damping step (power of ten of the mean diagonal) that a PSD n×n Gram
    singular only to rounding can need: the float64 sums leave its null directions within
    about n·u·λ_max ≤ n²·u·mean of zero (u = 2⁻⁵³, λ_max ≤ the trace), and the pivot test
    asks δ ≥ 1e-12·max diag ≤ 1e-12·n·mean. The smallest step, 1e-8, covers both up to
    n ≈ 9,500; 70B's 28,672 inputs need 1e-7."""
    u = torch.finfo(torch.float64).eps / 2
    return max(DAMPING_STEPS[0], math.ceil(math.log10(max(n * n * u, 1e-12 * n))))


def _count_damping(what: str, step: int, damp: float, scale: float, n: int,
                   tokens: int | None, rescues: Rescues | None) -> None:  # fmt: skip
    """Count one damped Gram and log it: routine at DEBUG; an escalation (damped_cholesky_)
    recorded in `rescues` for the run to report, or a WARNING where there is none."""
    level, routine = f"{10.0**step:.0e}", routine_step(n)
    log.debug("%s: Cholesky needed damping %.3g (%s × mean diagonal %.3g)", what, damp, level,
              scale)  # fmt: skip
    if rescues is not None:
        rescues.damped[level] = rescues.damped.get(level, 0) + 1
    if step <= routine and not (tokens is not None and tokens < n):
        return
    escalation = {"gram": what, "damping": level, "routine": f"{10.0**routine:.0e}",
                  "tokens": tokens, "inputs": n}  # fmt: skip
    if rescues is not None:
        rescues.escalated.append(escalation)
    else:
        log.warning("%s: the calibration cannot support these statistics; give more "
                    "calibration tokens", escalation_text(escalation))  # fmt: skip


def escalation_text(escalation: dict) -> str:
    """One of `Rescues.escalated` in words."""
    tokens, inputs = escalation["tokens"], escalation["inputs"]
    why = (f"from {tokens:,} tokens for {inputs:,} inputs" if tokens is not None and tokens < inputs
           else f"past the routine {escalation['routine']}")  # fmt: skip
    return (
        f"{escalation['gram']} needed Cholesky damping {escalation['damping']} × its mean "
        f"diagonal, {why}"
    )


def _cholesky_lower_(A: torch.Tensor, block: int = CHOLESKY_BLOCK) -> bool:
    """Right-looking blocked Cholesky of A's lower triangle, in place. Off the diagonal
    blocks, the strict upper triangle is never written. Temporaries: one n×block panel.
    False if A is not positive definite (its lower triangle is then partly overwritten)."""
    n = A.shape[0]
    for j in range(0, n, block):
        e = min(j + block, n)
        D, info = torch.linalg.cholesky_ex(A[j:e, j:e])  # (b, b), reads the lower triangle
        if int(info) != 0:
            return False
        A[j:e, j:e] = D
        if e == n:
            break
        P = torch.linalg.solve_triangular(D.mT, A[e:, j:e], upper=True, left=False)  # P·Dᵀ
        A[e:, j:e] = P
        for c in range(e, n, block):  # the trailing lower triangle, a block column at a time
            ce = min(c + block, n)
            A[c:, c:ce].addmm_(P[c - e :], P[c - e : ce - e].mT, alpha=-1)
    return True


def _restore_(A: torch.Tensor, diagonal_blocks: list[torch.Tensor], damp: float) -> None:
    """Undo a failed `_cholesky_lower_` on a symmetric A: the lower triangle again from the
    upper one, the diagonal blocks from their copies, and `damp` added to the diagonal."""
    n, b = A.shape[0], diagonal_blocks[0].shape[0]
    for k, c in enumerate(range(0, n, b)):
        ce = min(c + b, n)
        A[ce:, c:ce] = A[c:ce, ce:].mT
        A[c:ce, c:ce] = diagonal_blocks[k]
        A[c:ce, c:ce].diagonal().add_(damp)


def release_points(order: list[str], groups: dict[str, object]) -> dict[str, list[str]]:
    """Linears factorised in `order`, sharing sums as `groups` says (linear -> its group):
    for each linear that is the last of its group, the group's members, whose sums can be
    freed once it is done. The run frees them there, and the plan counts them until then."""
    last = {}
    for name in order:
        if name in groups:
            last[id(groups[name])] = name
    members: dict[str, list[str]] = {}
    for name in order:
        if name in groups:
            members.setdefault(last[id(groups[name])], []).append(name)
    return members
