"""Second-moment statistics of a linear layer's inputs, accumulated in float64, and a
Cholesky factorisation that survives singular Grams."""

from __future__ import annotations

import logging

import torch

from .errors import StreamSVDError

log = logging.getLogger(__name__)

# Which sums a method needs: "orig" G = Σ x xᵀ over the original stream, "comp" G' = Σ x' x'ᵀ
# over the compressed stream, "cross" C = Σ x x'ᵀ pairing the two streams token by token.
NEEDS = ("orig", "comp", "cross")


class InputStats:
    """Float64 sums over calibration tokens of one layer's inputs (n = in_features)."""

    def __init__(self, dim: int, needs: frozenset[str], device: torch.device | str):
        zeros = lambda: torch.zeros(dim, dim, dtype=torch.float64, device=device)  # noqa: E731
        self.G = zeros() if "orig" in needs else None  # (n, n)
        self.Gc = zeros() if "comp" in needs else None  # (n, n)
        self.C = zeros() if "cross" in needs else None  # (n, n)
        self.tokens = 0

    def add(self, x: torch.Tensor | None, xc: torch.Tensor | None) -> None:
        """x, xc: (..., n) inputs of the same tokens from the original / compressed stream."""
        x = None if x is None else x.reshape(-1, x.shape[-1]).double()
        xc = None if xc is None else xc.reshape(-1, xc.shape[-1]).double()
        if self.G is not None:
            self.G.addmm_(x.T, x)
        if self.Gc is not None:
            self.Gc.addmm_(xc.T, xc)
        if self.C is not None:
            self.C.addmm_(x.T, xc)
        self.tokens += (x if x is not None else xc).shape[0]


def damped_cholesky(gram: torch.Tensor, what: str = "Gram") -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = G + δI, δ as small as works.

    A Gram can be singular (dead channels, fewer tokens than dimensions) or so
    ill-conditioned that its factor is useless. Dead channels (zero diagonal) get a unit
    diagonal, as GPTQ does. Then δ starts at 0 and escalates from 1e-8 to 1e3 times the
    mean diagonal, by factors of 10, until the factorisation succeeds with
    min(diag L)² ≥ 1e-12 · max(diag G). For a finite PSD matrix the last step always
    succeeds, so this never crashes and never returns NaN. Damping is logged.
    """
    if not torch.isfinite(gram).all():
        raise StreamSVDError(f"{what} has NaN or inf entries: the calibration inputs overflowed")
    g = gram.to(torch.float64).clone()
    g = (g + g.T) / 2
    diag = g.diagonal()
    dead = diag <= 0
    if dead.any():
        diag[dead] = 1.0
        log.info("%s: %d dead input channels given unit variance", what, int(dead.sum()))
    scale = diag.mean()
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for step in [None, *range(-8, 4)]:
        damp = 0.0 if step is None else float(scale) * 10.0**step
        factor, info = torch.linalg.cholesky_ex(g + damp * eye if damp else g)
        pivots = factor.diagonal()
        if int(info) == 0 and torch.isfinite(factor).all():
            if float(pivots.min()) ** 2 >= 1e-12 * float(diag.max()):
                if damp:
                    log.info(
                        "%s: Cholesky needed damping %.3g (mean diagonal %.3g)",
                        what,
                        damp,
                        float(scale),
                    )
                return factor
    raise StreamSVDError(f"{what}: Cholesky failed even with damping {damp:.3g}")
