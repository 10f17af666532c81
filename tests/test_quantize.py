"""The quantizer (streamsvd/quantize.py): codes in range, exact round trip of what it stores,
and GPTQ beating round-to-nearest on the layer's output error, for a dense weight and for
both factors of a low-rank pair (B against the inputs' Gram, A against B·G·Bᵀ)."""

from __future__ import annotations

import pytest
import torch

from streamsvd.errors import StreamSVDError
from streamsvd.factorize import plain_svd, truncate_whitened, whitened_truncation
from streamsvd.quantize import DAMP, default_group_size, gptq, rank_rotation, round_to_nearest
from streamsvd.stats import damped_cholesky, damped_cholesky_


def _inputs(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a decaying spectrum, as a layer's are: (n, tokens)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    spectrum = torch.logspace(0, -2, n, dtype=torch.float64)
    return basis @ (spectrum[:, None] * torch.randn(n, tokens, generator=gen, dtype=torch.float64))


def _output_error(W, Q, X) -> float:
    return float(((W - Q) @ X).norm() ** 2)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (3, False), (8, False)])
def test_gptq_lowers_the_output_error_against_round_to_nearest(bits, symmetric):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(48, 128, generator=gen, dtype=torch.float64) * 0.05
    X = _inputs(128, 2048)
    H = X @ X.T
    rtn = round_to_nearest(W, bits, 32, symmetric)
    opt = gptq(W, H, bits, 32, symmetric)
    for q in (rtn, opt):
        assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    assert _output_error(W, opt.dequantize(), X) < 0.5 * _output_error(W, rtn.dequantize(), X)


def test_both_factors_of_a_low_rank_pair_gain_from_their_own_hessians():
    """B (rank × in) sees x: its Hessian is G = X Xᵀ. A (out × rank) sees B·x: B G Bᵀ."""
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(96, 128, generator=gen, dtype=torch.float64) * 0.05
    X = _inputs(128, 2048, seed=3)
    A, B = plain_svd(W, None, 32)
    A, B = A.to(torch.float64), B.to(torch.float64)
    G = X @ X.T
    Bq = gptq(B, G, 4, 32).dequantize()
    assert _output_error(B, Bq, X) < 0.5 * _output_error(B, round_to_nearest(B, 4, 32, False)
                                                        .dequantize(), X)  # fmt: skip
    BX = Bq @ X  # A's inputs once B is quantized
    Aq = gptq(A, BX @ BX.T, 4, 32).dequantize()
    Ar = round_to_nearest(A, 4, 32, False).dequantize()
    # B·x is whiter than x (B's rows are the top singular directions): less to gain, 0.6 here
    assert _output_error(A, Aq, BX) < 0.8 * _output_error(A, Ar, BX)


def test_stored_codes_scales_and_zeros_give_back_the_quantized_weight():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q = gptq(W, torch.eye(64, dtype=torch.float64), 4, 16)
    # each dequantized value is scale·(code − zero) exactly, and on the group's grid
    grid = (q.dequantize() / q.scales.repeat_interleave(16, 1)) + q.zeros.repeat_interleave(16, 1)
    assert torch.allclose(grid, grid.round(), atol=1e-9)
    # with H = I there is nothing to trade between columns: GPTQ is round-to-nearest
    assert torch.equal(q.codes, round_to_nearest(W, 4, 16, False).codes)


def test_rank_rotation_is_orthogonal():
    for rank in (16, 64, 192):
        R = rank_rotation(rank)
        # float64 rounding in r-term sums: a few r·ε at most
        assert torch.allclose(R.T @ R, torch.eye(rank, dtype=torch.float64), rtol=0,
                              atol=8 * rank * torch.finfo(torch.float64).eps)  # fmt: skip


def test_rotating_a_whitened_pair_lets_gptq_correct_the_up_factor():
    """Whitened factors make A's Hessian B G Bᵀ diagonal (Σ): GPTQ then rounds A as
    round-to-nearest would. (A·R)(Rᵀ·B) is the same product with a Hessian it can use."""
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(96, 128, generator=gen, dtype=torch.float64) * 0.05
    X = _inputs(128, 2048, seed=6)
    G = X @ X.T
    A, B = whitened_truncation(W, damped_cholesky(G), 64)

    def error(A, B):
        Bq = gptq(B, G, 4, 32, True).dequantize()
        Aq = gptq(A, Bq @ G @ Bq.T, 4, 32, True).dequantize()
        return _output_error(A @ B, Aq @ Bq, X)

    R = rank_rotation(64)
    # 0.57-0.63 of the error on five seeds here; on SmolLM2's layers 0.05-0.25 (docs)
    assert error(A @ R, R.T @ B) < 0.75 * error(A, B)


def test_whitening_ridge_bounds_the_down_factor_on_a_nearly_singular_gram():
    """compress --bits whitens with G + δI, δ a fraction of the mean diagonal: then
    ‖L⁻¹‖₂ ≤ 1/√δ and each row of B = Σ^½ Vᵀ L⁻¹ is at most √σᵢ/√δ. Without it, a target
    Ŵ·L with weight on directions the compressed stream barely reaches (svdllm-a's update
    W·C·L⁻ᵀ has) gives B entries of any size."""
    gen = torch.Generator().manual_seed(7)
    Y = torch.randn(64, 96, generator=gen, dtype=torch.float64)  # the whitened target Ŵ·L
    X = torch.randn(96, 4096, generator=gen, dtype=torch.float64)
    X *= torch.logspace(0, -6, 96, dtype=torch.float64)[:, None]
    G = X @ X.T  # nearly singular
    delta = DAMP * float(G.diagonal().mean())
    L = damped_cholesky_(G.clone(), "test", DAMP)
    assert torch.allclose(L @ L.T, G + delta * torch.eye(96, dtype=torch.float64),
                          rtol=0, atol=1e-12 * float(G.abs().max()))  # fmt: skip
    A, B = truncate_whitened(Y.clone(), L, 32)
    sigma = torch.linalg.vector_norm(A, dim=0) ** 2  # A = U Σ^½: its column norms are √σ
    rows = torch.linalg.vector_norm(B, dim=1)
    assert bool((rows <= (sigma / delta).sqrt() * (1 + 1e-9)).all())
    _, B0 = truncate_whitened(Y.clone(), damped_cholesky(G), 32)
    assert float(B0.abs().max()) > 100 * float(B.abs().max())  # 991 against 1.07 here


def test_default_group_size_follows_the_measurement_by_bits():
    """The measured defaults (docs/quantization.md): at 4 bits 32 (16 where a rank is under
    32 or a width not a whole number of 32s); at 8 bits the largest group that divides every
    width and fits every rank; an error naming --group-size where nothing fits."""
    smollm2, llama7b = ([576, 1536], [86, 172, 368]), ([4096, 11008], [1228, 1600])
    assert default_group_size(*smollm2, bits=4) == 32
    assert default_group_size(*llama7b, bits=4) == 32
    assert default_group_size(*smollm2, bits=8) == 64  # 576 is 4.5 groups of 128
    assert default_group_size(*llama7b, bits=8) == 128
    assert default_group_size([64, 160], [20, 40], bits=4) == 16  # a rank holds no 32
    assert default_group_size([48, 96], [40], bits=4) == 16  # 48 is not a whole number of 32s
    for bits in (4, 8):
        with pytest.raises(StreamSVDError, match="--group-size"):
            default_group_size([24], [20], bits)
