"""Low-rank factorisation methods: pure functions `W, stats, rank -> (A, B)` with W ≈ A·B.

W is (m, n) = (out_features, in_features), A is (m, r), B is (r, n); all float64.
A new method is one function here and one entry in METHODS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .stats import InputStats, damped_cholesky

Factors = tuple[torch.Tensor, torch.Tensor]


def rank_for(m: int, n: int, ratio: float) -> int:
    """Rank that removes `ratio` of an m×n layer's parameters: r(m + n) ≤ (1 − ratio)·m·n."""
    return max(1, math.floor((1 - ratio) * m * n / (m + n)))


def _split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, rank: int) -> Factors:
    root = s[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def plain_svd(W: torch.Tensor, stats: InputStats | None, rank: int) -> Factors:
    """Truncated SVD of W itself: optimal in ‖W − AB‖_F, blind to the inputs (baseline)."""
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    return _split(U, s, Vh, rank)


def whitened_truncation(W: torch.Tensor, L: torch.Tensor, rank: int) -> Factors:
    """Best rank-r A·B in ‖(W − AB)·L‖_F for lower-triangular L (L Lᵀ = a Gram of inputs).

    SVD of W·L = UΣVᵀ, keep r: A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ L⁻¹. Each dropped singular value
    σ_i adds exactly σ_i² to the loss, so truncation drops what matters least.
    """
    U, s, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    A, BL = _split(U, s, Vh, rank)
    B = torch.linalg.solve_triangular(L, BL, upper=False, left=False)  # B·L = BL
    return A, B


def svdllm_w(W: torch.Tensor, stats: InputStats, rank: int) -> Factors:
    """SVD-LLM truncation-aware whitening with the original stream: minimises ‖(W − AB)X‖."""
    return whitened_truncation(W, damped_cholesky(stats.G, "G"), rank)


def svdllm_u(W: torch.Tensor, stats: InputStats, rank: int) -> Factors:
    """SVD-LLM's update as its official code does it: keep the whitened B, then refit A by
    least squares so that A·B·x' matches W·x' on the compressed-stream inputs:
    A = W·G'·Bᵀ·(B·G'·Bᵀ)⁻¹."""
    _, B = svdllm_w(W, stats, rank)
    H = B @ stats.Gc @ B.T  # (r, r)
    L = damped_cholesky(H, "B·G'·Bᵀ")
    A = torch.cholesky_solve(B @ stats.Gc @ W.T, L).T  # (m, r)
    return A, B


ANCHOR_WEIGHT = 1.0


def svdllm_a(W: torch.Tensor, stats: InputStats, rank: int) -> Factors:
    """The paper's update W·X·X'ᵀ(X'X'ᵀ)⁻¹, anchored to the original stream.

    The paper's target is the original model's outputs W·X, to be produced from the
    compressed stream X'. Solved alone it overfits directions in which X' hardly varies.
    We fit both: min ‖W·X − W'·X'‖² + μ‖W·X − W'·X‖² over rank-r W' (μ = ANCHOR_WEIGHT),
    i.e. the same target from the tokens of both streams. With K = G' + μG the solution
    is W_hat = W·(C + μG)·K⁻¹, then whitened truncation of W_hat with chol(K), exact for
    the rank constraint. μ → ∞ gives svdllm-w; μ = 0 the naive form.
    """
    K = stats.Gc + ANCHOR_WEIGHT * stats.G  # (n, n)
    L = damped_cholesky(K, "G' + μG")
    target = W @ (stats.C + ANCHOR_WEIGHT * stats.G)  # (m, n): W·(C + μG)
    W_hat = torch.cholesky_solve(target.T, L).T  # W_hat·K = target
    return whitened_truncation(W_hat, L, rank)


@dataclass(frozen=True)
class Method:
    name: str
    factorize: Callable[[torch.Tensor, InputStats, int], Factors]
    needs: frozenset[str]  # which sums of stats.NEEDS it reads
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("svd", plain_svd, frozenset(), "plain truncated SVD of W (baseline)"),
        Method("svdllm-w", svdllm_w, frozenset({"orig"}), "SVD-LLM whitening"),
        Method("svdllm-u", svdllm_u, frozenset({"orig", "comp"}), "SVD-LLM whitening + update"),
        Method(
            "svdllm-a",
            svdllm_a,
            frozenset({"orig", "comp", "cross"}),
            "whitening + anchored closed-form update (paper's target)",
        ),
    ]
}
