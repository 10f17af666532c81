"""The factorisation methods against their defining objectives, in float64.

Convention here: X is (n, N), one column per calibration token; W is (m, n). Factors are
compared only through their product A·B, since SVD signs are arbitrary.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import assert_within_summation_bound

from streamsvd import factorize
from streamsvd.factorize import (
    METHODS,
    plain_svd,
    rank_for,
    svd_u,
    svdllm_a,
    svdllm_u,
    svdllm_w,
)
from streamsvd.stats import InputStats

M, N_IN, N_TOK, RANK = 48, 40, 240, 12


def problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (m, n); X (n, N) with a far-from-identity covariance (spectrum over 3 decades,
    a mean offset); X' (n, N) the same tokens perturbed, as a compressed stream would be."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N_IN, dtype=torch.float64, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(N_IN, N_IN, dtype=torch.float64, generator=g))
    mix = Q * torch.logspace(0, -1.5, N_IN, dtype=torch.float64)  # (n, n)
    X = mix @ torch.randn(N_IN, N_TOK, dtype=torch.float64, generator=g) + 0.05
    noise = torch.randn(N_IN, N_IN, dtype=torch.float64, generator=g) @ X / N_IN**0.5
    Xc = X + 0.3 * noise + 0.02 * torch.randn(N_IN, N_TOK, dtype=torch.float64, generator=g)
    return W, X, Xc


def stats_for(X: torch.Tensor, Xc: torch.Tensor) -> InputStats:
    """InputStats fed as the pipeline feeds it: token-major chunks, through `add`. Methods
    consume their stats (Grams become factors), so each call gets its own."""
    stats = InputStats(N_IN, frozenset({"orig", "comp", "cross"}), "cpu")
    for start in range(0, N_TOK, 80):
        stats.add(X[:, start : start + 80].T, Xc[:, start : start + 80].T)
    assert_within_summation_bound(stats.G, X, X.T)
    assert_within_summation_bound(stats.Gc, Xc, Xc.T)
    assert_within_summation_bound(stats.C, X, Xc.T)
    return stats


def loss(W: torch.Tensor, Wr: torch.Tensor, X: torch.Tensor) -> float:
    """‖(W − W')X‖²_F"""
    return float(((W - Wr) @ X).square().sum())


def partial_update_objective(W, Wr, X, Xc, lam) -> float:
    """‖W(λX + (1 − λ)X') − W'X'‖²: svdllm-a's objective."""
    return float((W @ (lam * X + (1 - lam) * Xc) - Wr @ Xc).square().sum())


def tail(matrix: torch.Tensor, rank: int) -> float:
    """Σ of the squared singular values beyond `rank`: the Eckart–Young optimum."""
    return float(torch.linalg.svdvals(matrix)[rank:].square().sum())


def product(factors) -> torch.Tensor:
    A, B = factors
    assert A.shape == (M, RANK) and B.shape == (RANK, N_IN)
    assert A.dtype == B.dtype == torch.float64
    return A @ B


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svdllm_w_loss_is_the_discarded_spectrum_of_w_times_chol(seed):
    W, X, Xc = problem(seed)
    stats = stats_for(X, Xc)
    S = torch.linalg.cholesky(X @ X.T)  # independent of the library's damped version
    assert torch.linalg.cond(S) > 10  # a non-trivial whitening
    Wr = product(svdllm_w(W, stats, RANK))
    assert int(torch.linalg.matrix_rank(Wr)) == RANK
    optimum = tail(W @ S, RANK)
    assert loss(W, Wr, X) == pytest.approx(optimum, rel=1e-9)
    plain = product(plain_svd(W, None, RANK))
    assert float((W - plain).square().sum()) == pytest.approx(tail(W, RANK), rel=1e-9)
    assert loss(W, Wr, X) < 0.9 * loss(W, plain, X)  # whitening pays off on correlated X


@pytest.mark.parametrize("seed", range(5))
def test_svdllm_u_refit_never_loses_on_the_compressed_stream(seed):
    W, X, Xc = problem(seed)
    stats = stats_for(X, Xc)
    Ww = product(svdllm_w(W, stats, RANK))
    A, B = svdllm_u(W, stats, RANK)
    Wu = product((A, B))
    assert loss(W, Wu, Xc) <= loss(W, Ww, Xc) * (1 + 1e-12)
    # A is the least-squares optimum for its B: the gradient (W − AB)·X'X'ᵀ·Bᵀ vanishes
    grad = (W - Wu) @ Xc @ Xc.T @ B.T
    scale = (W @ Xc @ Xc.T @ B.T).abs().max()
    assert float(grad.abs().max()) <= 1e-10 * float(scale)
    # and B is the whitened B: the row space of the product is unchanged
    rows = torch.linalg.svd(Ww).Vh[:RANK]  # (r, n): an orthonormal basis of Ww's row space
    proj = rows.T @ rows
    torch.testing.assert_close(Wu @ proj, Wu, rtol=0, atol=1e-10 * float(Wu.abs().max()))


@pytest.mark.parametrize("seed", range(3))
def test_svd_u_refits_plain_svd_on_the_compressed_stream(seed):
    """The SVD-LLM code's update without whitening: B spans W's own top-r right singular
    vectors, A is the least-squares optimum for it on X', so it never loses to plain SVD
    there."""
    W, X, Xc = problem(seed)
    A, B = svd_u(W, stats_for(X, Xc), RANK)
    Wu, plain = product((A, B)), product(plain_svd(W, None, RANK))
    assert loss(W, Wu, Xc) <= loss(W, plain, Xc) * (1 + 1e-12)
    grad = (W - Wu) @ Xc @ Xc.T @ B.T
    assert float(grad.abs().max()) <= 1e-10 * float((W @ Xc @ Xc.T @ B.T).abs().max())
    rows = torch.linalg.svd(W).Vh[:RANK]
    torch.testing.assert_close(Wu @ rows.T @ rows, Wu, rtol=0, atol=1e-10 * float(Wu.abs().max()))
    assert METHODS["svd-u"].needs == {"comp"} and METHODS["svd-u"].streams == ("orig", "comp")


@pytest.mark.parametrize("seed", range(3))
def test_svdllm_a_is_the_exact_rank_constrained_minimiser(seed):
    W, X, Xc = problem(seed)
    stats = stats_for(X, Xc)
    lam = factorize.UPDATE_FRACTION
    Wa = product(svdllm_a(W, stats, RANK))
    Ww = product(svdllm_w(W, stats_for(X, Xc), RANK))
    Wu = product(svdllm_u(W, stats_for(X, Xc), RANK))
    f = lambda Wr: partial_update_objective(W, Wr, X, Xc, lam)  # noqa: E731
    assert f(Wa) <= f(Ww) and f(Wa) <= f(Wu)
    # Independently: f(W') = ‖T − W'X'‖² with T = W(λX + (1 − λ)X'). Its unconstrained
    # minimiser by least squares, then f(W') = f(Ŵ) + ‖(W' − Ŵ)·chol(X'X'ᵀ)‖², whose rank-r
    # minimum is f(Ŵ) plus the discarded spectrum of Ŵ·chol(X'X'ᵀ).
    T = W @ (lam * X + (1 - lam) * Xc)  # (m, N)
    W_hat = torch.linalg.lstsq(Xc.T, T.T, driver="gelsd").solution.T  # (m, n)
    optimum = f(W_hat) + tail(W_hat @ torch.linalg.cholesky(Xc @ Xc.T), RANK)
    assert f(Wa) == pytest.approx(optimum, rel=1e-9)
    # random rank-r neighbours are never better
    g = torch.Generator().manual_seed(100 + seed)
    A, B = svdllm_a(W, stats_for(X, Xc), RANK)
    for _ in range(5):
        dA = 1e-3 * torch.randn(A.shape, dtype=torch.float64, generator=g)
        dB = 1e-3 * torch.randn(B.shape, dtype=torch.float64, generator=g)
        assert f((A + dA) @ (B + dB)) >= f(Wa)


def test_svdllm_a_matches_svdllm_w_when_streams_agree():
    """With X' = X the objective is ‖(W − W')X‖²: svdllm-w's problem."""
    W, X, _ = problem(3)
    stats = stats_for(X, X)
    torch.testing.assert_close(
        product(svdllm_a(W, stats, RANK)),
        product(svdllm_w(W, stats_for(X, X), RANK)),
        rtol=0,
        atol=1e-9,
    )


def test_methods_registry_names_their_functions_and_needs():
    assert set(METHODS) >= {"svd", "svdllm-w", "svdllm-u", "svdllm-a"}
    assert METHODS["svd"].needs == frozenset()
    assert METHODS["svdllm-w"].needs == {"orig"}
    assert METHODS["svdllm-u"].needs >= {"orig", "comp"}
    W, X, Xc = problem(4)
    stats = stats_for(X, Xc)
    for name, fn in [("svd", plain_svd), ("svdllm-w", svdllm_w), ("svdllm-u", svdllm_u),
                     ("svdllm-a", svdllm_a)]:  # fmt: skip
        torch.testing.assert_close(
            product(METHODS[name].factorize(W, stats, RANK)), product(fn(W, stats, RANK))
        )


# -- rank_for --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m, n, ratio, rank",
    [
        (64, 64, 0.2, 25),  # 0.8·4096/128 = 25.6
        (128, 64, 0.2, 34),  # 0.8·8192/192 = 34.13
        (64, 128, 0.2, 34),  # symmetric in m, n
        (64, 64, 0.5, 16),  # exactly on the budget: 16·128 = 0.5·4096
        (4096, 4096, 0.2, 1638),  # Llama-2-7B attention
        (11008, 4096, 0.2, 2388),  # Llama-2-7B MLP: 0.8·11008·4096/15104 = 2388.18
        (18, 20, 0.05, 9),  # 0.95·360/38 = 9 exactly in decimal
        (2560, 2560, 0.8, 256),  # 0.2·1280 = 256 exactly; float arithmetic says 255.99...
        (2, 2, 0.9, 1),  # the floor is 0: at least rank 1
    ],
)
def test_rank_for_exact_values(m, n, ratio, rank):
    expected = max(1, math.floor((1 - Fraction(str(ratio))) * m * n / (m + n)))
    assert expected == rank  # the table itself is right
    assert rank_for(m, n, ratio) == rank


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 0.95])
def test_rank_for_is_the_largest_rank_within_budget(ratio):
    keep = 1 - Fraction(str(ratio))  # the ratio the user wrote, in exact arithmetic
    for m in range(4, 130, 7):
        for n in (m, 2 * m, 3 * m + 1, 11, 96):
            r = rank_for(m, n, ratio)
            budget = keep * m * n
            if budget >= m + n:  # at least rank 1 fits
                assert r * (m + n) <= budget, (m, n, r)
                assert (r + 1) * (m + n) > budget, (m, n, r)
            else:
                assert r == 1


@pytest.mark.parametrize("m, n", [(30, 70), (70, 30)])  # the Gram of either side
def test_truncation_from_the_smaller_gram_is_as_accurate_as_the_svd(m, n):
    """truncate_whitened takes U_r (or V_r) from the eigendecomposition of Y·Yᵀ (Yᵀ·Y), not
    an SVD of Y. Its loss ‖(Ŵ − AB)L‖² must equal the Eckart–Young optimum Σ_{i>r} σ_i² to
    within what a backward-stable eigensolver allows: the computed vectors are exact for a
    Gram perturbed by ‖E‖ ≤ k·u·σ₁², which moves the loss of r directions by at most
    2·r·‖E‖; the reference spectrum (an SVD) carries k·u·σ₁ per value."""
    g = torch.Generator().manual_seed(m)
    k, r = min(m, n), 12
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    sigma = torch.logspace(0, -7, k, dtype=torch.float64)  # seven decades, like whitened W
    Y = (U * sigma) @ V.T
    X = torch.randn(n, 3 * n, dtype=torch.float64, generator=g)
    L = torch.linalg.cholesky(X @ X.T)
    W_hat = torch.linalg.solve_triangular(L, Y, upper=False, left=False)  # Y = Ŵ·L
    A, B = factorize.truncate_whitened(Y.clone(), L, r)
    assert A.shape == (m, r) and B.shape == (r, n)
    got = float(((W_hat - A @ B) @ L).square().sum())
    optimum = float(torch.linalg.svdvals(Y)[r:].square().sum())
    u = torch.finfo(torch.float64).eps / 2
    bound = 2 * r * k * u * float(sigma[0]) ** 2 + 2 * k * k * u * float(sigma[0]) ** 2
    assert abs(got - optimum) <= bound
    # the factors are balanced, as U_r Σ_r^½ and Σ_r^½ V_rᵀ L⁻¹ are
    torch.testing.assert_close(
        torch.linalg.vector_norm(A, dim=0), (B @ L).norm(dim=1), rtol=1e-8, atol=0
    )


# -- truncation through the Gram's eigendecomposition -----------------------------------


def rank_deficient_problem(seed: int, scale: float = 1e-2):
    """Inputs of small scale (as after a norm with small weights) whose Gram is singular
    twice over: a dead channel that W weighs heavily, and half the remaining channels
    exact copies of the other half."""
    g = torch.Generator().manual_seed(seed)
    half = (N_IN - 1) // 2
    base = scale * torch.randn(half, N_TOK, dtype=torch.float64, generator=g)
    X = torch.cat([base, base, torch.zeros(N_IN - 2 * half, N_TOK, dtype=torch.float64)])
    W = torch.randn(M, N_IN, dtype=torch.float64, generator=g)
    W[:, -1] *= 100  # the dead channel
    return W, X


@pytest.mark.parametrize("seed", range(3))
def test_eigen_truncation_reaches_the_minimum_on_a_singular_gram(seed):
    """The minimum over rank-r W' of ‖(W − W')X‖² is the discarded spectrum of W·X itself
    (W·X has X's row space, so its best rank-r approximation is some W'·X). Truncation
    through the eigendecomposition reaches it; damped Cholesky, which gives the dead
    channel unit variance and the copies a damped diagonal, spends rank on directions
    that cost nothing and ends well above it."""
    W, X = rank_deficient_problem(seed)
    optimum = tail(W @ X, RANK)
    stats = InputStats(N_IN, frozenset({"orig"}), "cpu")
    stats.add(X.T, None)
    eigen = product(METHODS["svdllm-w-eigen"].factorize(W, stats, RANK))
    cholesky = product(svdllm_w(W, stats, RANK))
    # the sums carry rounding of u·N·max|x|² per entry; the loss a relative few u above
    assert loss(W, eigen, X) == pytest.approx(optimum, rel=1e-9)
    # not rounding (a relative 1e-9 would be): here 36-51% above the minimum
    assert loss(W, cholesky, X) > 1.2 * optimum


@pytest.mark.parametrize("seed", range(3))
def test_eigen_variants_equal_the_cholesky_ones_on_a_full_rank_gram(seed):
    W, X, Xc = problem(seed)
    for eigen, cholesky in [("svdllm-w-eigen", svdllm_w), ("svdllm-a-eigen", svdllm_a)]:
        a = product(METHODS[eigen].factorize(W, stats_for(X, Xc), RANK))
        b = product(cholesky(W, stats_for(X, Xc), RANK))
        # the same minimiser by two routes; G's condition number (1e3) × u bounds the gap
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * float(b.abs().max()))


def test_eigen_truncation_pads_a_rank_above_the_grams(seed=0):
    """With fewer input directions than the rank, the extra rank is zero, not NaN."""
    W, X = rank_deficient_problem(seed)
    X = X[:, :5]  # 5 tokens: G has rank ≤ 5 < RANK
    stats = InputStats(N_IN, frozenset({"orig"}), "cpu")
    stats.add(X.T, None)
    A, B = METHODS["svdllm-w-eigen"].factorize(W, stats, RANK)
    assert A.shape == (M, RANK) and B.shape == (RANK, N_IN)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert loss(W, A @ B, X) <= 1e-20 * float((W @ X).square().sum())
