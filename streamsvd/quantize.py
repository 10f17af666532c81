"""Integer weights with per-group scales: GPTQ (Frantar et al., 2022), and round-to-nearest
as the baseline it must beat.

GPTQ quantizes a weight W (out × in) column by column, each column's rounding error spread
over the columns not yet quantized through the inverse Hessian of the layer's inputs,
H = Σ x xᵀ, so that ‖(W − Q)X‖ and not ‖W − Q‖ is what is kept small. For a low-rank pair
A·B the stream already holds what both need: B reads the layer's inputs (H is their Gram),
A reads B·x (H_A = B·H·Bᵀ, rank × rank).

compress --bits runs it on every factor pair after the block is factorised (and refined),
from the compressed stream's Gram (step.BlockStep.quantize); the codes are written in
compressed-tensors' pack-quantized format (`packed_tensors`), which stock transformers
(with the compressed-tensors package) and vLLM read, and read back by `unpacked_weight`,
the same library call every loader makes, so that the block streamsvd runs is the block
they load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import StreamSVDError
from .model import factorised_linears
from .modeling import linear_shape

DAMP = 0.01  # GPTQ's damping: 1% of H's mean diagonal, as the reference code
BLOCK = 128  # columns updated at a time (the reference code's lazy batch)
BITS = (4, 8)  # what compress offers (the quantizer itself takes 2 to 8)
# The default group size, by bits: the first that divides every input width and fits
# every rank. Measured (docs/quantization.md, "Settings"): at 4 bits 32 beat 64, held out
# and on P1; at 8 bits 32 bought nothing for its bytes, so the largest group that fits.
GROUP_SIZES = {4: (32, 16), 8: (128, 64, 32, 16)}
FACTOR_PATTERN = r"re:.*\.(down|up)$"  # compressed-tensors target: LowRankLinear's factors


@dataclass(frozen=True)
class QuantSettings:
    """How compress quantizes the factors: `bits` per value, one scale (and, asymmetric,
    one zero point) per `group_size` consecutive input columns of each row."""

    bits: int
    group_size: int
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise StreamSVDError(f"--bits must be one of {BITS}, got {self.bits}")
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise StreamSVDError(f"--group-size must be a power of two, got {self.group_size}")

    def scheme(self):
        """The compressed-tensors scheme this describes (the package is needed from here)."""
        try:
            from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        except ImportError as exc:
            raise StreamSVDError(
                "quantized factors are written and read with the compressed-tensors package: "
                "pip install 'streamsvd[quant]' (or compressed-tensors)"
            ) from exc
        args = QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric,
                                strategy="group", group_size=self.group_size)  # fmt: skip
        return QuantizationScheme(targets=[FACTOR_PATTERN], weights=args)

    def config(self) -> dict:
        """config.json's `quantization_config`: what transformers and vLLM read."""
        from compressed_tensors.quantization import QuantizationConfig

        config = QuantizationConfig(config_groups={"group_0": self.scheme()},
                                    format="pack-quantized",
                                    quantization_status="compressed")  # fmt: skip
        return {"quant_method": "compressed-tensors", **config.to_dict()}


def default_group_size(widths: list[int], ranks: list[int], bits: int) -> int:
    """The first of GROUP_SIZES[bits] that divides every factorised linear's input width (a
    group never straddles rows: compressed-tensors requires it) and is no larger than any
    layer's rank (which is rounded to whole groups: `quantized_rank`)."""
    for size in GROUP_SIZES[bits]:
        if all(w % size == 0 for w in widths) and size <= min(ranks):
            return size
    raise StreamSVDError(
        f"no group size of {GROUP_SIZES[bits]} divides every input width {sorted(set(widths))} "
        f"and fits in the smallest rank, {min(ranks)}: give --group-size, or a lower --ratio"
    )


def settings_for(cfg, shapes: set[tuple[int, int]]) -> QuantSettings | None:
    """compress's --bits, --group-size and --asymmetric for a model whose factorised
    linears have these (out, in) shapes: the group size checked against (or, by default,
    chosen from) every input width and rank. None without --bits."""
    if cfg.bits is None:
        return None
    from .factorize import rank_for

    widths = sorted({n for _, n in shapes})
    ranks = [rank_for(m, n, cfg.ratio) for m, n in shapes]
    size = cfg.group_size or default_group_size(widths, ranks, cfg.bits)
    uneven = [w for w in widths if w % size]
    if uneven:
        fitting = default_group_size(widths, ranks, cfg.bits)
        raise StreamSVDError(
            f"--group-size {size} does not divide the input width of every layer ({uneven}): "
            f"groups must not straddle rows; --group-size {fitting} does"
        )
    return QuantSettings(cfg.bits, size, cfg.quant_symmetric)


def block_settings(cfg, blocks) -> QuantSettings | None:
    """The run's quantization settings (`settings_for`) for a model's blocks, from the
    shapes of their factorised linears; None without --bits."""
    if getattr(cfg, "bits", None) is None:
        return None
    shapes = {linear_shape(layer) for block in blocks
              for layer in factorised_linears(block, cfg.ratio).values()}  # fmt: skip
    return settings_for(cfg, shapes)


def factor_bytes(m: int, n: int, rank: int, item: int, quant: QuantSettings | None) -> int:
    """Bytes of one factor pair on disk: A (m × rank) and B (rank × n), in `item`-byte
    values, or quantized: packed codes, scales (and zero points) per group, shapes."""
    values = rank * (m + n)
    if quant is None:
        return values * item
    groups = values // quant.group_size
    zeros = 0 if quant.symmetric else groups * quant.bits / 8
    return int(values * quant.bits / 8 + groups * item + zeros) + 2 * 2 * 8


def quantized_rank(rank: int, group_size: int, shape: tuple[int, int]) -> int:
    """A factor pair's rank rounded to the nearest whole number of groups (A's input width
    is the rank), never above what the layer allows: serving kernels need whole groups."""
    most = min(shape) // group_size * group_size
    rounded = min(max(group_size, round(rank / group_size) * group_size), most)
    if rounded < group_size:
        raise StreamSVDError(
            f"a {shape[0]}×{shape[1]} layer is narrower than one group of {group_size}: "
            "choose a smaller --group-size"
        )
    return rounded


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


def packed_tensors(q: Quantized, settings: QuantSettings, dtype: torch.dtype) -> dict:
    """One linear's tensors in compressed-tensors' pack-quantized layout (names relative to
    the linear): codes and zero points as signed integers (code − 2^(bits−1)) packed into
    int32, scales in the output's dtype, and the weight's shape."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 2 ** (q.bits - 1)
    out = {"weight_packed": pack_to_int32((q.codes - offset).to(torch.int8), q.bits),
           "weight_scale": q.scales.to(dtype).contiguous(),
           "weight_shape": torch.tensor(list(q.codes.shape))}  # fmt: skip
    if not settings.symmetric:
        zeros = (q.zeros.to(torch.int32) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zeros, q.bits, packed_dim=0).contiguous()
    return out


def unpacked_weight(tensors: dict, scheme) -> torch.Tensor:
    """The weight a pack-quantized linear's tensors stand for, computed by compressed-tensors'
    own decompressor (as transformers and vLLM compute it)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    return PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]


def rank_rotation(rank: int) -> torch.Tensor:
    """An orthogonal rank × rank matrix R (float64, CPU, seeded): a DCT-II basis with random
    signs. A pair is quantized as (A·R)(Rᵀ·B), the same product.

    Why: the whitened factors put each singular direction in a column of A of its own (A =
    U Σ^½), so A's Hessian B G Bᵀ is diagonal (Σ): GPTQ has no correlated column to push an
    error onto and rounds A as round-to-nearest would. R mixes the directions, so the
    Hessian has off-diagonal terms GPTQ uses, and a group's values share one range (QuIP's
    incoherence, Chee et al. 2023, here free: R stays inside the pair, nothing is added
    to the model). On 28 of SmolLM2's layers at ratio 0.4 and 4 bits, the error that
    quantization adds falls to 0.58 of itself (median; 0.15-0.88; docs/quantization.md)."""
    k = torch.arange(rank, dtype=torch.float64)
    basis = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * rank))
    basis *= math.sqrt(2 / rank)
    basis[0] /= math.sqrt(2)  # rows: the orthonormal DCT-II basis
    signs = torch.randint(0, 2, (rank,), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return signs[:, None] * basis.T


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


def inverse_factor(H: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The upper Cholesky factor of (H + δI)⁻¹, in `dtype`, leaving H as it is: row i holds
    what column i's rounding error does to the columns after it. δ is GPTQ's 1% of the mean
    diagonal, raised tenfold while a factorisation fails (never a crash, never a NaN).
    Columns the inputs never excite (H's diagonal zero) get a unit diagonal, so that they
    are quantized as they are. Holds about three n×n matrices of `dtype` besides H (two,
    and LAPACK's copy): in float32 (compress's choice, as the reference code's), 9 GiB at
    70B's widest input, and H's 6 GiB."""
    diagonal = H.diagonal().to(dtype)
    dead = (diagonal == 0).to(dtype)
    mean = float(diagonal.mean()) or 1.0
    for damp in (DAMP, DAMP * 10, DAMP * 100, 1.0, 10.0):
        damped = H.to(dtype, copy=True)
        damped.diagonal().add_(dead + damp * mean)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(upper.diagonal()).all()):
                return upper
    raise StreamSVDError("GPTQ: the inputs' Gram has NaN or inf entries")


def gptq(W: torch.Tensor, H: torch.Tensor | None, bits: int, group_size: int,
         symmetric: bool = False, Hinv: torch.Tensor | None = None,
         scale_dtype: torch.dtype | None = None) -> Quantized:  # fmt: skip
    """GPTQ of W (out × in) against the inputs' Gram H (in × in), or its `inverse_factor`
    Hinv computed once for every linear reading the same inputs; in Hinv's dtype (float64
    from H). Each group's scale is set from its columns as updated when the group is
    reached, as the reference code does, and rounded to `scale_dtype` (the one written)
    before any code is chosen with it, so the error fed forward is the one stored."""
    if Hinv is None:
        Hinv = inverse_factor(H)
    work = Hinv.dtype
    W = W.to(work, copy=True)
    m, n = W.shape
    if n % group_size:
        raise ValueError(f"{n} input columns are not a whole number of groups of {group_size}")
    codes = torch.zeros(m, n, dtype=torch.int32, device=W.device)
    scales = torch.zeros(m, n // group_size, dtype=work, device=W.device)
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
                scale, zero = group_params(current, bits, symmetric)
                if scale_dtype is not None:
                    scale = scale.to(scale_dtype).to(work)
                    zero = torch.clamp(zero, 0, 2**bits - 1)
                scales[:, g], zeros[:, g] = scale, zero
            g = col // group_size
            code, q = _quantize_column(block[:, i], scales[:, g], zeros[:, g], bits)
            codes[:, col] = code.to(torch.int32)
            err = (block[:, i] - q) / Hinv[col, col]
            block[:, i:] -= err[:, None] * Hinv[col, col:b2][None, :]
            errors[:, i] = err
        W[:, b2:] -= errors @ Hinv[b1:b2, b2:]
    return Quantized(codes, scales, zeros, bits, group_size)
