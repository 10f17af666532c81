"""InputStats sums and damped_cholesky on the Grams that real calibration produces."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_within_summation_bound

from streamsvd import stats as stats_module
from streamsvd.errors import StreamSVDError
from streamsvd.stats import InputStats, Rescues, damped_cholesky, damped_cholesky_, routine_step

N_IN = 40  # input channels


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens(n_tokens: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """(n_tokens, N_IN) correlated inputs with a non-zero mean, like a layer's activations."""
    g = gen(seed)
    mix = torch.randn(N_IN, N_IN, dtype=torch.float64, generator=g)
    z = torch.randn(n_tokens, N_IN, dtype=torch.float64, generator=g)
    return (z @ mix + 0.5).to(dtype)


# -- InputStats ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_input_stats_sums_equal_gram_products(dtype):
    x = tokens(96, seed=1, dtype=dtype)  # (tokens, n)
    xc = (x.double() + 0.1 * tokens(96, seed=2)).to(dtype)  # the same tokens, other stream
    stats = InputStats(N_IN, frozenset({"orig", "comp", "cross"}), "cpu")
    # three calls with (batch, seq, n) shapes, as hooks deliver them
    for start in range(0, 96, 32):
        stats.add(x[start : start + 32].view(4, 8, N_IN), xc[start : start + 32].view(4, 8, N_IN))
    X, Xc = x.double().T, xc.double().T  # (n, tokens): columns are tokens
    for got in (stats.G, stats.Gc, stats.C):
        assert got.dtype == torch.float64 and got.shape == (N_IN, N_IN)
    assert_within_summation_bound(stats.G, X, X.T)
    assert_within_summation_bound(stats.Gc, Xc, Xc.T)
    assert_within_summation_bound(stats.C, X, Xc.T)
    assert stats.tokens == 96


def test_input_stats_keeps_only_the_sums_a_method_needs():
    xc = tokens(20, seed=3)
    stats = InputStats(N_IN, frozenset({"comp"}), "cpu")
    stats.add(None, xc.view(2, 10, N_IN))
    assert stats.G is None and stats.C is None
    assert_within_summation_bound(stats.Gc, xc.T, xc)
    assert stats.tokens == 20

    orig_only = InputStats(N_IN, frozenset({"orig"}), "cpu")
    orig_only.add(xc, None)
    assert orig_only.Gc is None and orig_only.C is None
    assert_within_summation_bound(orig_only.G, xc.T, xc)


# -- damped_cholesky -------------------------------------------------------------------


def rank_deficient() -> torch.Tensor:  # fewer tokens than channels
    x = tokens(10, seed=4)
    return x.T @ x


def dead_channels() -> torch.Tensor:  # channels that are always zero: zero rows and columns
    x = tokens(200, seed=5)
    x[:, [3, 17, 39]] = 0
    return x.T @ x


def duplicated_channel() -> torch.Tensor:  # two identical rows: exactly singular
    x = tokens(200, seed=6)
    x[:, 5] = x[:, 2]
    return x.T @ x


def all_zero() -> torch.Tensor:
    return torch.zeros(N_IN, N_IN, dtype=torch.float64)


def huge_range() -> torch.Tensor:  # channel scales from 1e-8 to 1e8: variances over 32 decades
    x = tokens(200, seed=7) * torch.logspace(-8, 8, N_IN, dtype=torch.float64)
    return x.T @ x


def well_conditioned() -> torch.Tensor:
    x = tokens(400, seed=8)
    return x.T @ x


def check_factor(gram: torch.Tensor, L: torch.Tensor) -> float:
    """L is lower-triangular, finite, and L Lᵀ = G + δI (dead channels at unit variance) for
    a small δ ≥ 0, which is returned."""
    assert L.dtype == torch.float64 and L.shape == gram.shape
    assert torch.isfinite(L).all()
    assert torch.equal(L, L.tril())
    patched = gram.clone()
    dead = patched.diagonal() <= 0
    patched.diagonal()[dead] = 1.0
    excess = L @ L.T - patched  # should be δI
    scale = float(patched.diagonal().max())
    tol = 1e-12 * scale
    off = excess - torch.diag(excess.diagonal())
    assert float(off.abs().max()) <= tol
    delta = float(excess.diagonal().mean())
    assert float((excess.diagonal() - delta).abs().max()) <= tol
    assert -tol <= delta <= 1e-6 * float(patched.diagonal().mean())
    return delta if delta > tol else 0.0  # below tol is rounding, not damping


@pytest.mark.parametrize(
    "make, needs_damping",
    [
        (rank_deficient, True),
        (duplicated_channel, True),
        (dead_channels, False),  # patched to unit variance, then positive definite
        (all_zero, False),
        (huge_range, None),  # may or may not need it; must be logged iff it did
        (well_conditioned, False),
    ],
)
@pytest.mark.parametrize("block", [1024, 16, 7])  # one block; several, the last one short
def test_damped_cholesky_survives_singular_grams(make, needs_damping, block, caplog, monkeypatch):
    monkeypatch.setattr(stats_module, "CHOLESKY_BLOCK", block)
    gram = make()
    caplog.set_level(logging.DEBUG, logger="streamsvd.stats")  # routine damping is DEBUG
    L = damped_cholesky(gram, "test-gram")
    delta = check_factor(gram, L)
    logged = [r.getMessage() for r in caplog.records if "damping" in r.getMessage()]
    assert all("test-gram" in m for m in logged)
    if needs_damping is not None:
        assert bool(logged) == needs_damping
        assert (delta > 0) == needs_damping
    else:
        assert bool(logged) == (delta > 0)
    if needs_damping is False and not (gram.diagonal() <= 0).any():
        torch.testing.assert_close(L @ L.T, gram, rtol=0, atol=1e-12 * float(gram.max()))


def test_damped_cholesky_logs_dead_channels(caplog):
    caplog.set_level(logging.INFO, logger="streamsvd.stats")
    damped_cholesky(dead_channels(), "q_proj")
    assert any("3 dead" in r.getMessage() and "q_proj" in r.getMessage() for r in caplog.records)


def test_routine_damping_is_counted_and_quiet(caplog):
    """An exactly singular Gram of many tokens (two copies of a channel) needs only the
    routine step: counted, logged at DEBUG alone."""
    rescues = Rescues()
    caplog.set_level(logging.DEBUG, logger="streamsvd.stats")
    damped_cholesky(duplicated_channel(), "mlp.up_proj G'", rescues, tokens=200)
    assert rescues.damped == {f"{10.0 ** routine_step(N_IN):.0e}": 1}
    assert rescues.escalated == [] and rescues.dead_channels == 0
    assert any("mlp.up_proj G'" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_damping_a_gram_of_fewer_tokens_than_inputs_is_an_escalation(caplog):
    """10 tokens for 40 inputs: whatever the step, the damping decides 30 directions no
    token reached. Recorded for the run to report or, without `rescues`, a WARNING."""
    rescues = Rescues()
    damped_cholesky(rank_deficient(), "mlp.down_proj G'", rescues, tokens=10)
    (escalation,) = rescues.escalated
    assert escalation["gram"] == "mlp.down_proj G'"
    assert (escalation["tokens"], escalation["inputs"]) == (10, N_IN)
    assert sum(rescues.damped.values()) == 1
    caplog.set_level(logging.INFO, logger="streamsvd.stats")
    damped_cholesky(rank_deficient(), "mlp.down_proj G'", tokens=10)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "mlp.down_proj G'" in warning.getMessage()
    assert "from 10 tokens for 40 inputs" in warning.getMessage()


def test_damping_past_the_routine_step_is_an_escalation(caplog):
    """A symmetric matrix with an eigenvalue of −1e-6 × its mean diagonal (as sums rounded
    in too low a precision could give) needs more than rounding's damping."""
    q, _ = torch.linalg.qr(torch.randn(N_IN, N_IN, dtype=torch.float64, generator=gen(9)))
    eigenvalues = torch.linspace(1, 2, N_IN, dtype=torch.float64)
    eigenvalues[0] = -1e-6 * float(eigenvalues[1:].mean())
    gram = (q * eigenvalues) @ q.T
    rescues = Rescues()
    damped_cholesky(gram, "self_attn.o_proj G'", rescues, tokens=10_000)
    (escalation,) = rescues.escalated
    assert float(escalation["damping"]) > 10.0 ** routine_step(N_IN)
    caplog.set_level(logging.WARNING, logger="streamsvd.stats")
    damped_cholesky(gram, "self_attn.o_proj G'")
    (warning,) = caplog.records
    assert f"past the routine {10.0 ** routine_step(N_IN):.0e}" in warning.getMessage()


def test_rescues_add_up_and_count_dead_channels():
    first, second = Rescues(), Rescues()
    damped_cholesky(dead_channels(), "q_proj G", first)
    damped_cholesky(duplicated_channel(), "up_proj G", second, tokens=200)
    damped_cholesky(duplicated_channel(), "up_proj G'", second, tokens=200)
    total = Rescues.total([first.as_dict(), second.as_dict()])
    assert total.dead_channels == 3
    assert sum(total.damped.values()) == sum(second.damped.values()) == 2


def test_the_routine_step_covers_rounding_at_the_width():
    """1e-8 of the mean diagonal covers a PSD Gram's rounding (n²·u) up to ~9,500 inputs;
    70B's down_proj (28,672) needs 1e-7."""
    assert routine_step(1536) == routine_step(8192) == -8
    assert routine_step(28672) == -7


def test_damped_cholesky_accepts_float32():
    gram = well_conditioned().float()
    L = damped_cholesky(gram)
    check_factor(gram.double(), L)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_damped_cholesky_rejects_non_finite_gram(bad):
    gram = well_conditioned()
    gram[3, 4] = bad
    with pytest.raises(StreamSVDError, match="NaN or inf"):
        damped_cholesky(gram, "G")


@pytest.mark.parametrize("block", [1024, 16, 7])
def test_damped_cholesky_works_in_place_and_matches_lapack(block, monkeypatch):
    """The factor overwrites the Gram (no n×n copy) and is LAPACK's factor up to rounding:
    |L − L_lapack| is bounded by the Cholesky backward error, c·n·u·‖G‖/min diag(L)."""
    monkeypatch.setattr(stats_module, "CHOLESKY_BLOCK", block)
    gram = well_conditioned()
    work = gram.clone()
    L = damped_cholesky_(work, "G")
    assert L.data_ptr() == work.data_ptr() and torch.equal(L, L.tril())
    expected = torch.linalg.cholesky(gram)
    u = torch.finfo(torch.float64).eps / 2
    bound = 4 * N_IN * u * float(gram.diagonal().max()) / float(expected.diagonal().min())
    assert float((L - expected).abs().max()) <= bound


def test_cross_sum_kept_as_w_times_c_when_that_is_smaller():
    """A group whose outputs are narrower than its inputs (down_proj) keeps W·C (m×n)
    instead of C (n×n), and hands it over once."""
    x, xc = tokens(96, seed=9), tokens(96, seed=10)
    W = torch.randn(12, N_IN, dtype=torch.float64, generator=gen(11))
    stats = InputStats(N_IN, frozenset({"comp", "cross"}), "cpu", {"down": W.float()})
    assert stats.C is None and set(stats.WC) == {"down"}
    for start in range(0, 96, 40):
        stats.add(x[start : start + 40], xc[start : start + 40])
    Wf = W.float().double()
    assert_within_summation_bound(stats.WC["down"], Wf @ x.T, xc)
    got = stats.weighted_cross(Wf, "down")
    assert not stats.WC
    assert_within_summation_bound(got, Wf @ x.T, xc)
    wide = InputStats(N_IN, frozenset({"comp", "cross"}), "cpu", {"up": torch.zeros(50, N_IN)})
    assert wide.C is not None and not wide.WC
