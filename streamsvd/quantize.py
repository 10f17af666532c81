"""Integer weights with per-group scales: GPTQ (Frantar et al., 2022), and round-to-nearest
as the baseline it must beat.

GPTQ quantizes a weight W (out × in) column by column, each column's rounding error spread
over the columns not yet quantized through the inverse Hessian of the layer's inputs,
H = Σ x xᵀ, so that ‖(W − Q)X‖ and not ‖W − Q‖ is what is kept small. For a low-rank pair
A·B the stream already holds what both need: B reads the layer's inputs (H is their Gram),
A reads B·x (H_A = B·H·Bᵀ, rank × rank).

Not yet wired into compress (issue 22): this module is the quantizer alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DAMP = 0.01  # GPTQ's damping: 1% of H's mean diagonal, as the reference code
BLOCK = 128  # columns updated at a time (the reference code's lazy batch)


@dataclass
class Quantized:
    """Q = scales · (codes − zeros), per group of `group_size` input columns of each row."""

    codes: torch.Tensor  # (out, in) integers in [0, 2^bits − 1], as int32
    scales: torch.Tensor  # (out, in / group_size)
    zeros: torch.Tensor  # (out, in / group_size), integers (2^(bits−1) when symmetric)
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        scales = self.scales.repeat_interleave(self.group_size, dim=1)
        zeros = self.zeros.repeat_interleave(self.group_size, dim=1)
        return scales * (self.codes.to(scales.dtype) - zeros)


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of `w` (out × group): the group's range mapped onto
    0 … 2^bits − 1, or, symmetric, ±max|w| around the middle code."""
    top = 2**bits - 1
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if symmetric:
        hi = torch.maximum(hi, -lo)
        scale = 2 * hi / top
        zero = torch.full_like(scale, (top + 1) / 2)
    else:
        scale = (hi - lo) / top
        zero = None
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    if zero is None:
        zero = torch.round(-lo / scale)
    return scale, zero


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    code = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return code, scale * (code - zero)


def round_to_nearest(W: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> Quantized:
    """Each group's values rounded to its nearest code: the baseline."""
    W = W.to(torch.float64)
    m, n = W.shape
    groups = W.reshape(m, n // group_size, group_size)
    codes, scales, zeros = [], [], []
    for g in range(n // group_size):
        scale, zero = group_params(groups[:, g], bits, symmetric)
        code, _ = _quantize_column(groups[:, g], scale[:, None], zero[:, None], bits)
        codes.append(code)
        scales.append(scale)
        zeros.append(zero)
    return Quantized(torch.cat(codes, 1).to(torch.int32), torch.stack(scales, 1),
                     torch.stack(zeros, 1), bits, group_size)  # fmt: skip


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int,
         symmetric: bool = False) -> Quantized:  # fmt: skip
    """GPTQ of W (out × in) against the inputs' Gram H (in × in), in float64. Columns the
    inputs never excite (H's diagonal zero) are quantized as they are; each group's scale is
    set from its columns as updated when the group is reached, as the reference code does."""
    W = W.to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    m, n = W.shape
    if n % group_size:
        raise ValueError(f"{n} input columns are not a whole number of groups of {group_size}")
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H.diagonal().add_(DAMP * H.diagonal().mean())
    # the upper Cholesky factor of H⁻¹: row i holds what column i's error does to the rest
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(m, n, dtype=torch.float64)
    scales = torch.zeros(m, n // group_size, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    for b1 in range(0, n, BLOCK):
        b2 = min(b1 + BLOCK, n)
        block = W[:, b1:b2].clone()
        errors = torch.zeros_like(block)
        for i in range(b2 - b1):
            col = b1 + i
            if col % group_size == 0:
                g = col // group_size
                current = torch.cat([block[:, i:], W[:, b2:]], 1)[:, :group_size]
                scales[:, g], zeros[:, g] = group_params(current, bits, symmetric)
            g = col // group_size
            code, q = _quantize_column(block[:, i], scales[:, g], zeros[:, g], bits)
            codes[:, col] = code
            err = (block[:, i] - q) / Hinv[col, col]
            block[:, i:] -= err[:, None] * Hinv[col, col:b2][None, :]
            errors[:, i] = err
        W[:, b2:] -= errors @ Hinv[b1:b2, b2:]
    return Quantized(codes.to(torch.int32), scales, zeros, bits, group_size)
