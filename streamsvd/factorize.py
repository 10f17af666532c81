"""Low-rank factorisation methods: pure functions `W, stats, rank -> (A, B)` with W ≈ A·B.

W is (m, n) = (out_features, in_features) in any float dtype (converted to float64 a
block of rows at a time where the method allows); A is (m, r), B is (r, n), float64.
`stats` is the layer's `stats.LinearStats` (None for methods that need no data); a method
consumes it: Grams are overwritten by their Cholesky factors, W·C is handed over.
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

from .errors import StreamSVDError
from .stats import CHOLESKY_BLOCK, CHUNK_VALUES

Factors = tuple[torch.Tensor, torch.Tensor]
Clock = Callable[[str], contextlib.AbstractContextManager]


def untimed(stage: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def rank_for(m: int, n: int, ratio: float) -> int:
    """Rank that removes `ratio` of an m×n layer's parameters: r(m + n) ≤ (1 − ratio)·m·n."""
    keep = 1 - Fraction(str(float(ratio)))  # exact: in floats 2560×2560 at 0.8 gave 255, not 256
    return max(1, math.floor(keep * m * n / (m + n)))


def worth_factorising(m: int, n: int, ratio: float) -> bool:
    """Whether an m×n layer's two factors at `ratio` hold fewer values than W. Rank is at
    least 1, so a very narrow layer (a gate with one output) stays dense."""
    return rank_for(m, n, ratio) * (m + n) < m * n


def _split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, rank: int) -> Factors:
    root = s[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def plain_svd(W: torch.Tensor, stats, rank: int, clock: Clock = untimed) -> Factors:
    """Truncated SVD of W itself: optimal in ‖W − AB‖_F, blind to the inputs (baseline)."""
    with clock("svd"):
        U, s, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
        return _split(U, s, Vh, rank)


RSVD_OVERSAMPLE = 10
RSVD_POWER_ITERATIONS = 2


def randomized_svd(W: torch.Tensor, stats, rank: int, clock: Clock = untimed) -> Factors:
    """Truncated SVD of W by randomised range finding (Halko, Martinsson & Tropp 2011,
    algorithm 4.4: subspace iteration): O(m·n·r) work instead of the O(m·n·min(m, n)) of a
    full SVD, and near `svd` when the spectrum decays. Seeded, so the same W always gives
    the same factors. For quick runs at scale and high ratios."""
    with clock("svd"):
        W = W.to(torch.float64)
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


def truncate_whitened(
    Y: torch.Tensor, L: torch.Tensor, rank: int, clock: Clock = untimed
) -> Factors:
    """Best rank-r A·B in ‖(Ŵ − AB)·L‖_F, given Y = Ŵ·L (m, n) and lower-triangular L
    (L Lᵀ = a Gram of inputs).

    With Y = UΣVᵀ the minimiser is A·B = U_r U_rᵀ Ŵ = Ŵ L V_r V_rᵀ L⁻¹; each dropped σ_i adds
    exactly σ_i² to the loss. U_r (or V_r) comes from the eigendecomposition of the smaller
    Gram, Y·Yᵀ or Yᵀ·Y: faster than an SVD of Y on CPU (docs/memory.md, "What one block of
    the default method holds") and its memory is min(m, n)²;
    the projection itself is applied to Y exactly (tests/test_factorize.py checks the loss
    against the SVD's). Balanced as A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ L⁻¹.
    """
    m, n = Y.shape
    with clock("svd"):
        if m <= n:
            _, U = torch.linalg.eigh(Y @ Y.mT)  # ascending eigenvalues
            A = U[:, m - rank :].flip(1).contiguous()  # (m, r) = U_r
            del U
            B = A.mT @ Y  # (r, n) = Σ_r V_rᵀ
            sigma = torch.linalg.vector_norm(B, dim=1)
            torch.linalg.solve_triangular(L, B, upper=False, left=False, out=B)  # ·L⁻¹
        else:
            _, V = torch.linalg.eigh(Y.mT @ Y)
            Vr = V[:, n - rank :].flip(1).contiguous()  # (n, r) = V_r
            del V
            A = Y @ Vr  # (m, r) = U_r Σ_r
            sigma = torch.linalg.vector_norm(A, dim=0)
            A /= torch.where(sigma > 0, sigma, 1)  # U_r
            B = torch.linalg.solve_triangular(L, Vr.mT.contiguous(), upper=False, left=False)
            B *= sigma[:, None]  # (r, n) = Σ_r V_rᵀ L⁻¹
        root = sigma.sqrt()
        A *= root
        B /= torch.where(root > 0, root, 1)[:, None]
        return A, B


def whitened_truncation(
    W: torch.Tensor, L: torch.Tensor, rank: int, clock: Clock = untimed
) -> Factors:
    """Best rank-r A·B in ‖(W − AB)·L‖_F for lower-triangular L (L Lᵀ = a Gram of inputs)."""
    with clock("svd"):
        Y = _times_float64(W, L)
    return truncate_whitened(Y, L, rank, clock)


def _times_float64(W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """W·M in float64 for W in any dtype, converting a block of W's rows at a time."""
    out = torch.empty(W.shape[0], M.shape[1], dtype=torch.float64, device=M.device)
    rows = max(1, CHUNK_VALUES // W.shape[1])
    for r in range(0, W.shape[0], rows):
        torch.mm(W[r : r + rows].to(M.device, torch.float64), M, out=out[r : r + rows])
    return out


def svdllm_w(W: torch.Tensor, stats, rank: int, clock: Clock = untimed) -> Factors:
    """SVD-LLM truncation-aware whitening with the original stream: minimises ‖(W − AB)X‖."""
    with clock("cholesky"):
        L = stats.whitener("orig")
    return whitened_truncation(W, L, rank, clock)


def svdllm_u(W: torch.Tensor, stats, rank: int, clock: Clock = untimed) -> Factors:
    """SVD-LLM's update as its official code does it: keep the whitened B, then refit A by
    least squares so that A·B·x' matches W·x' on the compressed-stream inputs."""
    _, B = svdllm_w(W, stats, rank, clock)
    return refit_up(W, B, stats, clock)


def svd_u(W: torch.Tensor, stats, rank: int, clock: Clock = untimed) -> Factors:
    """The SVD-LLM code's third pipeline: the closed-form update without whitening. B of
    W's own truncated SVD, then A refit on the compressed-stream inputs as svdllm-u does."""
    _, B = plain_svd(W, None, rank, clock)
    return refit_up(W, B, stats, clock)


def refit_up(W: torch.Tensor, B: torch.Tensor, stats, clock: Clock = untimed) -> Factors:
    """A = W·G'·Bᵀ·(B·G'·Bᵀ)⁻¹: the least-squares A for a fixed B, so that A·B·x' matches
    W·x' on the compressed stream (G' = Σ x'x'ᵀ), from float64 Grams."""
    with clock("update"):
        W = W.to(torch.float64)
        H = B @ stats.Gc @ B.T  # (r, r)
        L = stats.cholesky(H, "B·G'·Bᵀ")  # damped_cholesky, counted with the group's
        A = torch.cholesky_solve(B @ stats.Gc @ W.T, L).T  # (m, r)
        return A, B


UPDATE_FRACTION = 0.25  # λ; chosen on held-out text (docs/method.md; tune_lambda.py, 1a333f6)


def svdllm_a(W: torch.Tensor, stats, rank: int, clock: Clock = untimed) -> Factors:
    """The paper's update W·X·X'ᵀ(X'X'ᵀ)⁻¹, applied by a fraction λ (UPDATE_FRACTION).

    The paper's target is the original model's outputs W·X, to be produced from the
    compressed stream X'. Solved in full (λ = 1) it regresses away the part of the
    propagated error that X' cannot predict, which shrinks every layer's outputs and
    compounds with depth (perplexity 251 vs 56.5 for svdllm-w on SmolLM2 at ratio 0.2).
    We aim at a point between the original outputs and this layer's own outputs:
    min over rank-r W' of ‖W·(λX + (1 − λ)X') − W'·X'‖². Its unconstrained solution is
    Ŵ = (1 − λ)·W + λ·W·C·G'⁻¹, and whitened truncation of Ŵ with L = chol(G') gives the
    exact rank-r minimiser. λ = 0 is the exact form of svdllm-u's objective.

    Memory: Ŵ·L = (1 − λ)·W·L + λ·W·C·L⁻ᵀ is formed in the one m×n buffer that holds W·C
    (a triangular solve in place), so beyond the sums nothing larger than m×n and
    min(m, n)² is allocated; L overwrites G'.
    """
    lam = UPDATE_FRACTION
    with clock("cholesky"):
        L = stats.whitener("comp")
    with clock("update"):
        Y = stats.weighted_cross(W)  # (m, n) W·C, ours to overwrite
        torch.linalg.solve_triangular(L.mT, Y, upper=True, left=False, out=Y)  # W·C·L⁻ᵀ
        Y *= lam
        rows = max(1, CHUNK_VALUES // W.shape[1])
        for r in range(0, W.shape[0], rows):  # += (1 − λ)·W·L, a block of rows at a time
            Y[r : r + rows].addmm_(W[r : r + rows].to(L.device, torch.float64), L, alpha=1 - lam)
    return truncate_whitened(Y, L, rank, clock)


def eigen_truncation(P: torch.Tensor, G: torch.Tensor, rank: int,
                     clock: Clock = untimed) -> Factors:  # fmt: skip
    """Best rank-r A·B in ‖T − A·B·X‖_F given only P = T·Xᵀ (m, n) and G = X·Xᵀ (n, n),
    exact when G is singular (SVD-LLM V2's loss-optimised truncation).

    With G = QΛQᵀ restricted to its numerical range (Λ > n·ε·λ_max), the minimiser is
    A·B = U_r U_rᵀ P G⁺, U_r the top left singular vectors of Y = P·Q·Λ^-½: no inverse of
    anything singular and no damping, so a dead input channel or fewer tokens than
    dimensions costs nothing. The price is an eigendecomposition of G (about 5 n² values
    of workspace against Cholesky's in-place factor), so this is an option, not the
    default. Balanced as A = U_r Σ_r^½, B = Σ_r^-½ U_rᵀ P G⁺.
    """
    m, n = P.shape
    with clock("cholesky"):  # the whitening, by eigendecomposition
        lam, Q = torch.linalg.eigh(G.to(torch.float64))  # ascending
        keep = lam > n * torch.finfo(torch.float64).eps * lam[-1].clamp(min=0)
        Q, root = Q[:, keep], lam[keep].sqrt()
    with clock("svd"):
        Y = (P.to(torch.float64) @ Q) / root  # (m, k)
        k = Y.shape[1]
        if m <= k:
            _, U = torch.linalg.eigh(Y @ Y.mT)
            U = U[:, max(m - rank, 0) :].flip(1)
        else:
            _, V = torch.linalg.eigh(Y.mT @ Y)
            V = V[:, max(k - rank, 0) :].flip(1)
            U = Y @ V
            U /= torch.linalg.vector_norm(U, dim=0).clamp(min=torch.finfo(torch.float64).tiny)
        B = (U.mT @ Y) / root @ Q.mT  # (r', n) = U_rᵀ P G⁺
        sigma = torch.linalg.vector_norm(U.mT @ Y, dim=1)
        scale = torch.where(sigma > 0, sigma.sqrt(), 1)
        A, B = U * scale, B / scale[:, None]
        if A.shape[1] < rank:  # G's range is narrower than the rank: the rest is zero
            A = torch.cat([A, A.new_zeros(m, rank - A.shape[1])], dim=1)
            B = torch.cat([B, B.new_zeros(rank - B.shape[0], n)], dim=0)
        return A, B


def svdllm_w_eigen(W: torch.Tensor, stats, rank: int, clock: Clock = untimed) -> Factors:
    """svdllm-w by eigen_truncation: minimises ‖(W − AB)X‖ exactly, singular G included."""
    G = stats.G
    return eigen_truncation(_times_float64(W, G), G, rank, clock)


def svdllm_a_eigen(W: torch.Tensor, stats, rank: int, clock: Clock = untimed) -> Factors:
    """svdllm-a by eigen_truncation: min ‖W·(λX + (1 − λ)X') − A·B·X'‖ exactly, with
    P = λ·W·C + (1 − λ)·W·G' and the compressed stream's G'."""
    lam = UPDATE_FRACTION
    with clock("update"):
        P = stats.weighted_cross(W)  # (m, n) W·C, ours to overwrite
        P *= lam
        P += (1 - lam) * _times_float64(W, stats.Gc)
    return eigen_truncation(P, stats.Gc, rank, clock)


# -- memory: float64 values a factorisation allocates beyond its group's sums ---------------
# Measured with torch.linalg on CPU (see `plan.py`); the run's peak RSS is checked against
# the plan in tests/test_scale.py and benchmarks/scale.py.
SVD_MN, SVD_K2 = 3.0, 3.0  # torch.linalg.svd of m×n: LAPACK copy, U, Vh, workspace
RSVD_MQ = 2.5  # randomized_svd: the (m + n)·q bases and products, then an SVD of q×n
EIGH_K2 = 4.0  # eigh of a k×k Gram: the Gram, the eigenvectors, syevd's 2k² workspace


def svd_temp(m: int, n: int) -> float:
    return SVD_MN * m * n + SVD_K2 * min(m, n) ** 2


def cholesky_temp(n: int) -> float:
    """damped_cholesky_: copies of the diagonal blocks, one panel, a block's factor."""
    b = min(CHOLESKY_BLOCK, n)
    return 2 * n * b + 2 * b * b


def truncation_temp(m: int, n: int, rank: int) -> float:
    """truncate_whitened, Y excluded: the Gram's eigenvectors, then the factors."""
    k = min(m, n)
    return max(EIGH_K2 * k * k, k * k + k * rank, rank * (m + n) + k * rank)


def workspace(method: str, m: int, n: int, rank: int, owns_cross: bool = False) -> float:
    """Peak float64 values one factorisation of an m×n W allocates beyond its group's sums
    (`stats.sum_shapes`) and W itself. owns_cross: the W·C sum is this linear's (counted with
    the sums) and becomes its m×n work buffer."""
    mn = m * n
    if method == "svd":
        return mn + svd_temp(m, n)
    if method == "svd-u":  # the SVD, then as svdllm-u's refit
        return mn + svd_temp(m, n) + 2 * rank * n + 2 * rank * rank + rank * m
    if method == "rsvd":
        q = min(rank + RSVD_OVERSAMPLE, m, n)
        return mn + RSVD_MQ * (m + n) * q + svd_temp(q, n)
    whiten = max(cholesky_temp(n), mn + truncation_temp(m, n, rank))
    if method == "svdllm-w":
        return whiten
    if method == "svdllm-u":  # W in float64, B·G'·Bᵀ and its factor, the refit
        return whiten + mn + 2 * rank * n + 2 * rank * rank + rank * m
    if method == "svdllm-a":
        return max(cholesky_temp(n), (0 if owns_cross else mn) + truncation_temp(m, n, rank))
    if method in ("svdllm-w-eigen", "svdllm-a-eigen"):  # P, W·G', eigh of G, Y, its Gram
        return (0 if owns_cross else mn) + mn + EIGH_K2 * n * n + mn + truncation_temp(m, n, rank)
    raise StreamSVDError(f"no memory model for method {method!r}")


@dataclass(frozen=True)
class Method:
    name: str
    factorize: Callable[..., Factors]  # (W, stats, rank, clock=untimed) -> (A, B)
    needs: frozenset[str]  # which sums of stats.NEEDS it reads
    summary: str

    @property
    def streams(self) -> tuple[str, ...]:
        """Which activation streams the method needs carried from block to block. Any
        statistics need the original stream: a block's linears are found, and its
        original outputs carried on, by running it."""
        out = []
        if self.needs:
            out.append("orig")
        if self.needs & {"comp", "cross"}:
            out.append("comp")
        return tuple(out)

    def workspace(self, m: int, n: int, rank: int, owns_cross: bool = False) -> float:
        return workspace(self.name, m, n, rank, owns_cross)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("svd", plain_svd, frozenset(), "plain truncated SVD of W (baseline)"),
        Method("rsvd", randomized_svd, frozenset(), "randomised truncated SVD of W (fast svd)"),
        Method("svdllm-w", svdllm_w, frozenset({"orig"}), "SVD-LLM whitening"),
        Method("svdllm-u", svdllm_u, frozenset({"orig", "comp"}), "SVD-LLM whitening + update"),
        Method("svd-u", svd_u, frozenset({"comp"}), "plain SVD + SVD-LLM's update (no whitening)"),
        Method(
            "svdllm-a",
            svdllm_a,
            frozenset({"comp", "cross"}),
            "whitening on the compressed stream + a fraction of the paper's update",
        ),
        Method(
            "svdllm-w-eigen",
            svdllm_w_eigen,
            frozenset({"orig"}),
            "svdllm-w, truncated through the Gram's eigendecomposition (exact when singular)",
        ),
        Method(
            "svdllm-a-eigen",
            svdllm_a_eigen,
            frozenset({"comp", "cross"}),
            "svdllm-a, truncated through the Gram's eigendecomposition (exact when singular)",
        ),
    ]
}
