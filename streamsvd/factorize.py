"""Low-rank factorisation methods: pure functions `W, stats, rank -> (A, B)` with W ≈ A·B.

W is (m, n) = (out_features, in_features), A is (m, r), B is (r, n); all float64.
A new method is one function here and one entry in METHODS.

Every method also takes an optional `clock`: a function of a stage name ("cholesky",
"svd", "update") returning a context manager, which a caller can use to time the stages;
it never changes a result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

from .stats import InputStats, damped_cholesky

Factors = tuple[torch.Tensor, torch.Tensor]
Clock = Callable[[str], contextlib.AbstractContextManager]


def untimed(stage: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def rank_for(m: int, n: int, ratio: float) -> int:
    """Rank that removes `ratio` of an m×n layer's parameters: r(m + n) ≤ (1 − ratio)·m·n."""
    keep = 1 - Fraction(str(float(ratio)))  # exact: in floats 2560×2560 at 0.8 gave 255, not 256
    return max(1, math.floor(keep * m * n / (m + n)))


def _split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, rank: int) -> Factors:
    root = s[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def plain_svd(
    W: torch.Tensor, stats: InputStats | None, rank: int, clock: Clock = untimed
) -> Factors:
    """Truncated SVD of W itself: optimal in ‖W − AB‖_F, blind to the inputs (baseline)."""
    with clock("svd"):
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        return _split(U, s, Vh, rank)


RSVD_OVERSAMPLE = 10
RSVD_POWER_ITERATIONS = 2


def randomized_svd(
    W: torch.Tensor, stats: InputStats | None, rank: int, clock: Clock = untimed
) -> Factors:
    """Truncated SVD of W by randomised range finding (Halko, Martinsson & Tropp 2011,
    algorithm 4.4: subspace iteration): O(m·n·r) work instead of the O(m·n·min(m, n)) of a
    full SVD, and near `svd` when the spectrum decays. Seeded, so the same W always gives
    the same factors. For quick runs at scale and high ratios."""
    with clock("svd"):
        m, n = W.shape
        q = min(rank + RSVD_OVERSAMPLE, m, n)
        gen = torch.Generator(device=W.device).manual_seed(0)
        omega = torch.randn(n, q, generator=gen, dtype=W.dtype, device=W.device)
        Q = torch.linalg.qr(W @ omega).Q  # (m, q): an orthonormal basis of W's range
        for _ in range(RSVD_POWER_ITERATIONS):
            Q = torch.linalg.qr(W.T @ Q).Q  # (n, q)
            Q = torch.linalg.qr(W @ Q).Q  # (m, q)
        U, s, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (q, q), (q,), (q, n)
        return _split(Q @ U, s, Vh, rank)


def whitened_truncation(
    W: torch.Tensor, L: torch.Tensor, rank: int, clock: Clock = untimed
) -> Factors:
    """Best rank-r A·B in ‖(W − AB)·L‖_F for lower-triangular L (L Lᵀ = a Gram of inputs).

    SVD of W·L = UΣVᵀ, keep r: A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ L⁻¹. Each dropped singular value
    σ_i adds exactly σ_i² to the loss, so truncation drops what matters least.
    """
    with clock("svd"):
        U, s, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        A, BL = _split(U, s, Vh, rank)
        B = torch.linalg.solve_triangular(L, BL, upper=False, left=False)  # B·L = BL
        return A, B


def svdllm_w(W: torch.Tensor, stats: InputStats, rank: int, clock: Clock = untimed) -> Factors:
    """SVD-LLM truncation-aware whitening with the original stream: minimises ‖(W − AB)X‖."""
    with clock("cholesky"):
        L = damped_cholesky(stats.G, "G")
    return whitened_truncation(W, L, rank, clock)


def svdllm_u(W: torch.Tensor, stats: InputStats, rank: int, clock: Clock = untimed) -> Factors:
    """SVD-LLM's update as its official code does it: keep the whitened B, then refit A by
    least squares so that A·B·x' matches W·x' on the compressed-stream inputs:
    A = W·G'·Bᵀ·(B·G'·Bᵀ)⁻¹."""
    _, B = svdllm_w(W, stats, rank, clock)
    with clock("update"):
        H = B @ stats.Gc @ B.T  # (r, r)
        L = damped_cholesky(H, "B·G'·Bᵀ")
        A = torch.cholesky_solve(B @ stats.Gc @ W.T, L).T  # (m, r)
        return A, B


UPDATE_FRACTION = 0.25  # λ; chosen on held-out text by benchmarks/tune_lambda.py (README)


def svdllm_a(W: torch.Tensor, stats: InputStats, rank: int, clock: Clock = untimed) -> Factors:
    """The paper's update W·X·X'ᵀ(X'X'ᵀ)⁻¹, applied by a fraction λ (UPDATE_FRACTION).

    The paper's target is the original model's outputs W·X, to be produced from the
    compressed stream X'. Solved in full (λ = 1) it regresses away the part of the
    propagated error that X' cannot predict, which shrinks every layer's outputs and
    compounds with depth (perplexity 251 vs 56.5 for svdllm-w on SmolLM2 at ratio 0.2).
    We aim at a point between the original outputs and this layer's own outputs:
    min over rank-r W' of ‖W·(λX + (1 − λ)X') − W'·X'‖². Its unconstrained solution is
    W_hat = (1 − λ)·W + λ·W·C·G'⁻¹; whitened truncation of W_hat with chol(G') then gives
    the exact rank-r minimiser. λ = 0 is the exact form of svdllm-u's objective.
    """
    lam = UPDATE_FRACTION
    with clock("cholesky"):
        L = damped_cholesky(stats.Gc, "G'")
    with clock("update"):
        corrected = torch.cholesky_solve((W @ stats.C).T, L).T  # W·C·G'⁻¹
        W_hat = (1 - lam) * W + lam * corrected
    return whitened_truncation(W_hat, L, rank, clock)


@dataclass(frozen=True)
class Method:
    name: str
    factorize: Callable[..., Factors]  # (W, stats, rank, clock=untimed) -> (A, B)
    needs: frozenset[str]  # which sums of stats.NEEDS it reads
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("svd", plain_svd, frozenset(), "plain truncated SVD of W (baseline)"),
        Method("rsvd", randomized_svd, frozenset(), "randomised truncated SVD of W (fast svd)"),
        Method("svdllm-w", svdllm_w, frozenset({"orig"}), "SVD-LLM whitening"),
        Method("svdllm-u", svdllm_u, frozenset({"orig", "comp"}), "SVD-LLM whitening + update"),
        Method(
            "svdllm-a",
            svdllm_a,
            frozenset({"comp", "cross"}),
            "whitening on the compressed stream + a fraction of the paper's update",
        ),
    ]
}
