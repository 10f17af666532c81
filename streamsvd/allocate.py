"""How the ratio's parameter budget is spread over a model's linears: one rank each.

`--ratio` is the fraction of block-linear parameters removed in total. The budget is what
the uniform rule keeps, Σ r_u·(m + n) with r_u = rank_for(m, n, ratio), so every
allocation is compared with uniform at the same size. Non-uniform allocations read each
matrix's whitened spectrum (σ² of W·S, S Sᵀ = X Xᵀ on the original stream: each dropped σ²
is exactly what truncation adds to ‖(W − W')X‖², SVD-LLM's theorem), gathered by a first
pass over the checkpoint (pipeline.py) before block 0 is compressed.

- uniform: r_u for every matrix (SVD-LLM).
- grouped: SVD-LLM V2's allocation (arXiv 2503.12340). Matrices are grouped by type (q, k,
  v, o, gate, up, down); each group keeps its uniform budget; within it a matrix's ratio
  is proportional to 1/log of its truncation loss at r_u, so a matrix that loses more
  keeps more rank.
- residual: a matrix's error is judged by what it does downstream. Every later layer reads
  the residual stream through a norm that divides by its scale, so an error weighs in
  proportion to σ² over the energy of the residual stream at that block. Within each type
  group (σ² of different types are not commensurate) the group's budget goes greedily to
  the largest σ²/energy per parameter.

A spectrum-only global greedy is known to starve matrices whose spectrum looks cheap to
cut (one got rank 1 on SmolLM2), so every allocation keeps each matrix between a floor and
a ceiling around r_u, and a final exact top-up/trim brings the total to the budget: never
above it, and below it by less than one rank of one matrix.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .errors import StreamSVDError
from .factorize import rank_for
from .modeling import linear_shape
from .quantize import QuantSettings, quantized_rank

ALLOCATIONS = ("uniform", "grouped", "residual")
FLOOR = 0.5  # × r_u: the least rank a matrix keeps
CEILING = 2.0  # × r_u, and never more than factorising pays for: r·(m + n) < m·n


def block_ranks(linears: dict, ratio: float, quant: QuantSettings | None = None,
                allocated: dict[str, int] | None = None) -> dict[str, int]:  # fmt: skip
    """Each of a block's linears' rank (names as in `linears`): `allocated`'s where given,
    else the uniform rule's; with `quant` rounded to whole groups, as A's input width is
    the rank (quantize.quantized_rank)."""
    ranks = {name: allocated[name] if allocated else rank_for(*linear_shape(linear), ratio)
             for name, linear in linears.items()}  # fmt: skip
    if quant:
        ranks = {name: quantized_rank(rank, quant.group_size, linear_shape(linears[name]))
                 for name, rank in ranks.items()}  # fmt: skip
    return ranks


@dataclass(frozen=True)
class Matrix:
    """One linear as the allocation sees it. sigma2: σ² of its whitened weight, descending
    (None for uniform); energy: Σ‖h‖² of its block's input residual stream over the
    calibration tokens (the residual allocation's scale)."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    sigma2: torch.Tensor | None = None
    energy: float = 1.0

    @property
    def kind(self) -> str:
        """The matrix's type: its own name within the block (q_proj, down_proj, ...);
        experts' up_proj share one type with each other."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def cost(self) -> int:
        """Parameters per unit of rank."""
        return sum(self.shape)


def uniform_rank(matrix: Matrix, ratio: float) -> int:
    return rank_for(*matrix.shape, ratio)


def rank_bounds(matrix: Matrix, ratio: float) -> tuple[int, int]:
    """(floor, ceiling) of a matrix's rank: FLOOR and CEILING times r_u, the ceiling also
    below the rank at which the two factors stop being smaller than W."""
    m, n = matrix.shape
    r = uniform_rank(matrix, ratio)
    pays = max(1, (m * n - 1) // (m + n))  # largest r with r·(m + n) < m·n
    ceiling = max(r, min(pays, math.floor(CEILING * r)))
    return max(1, min(r, math.ceil(FLOOR * r))), ceiling


def budget(matrices: list[Matrix], ratio: float) -> int:
    """Parameters the uniform rule keeps: what every allocation may spend."""
    return sum(uniform_rank(m, ratio) * m.cost for m in matrices)


def allocate(matrices: list[Matrix], ratio: float, how: str = "uniform") -> dict[str, int]:
    """Rank per matrix name. Deterministic: the same spectra give the same ranks."""
    if how not in ALLOCATIONS:
        raise StreamSVDError(f"unknown allocation {how!r}; choose from {list(ALLOCATIONS)}")
    uniform = {m.name: uniform_rank(m, ratio) for m in matrices}
    if how == "uniform":
        return uniform
    missing = [m.name for m in matrices if m.sigma2 is None]
    if missing:
        raise StreamSVDError(f"allocation {how!r} needs the spectra of {missing[:3]}...")
    ranks = {}
    for group in _by_kind(matrices).values():
        group_budget = sum(uniform[m.name] * m.cost for m in group)
        if how == "grouped":
            ranks.update(_grouped(group, ratio))
        else:
            start = {m.name: rank_bounds(m, ratio)[0] for m in group}
            ranks.update(_fit(group, start, group_budget, ratio, _residual_gain))
    return _fit(matrices, ranks, budget(matrices, ratio), ratio, _residual_gain
                if how == "residual" else _loss_gain)  # fmt: skip


def _by_kind(matrices: list[Matrix]) -> dict[str, list[Matrix]]:
    groups: dict[str, list[Matrix]] = {}
    for m in matrices:
        groups.setdefault(m.kind, []).append(m)
    return groups


def truncation_loss(matrix: Matrix, rank: int) -> float:
    """‖(W − W')X‖² of the best rank-r W': the sum of the dropped σ²."""
    return float(matrix.sigma2[rank:].sum())


def _grouped(group: list[Matrix], ratio: float) -> dict[str, int]:
    """V2: ratio_i = |G|·ratio·(1/log L_i) / Σ_j 1/log L_j, L_i the loss at r_u. Losses are
    sums over every calibration token, so far above 1; one at or below e would give a
    meaningless (infinite or negative) 1/log and is taken as e."""
    inverse = [1 / math.log(max(truncation_loss(m, uniform_rank(m, ratio)), math.e)) for m in group]
    total = sum(inverse)
    ranks = {}
    for m, inv in zip(group, inverse, strict=True):
        own = min(max(len(group) * ratio * inv / total, 1e-6), 1 - 1e-6)
        low, high = rank_bounds(m, ratio)
        ranks[m.name] = min(max(rank_for(*m.shape, own), low), high)
    return ranks


def _loss_gain(m: Matrix, rank: int) -> float:
    """What rank `rank` (0-based) buys, per parameter: its σ²."""
    return float(m.sigma2[rank]) / m.cost if rank < len(m.sigma2) else 0.0


def _residual_gain(m: Matrix, rank: int) -> float:
    """The same, relative to the residual stream's energy where the error lands."""
    return _loss_gain(m, rank) / m.energy


def _fit(matrices: list[Matrix], ranks: dict[str, int], target: int, ratio: float,
         gain) -> dict[str, int]:  # fmt: skip
    """Bring Σ r·(m + n) to `target` exactly (never above, below by less than one rank of
    the matrix that would overshoot): trim the ranks that buy least, then top up those
    that buy most, each within its floor and ceiling. Ties go to the earlier matrix.
    Heaps, because an MoE model has tens of thousands of matrices."""
    ranks = {m.name: ranks[m.name] for m in matrices}
    bounds = {m.name: rank_bounds(m, ratio) for m in matrices}
    spent = sum(ranks[m.name] * m.cost for m in matrices)
    # trim: the last rank that buys least goes first
    heap = [(gain(m, ranks[m.name] - 1), i, m) for i, m in enumerate(matrices)
            if ranks[m.name] > bounds[m.name][0]]  # fmt: skip
    heapq.heapify(heap)
    while spent > target:
        if not heap:
            raise StreamSVDError("no allocation meets the budget within the rank floors")
        _, i, m = heapq.heappop(heap)
        ranks[m.name] -= 1
        spent -= m.cost
        if ranks[m.name] > bounds[m.name][0]:
            heapq.heappush(heap, (gain(m, ranks[m.name] - 1), i, m))
    # top up: the next rank that buys most comes first; a matrix that does not fit now
    # never will, since the spending only grows
    heap = [(-gain(m, ranks[m.name]), i, m) for i, m in enumerate(matrices)
            if ranks[m.name] < bounds[m.name][1]]  # fmt: skip
    heapq.heapify(heap)
    while heap:
        _, i, m = heapq.heappop(heap)
        if spent + m.cost > target:
            continue
        ranks[m.name] += 1
        spent += m.cost
        if ranks[m.name] < bounds[m.name][1]:
            heapq.heappush(heap, (-gain(m, ranks[m.name]), i, m))
    return ranks
