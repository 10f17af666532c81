"""Rank allocation: the budget met exactly, every rank within its floor and ceiling, the
same ranks every time, and each variant doing what its rule says."""

from __future__ import annotations

import math

import pytest
import torch

from streamsvd.allocate import (
    ALLOCATIONS,
    Matrix,
    allocate,
    budget,
    rank_bounds,
    truncation_loss,
    uniform_rank,
)
from streamsvd.errors import StreamSVDError

KINDS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (16, 64), "self_attn.v_proj": (16, 64),
         "self_attn.o_proj": (64, 64), "mlp.gate_proj": (160, 64), "mlp.up_proj": (160, 64),
         "mlp.down_proj": (64, 160)}  # fmt: skip


def model_matrices(blocks: int = 6, seed: int = 0) -> list[Matrix]:
    """A model's linears with spectra that decay at a different rate in each matrix, as a
    real model's do, and a residual stream that grows with depth."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(blocks):
        for name, (m, n) in KINDS.items():
            k = min(m, n)
            decay = 0.02 + 0.2 * torch.rand((), generator=gen, dtype=torch.float64)
            scale = 10 ** (3 + 3 * torch.rand((), generator=gen, dtype=torch.float64))
            sigma2 = scale * torch.exp(-decay * torch.arange(k, dtype=torch.float64))
            out.append(Matrix(f"layers.{b}.{name}", (m, n), sigma2, energy=float(2**b)))
    return out


def spent(matrices, ranks) -> int:
    return sum(ranks[m.name] * m.cost for m in matrices)


@pytest.mark.parametrize("how", ALLOCATIONS)
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_allocation_meets_the_budget_exactly_within_bounds(how, ratio):
    matrices = model_matrices()
    ranks = allocate(matrices, ratio, how)
    target = budget(matrices, ratio)
    # never above the budget, and below it by less than one rank of one matrix
    assert target - max(m.cost for m in matrices) < spent(matrices, ranks) <= target
    for m in matrices:
        low, high = rank_bounds(m, ratio)
        assert 1 <= low <= ranks[m.name] <= high < min(m.shape)
        assert ranks[m.name] * m.cost < m.shape[0] * m.shape[1]  # the factors stay smaller


@pytest.mark.parametrize("how", ALLOCATIONS)
def test_allocation_is_deterministic(how):
    first = allocate(model_matrices(), 0.4, how)
    assert allocate(model_matrices(), 0.4, how) == first
    assert list(first) == [m.name for m in model_matrices()]


def test_uniform_is_the_ratio_rule():
    for m in model_matrices(1):
        assert allocate([m], 0.4)[m.name] == math.floor(0.6 * m.shape[0] * m.shape[1] / m.cost)


def test_grouped_gives_more_rank_where_truncation_loses_more():
    """V2's rule within a group: the matrix with the larger loss at the uniform rank keeps
    the larger rank, and each type's budget stays its own (up to the final top-up)."""
    matrices = model_matrices()
    ratio = 0.4
    ranks = allocate(matrices, ratio, "grouped")
    for kind in KINDS:
        group = [m for m in matrices if m.name.endswith(kind)]
        loss = {m.name: truncation_loss(m, uniform_rank(m, ratio)) for m in group}
        ordered = sorted(group, key=lambda m: loss[m.name])
        assert [ranks[m.name] for m in ordered] == sorted(ranks[m.name] for m in ordered)
        assert ranks[ordered[0].name] < ranks[ordered[-1].name]
        own = sum(uniform_rank(m, ratio) * m.cost for m in group)
        assert abs(spent(group, ranks) - own) <= len(group) * group[0].cost


def test_residual_weighs_errors_by_the_stream_they_join():
    """Two blocks with identical spectra: the one whose residual stream is smaller (where
    the same error weighs more) gets at least as much rank, and strictly more somewhere."""
    base = model_matrices(1)
    matrices = [Matrix(m.name.replace("layers.0", f"layers.{b}"), m.shape, m.sigma2, e)
                for b, e in ((0, 1.0), (1, 100.0)) for m in base]  # fmt: skip
    ranks = allocate(matrices, 0.4, "residual")
    small = [ranks[m.name] for m in matrices[: len(base)]]
    large = [ranks[m.name] for m in matrices[len(base) :]]
    assert all(s >= g for s, g in zip(small, large, strict=True)) and small != large


def test_a_matrix_whose_spectrum_looks_cheap_is_not_starved():
    """The failure the floor exists for: a spectrum-only greedy gave one matrix rank 1."""
    matrices = model_matrices(2)
    cheap = matrices[3]
    matrices[3] = Matrix(cheap.name, cheap.shape, cheap.sigma2 * 1e-12, cheap.energy)
    for how in ("grouped", "residual"):
        rank = allocate(matrices, 0.4, how)[cheap.name]
        assert rank == rank_bounds(cheap, 0.4)[0] > 1


def test_non_uniform_allocation_without_spectra_is_refused():
    with pytest.raises(StreamSVDError, match="needs the spectra"):
        allocate([Matrix("layers.0.mlp.up_proj", (160, 64))], 0.4, "grouped")
    with pytest.raises(StreamSVDError, match="unknown allocation"):
        allocate(model_matrices(1), 0.4, "greedy")


def test_many_experts_are_allocated_within_the_budget():
    """An MoE model has tens of thousands of matrices (6,144 here): one expert each."""
    gen = torch.Generator().manual_seed(1)
    matrices = [
        Matrix(f"layers.{b}.mlp.experts.{e}.{kind}", (48, 32),
               torch.sort(torch.rand(32, generator=gen, dtype=torch.float64), descending=True)[0])
        for b in range(16) for e in range(128) for kind in ("gate_proj", "up_proj", "down_proj")
    ]  # fmt: skip
    ranks = allocate(matrices, 0.4, "residual")
    assert budget(matrices, 0.4) - 80 < spent(matrices, ranks) <= budget(matrices, 0.4)
