"""Source checkpoint formats: the quantized ones streamsvd reads, dequantized as they stream
in, and the ones it refuses by name before any work.

A quantized linear is stored as codes and scales: a float8 `weight` beside its
`weight_scale_inv`, a compressed-tensors module's `weight_packed` and `weight_scale`, ...
`source_format` finds each such weight from config.json's `quantization_config` and the
shards' headers (no data read), and says how its float weight is computed: CheckpointReader
then presents a plain `weight` in the checkpoint's float dtype, so that every later stage
sees an ordinary checkpoint.

- quant_method "fp8" (transformers' FineGrainedFP8Config, as DeepSeek-V3/R1 and the FP8
  releases of Qwen3 and Llama ship): float8 codes times `weight_scale_inv`, one scale per
  `weight_block_size` block, or one for the tensor without a block size.
- quant_method "compressed-tensors" in the formats below: compressed-tensors' own
  decompressor, the call transformers and vLLM make.
- Anything else (GPTQ, AWQ, bitsandbytes, ...) is refused, naming the method.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StreamSVDError

FLOAT8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FP8_SCALES = ("F32", "BF16", "F16")  # and U8 with scale_fmt "ue8m0": powers of two as bytes
COMPRESSED_FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized")
# Scales of a quantized model's activations and KV cache, stored beside its linears: they
# quantize inputs at run time and are no part of any weight. Dropping them is safe: the
# dequantized weights are the model, and it runs unquantized activations, as transformers
# runs an FP8 checkpoint it loads with dequantize=True (Fp8Dequantize drops them too).
RUNTIME_SCALES = ("activation_scale", "input_scale", "input_zero_point", "input_global_scale",
                  "output_scale", "output_zero_point", "k_scale", "v_scale", "q_scale")  # fmt: skip
CHUNK = 1 << 24  # values dequantized at a time: the float32 product never holds more


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight the checkpoint stores quantized: the stored tensors it is computed from
    (by role, the codes first), the weight's shape, and the computation."""

    parts: dict[str, str]  # role -> stored tensor name
    shape: list[int]
    dequantize: Callable[[dict[str, torch.Tensor], torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class SourceFormat:
    method: str | None  # quantization_config's quant_method; None: a float checkpoint
    weights: dict[str, QuantizedWeight]  # weight name -> how it is read
    runtime: list[str]  # stored activation and KV-cache scales, read by nothing


def source_format(path: Path, headers: dict[str, dict], read: Callable) -> SourceFormat:
    """How the checkpoint at `path` is read, from its config.json and its shards' `headers`
    (name -> safetensors header entry); `read` reads stored tensors by name. Refuses a
    format it does not read, and float8 weights no scale explains."""
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    except ValueError as exc:
        raise StreamSVDError(f"{config_path} is not valid JSON: {exc}") from exc
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    method, weights, runtime = None, {}, []
    if qconfig:
        method = qconfig.get("quant_method")
        if method == "fp8":
            weights = fp8_weights(path, qconfig, headers)
        elif method == "compressed-tensors":
            weights = compressed_weights(path, qconfig, headers, read)
        else:
            refuse_method(path, method)
        runtime = [n for n in headers if n.rpartition(".")[2] in RUNTIME_SCALES]
    parts = {p for w in weights.values() for p in w.parts.values()}
    for name, info in headers.items():
        if info["dtype"].startswith("F8") and name not in parts:
            raise StreamSVDError(
                f"{path}: {name} is stored as float8 ({info['dtype']}) with no scale that "
                f"config.json's quantization_config explains (quant_method {method!r}); "
                "streamsvd reads float8 weights with their weight_scale_inv (quant_method "
                "fp8) or weight_scale (compressed-tensors float-quantized)"
            )
    return SourceFormat(method, weights, runtime)


def refuse_method(path: Path, method: str | None) -> None:
    """A quantized source streamsvd does not read: say which, and what to do."""
    raise StreamSVDError(
        f"{path} is quantized with quant_method {method!r} (config.json's "
        "quantization_config), a format streamsvd does not read: compressing its stored "
        "codes as weights would give a wrong model. Dequantize it first (load it with "
        "transformers and that format's library, call model.dequantize() where the library "
        "offers it, and save_pretrained in bfloat16), or start from the unquantized "
        "original. streamsvd reads float checkpoints, FP8 (quant_method fp8) and "
        f"compressed-tensors {', '.join(COMPRESSED_FORMATS)} checkpoints"
    )


# -- FP8, transformers' fine-grained format -------------------------------------------------


def fp8_weights(path: Path, qconfig: dict, headers: dict[str, dict]) -> dict:
    """Every float8 weight with a `*_scale_inv` beside it (`x.weight_scale_inv` scales
    `x.weight`, a fused expert tensor `x_scale_inv` scales `x`, as transformers names them),
    its scales' shape checked against the block size."""
    block = qconfig.get("weight_block_size")
    ue8m0 = qconfig.get("scale_fmt") == "ue8m0"
    weights = {}
    for scale_name in sorted(n for n in headers if n.endswith("_scale_inv")):
        name = scale_name.removesuffix("_scale_inv")
        weight, scale = headers.get(name), headers[scale_name]
        if weight is None:
            raise StreamSVDError(f"{path}: {scale_name} scales {name}, which is not stored")
        if weight["dtype"] not in FLOAT8:
            raise StreamSVDError(
                f"{path}: {name} is stored as {weight['dtype']}, not float8 (FP4 codes, two to "
                "a byte, are not read): dequantize the checkpoint first, or use the original"
            )
        if scale["dtype"] not in FP8_SCALES and not (ue8m0 and scale["dtype"] == "U8"):
            raise StreamSVDError(f"{path}: {scale_name} holds {scale['dtype']} scales, "
                                 f"which streamsvd does not read")  # fmt: skip
        shape = weight["shape"]
        if block is None:
            grid, fits = [1], math.prod(scale["shape"]) == 1
        else:
            grid = [*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1])]
            fits = len(shape) >= 2 and list(scale["shape"]) == grid
        if not fits:
            raise StreamSVDError(
                f"{path}: {scale_name} has shape {scale['shape']}, but {name} {shape} with "
                f"weight_block_size {block} needs {grid} scales: the checkpoint does not match "
                "its config.json"
            )
        dequantize = functools.partial(_fp8_dequantize, block=block, ue8m0=ue8m0)
        weights[name] = QuantizedWeight({"weight": name, "scale": scale_name}, shape, dequantize)
    return weights


def _fp8_dequantize(parts: dict[str, torch.Tensor], dtype: torch.dtype, block, ue8m0: bool):
    scale = parts["scale"]
    if ue8m0 and scale.dtype == torch.uint8:  # E8M0 bytes: 2^(byte − 127), as transformers
        scale = (scale.to(torch.float32) - 127).exp2()
    return fp8_dequantize(parts["weight"], scale, block, dtype)


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, block: list[int] | None,
                   dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """float8 `codes` (..., rows, cols) times their scales, the product taken in float32 and
    rounded once to `dtype`, as transformers' Fp8Dequantize computes it on load. `block`
    (r, c): scale[..., i, j] scales rows i·r to (i+1)·r and columns j·c to (j+1)·c, the last
    block of a dimension that r or c does not divide being partial (FP8Linear's grid,
    ceil(rows / r) × ceil(cols / c)); None: one scale for the tensor. Row blocks a chunk at
    a time, so that the float32 product never holds more than CHUNK values."""
    out = torch.empty(codes.shape, dtype=dtype)
    scale = scale.to(torch.float32)
    if block is None:
        flat_codes, flat_out, factor = codes.reshape(-1), out.view(-1), scale.reshape(())
        for start in range(0, flat_codes.numel(), CHUNK):
            piece = flat_codes[start : start + CHUNK].to(torch.float32)
            flat_out[start : start + CHUNK] = (piece * factor).to(dtype)
        return out
    rows, cols = codes.shape[-2:]
    r, c = block
    step = r * max(1, CHUNK // (r * cols))  # whole row blocks
    codes3, out3 = codes.reshape(-1, rows, cols), out.view(-1, rows, cols)
    scales3 = scale.reshape(-1, *scale.shape[-2:])
    for k in range(codes3.shape[0]):
        for start in range(0, rows, step):
            piece = codes3[k, start : start + step].to(torch.float32)
            grid = scales3[k, start // r : -(-(start + piece.shape[0]) // r)]
            grid = grid.repeat_interleave(r, 0)[: piece.shape[0]]
            out3[k, start : start + step] = (piece * grid.repeat_interleave(c, 1)[:, :cols]).to(
                dtype
            )
    return out


# -- compressed-tensors ---------------------------------------------------------------------


def compressed_weights(path: Path, qconfig: dict, headers: dict[str, dict], read) -> dict:
    """Every quantized linear of a compressed-tensors checkpoint (one with a `weight_scale`),
    read by compressed-tensors' decompressor for its group's format."""
    for key, what in (("sparsity_config", "sparsity"), ("transform_config", "transforms")):
        section = qconfig.get(key)
        if section and (key == "transform_config" or section.get("format") != "dense"):
            raise StreamSVDError(
                f"{path} is a compressed-tensors checkpoint with {what} ({key}), which "
                "streamsvd does not read: decompress it with llm-compressor / "
                "compressed-tensors and save it dense, or start from the original"
            )
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationScheme
    except ImportError as exc:
        raise StreamSVDError(
            f"{path} is a compressed-tensors checkpoint, read with the compressed-tensors "
            "package: pip install 'streamsvd[quant]' (or compressed-tensors)"
        ) from exc
    groups = []  # (targets, scheme, compressor, the stored parts it reads, codes first)
    for name, group in qconfig.get("config_groups", {}).items():
        if not group.get("weights"):  # activations or the KV cache only
            continue
        fmt = group.get("format") or qconfig.get("format")
        if fmt not in COMPRESSED_FORMATS:
            raise StreamSVDError(
                f"{path}: compressed-tensors group {name} is in format {fmt!r}, which "
                f"streamsvd does not read (it reads {', '.join(COMPRESSED_FORMATS)}): "
                "dequantize the checkpoint first, or start from the original"
            )
        scheme = QuantizationScheme.model_validate(group)
        compressor = BaseCompressor.get_value_from_registry(fmt)
        groups.append((group.get("targets", []), scheme, compressor,
                       compressor.compression_param_names(scheme)))  # fmt: skip
    modules = sorted({n[: -len(".weight_scale")] for n in headers if n.endswith(".weight_scale")})
    found = {}
    for module in modules:
        group = next((g for g in groups if _targets(g[0], module)), None)
        if group is None:
            raise StreamSVDError(
                f"{path}: {module} is stored quantized, but config.json's quantization_config "
                "gives it no quantization scheme"
            )
        _, scheme, compressor, names = group
        parts = {p: f"{module}.{p}" for p in names if f"{module}.{p}" in headers}
        if names[0] not in parts:
            raise StreamSVDError(f"{path}: {module} has a weight_scale but no {names[0]}")
        found[module] = scheme, compressor, parts
    shapes = read(
        [parts["weight_shape"] for *_, parts in found.values() if "weight_shape" in parts]
    )
    weights = {}
    for module, (scheme, compressor, parts) in found.items():
        codes = parts[next(iter(parts))]
        shape = shapes[parts["weight_shape"]].tolist() if "weight_shape" in parts else None
        dequantize = functools.partial(_decompress, compressor=compressor, scheme=scheme)
        weights[f"{module}.weight"] = QuantizedWeight(parts, shape or headers[codes]["shape"],
                                                      dequantize)  # fmt: skip
    return weights


def _targets(targets: list[str], module: str) -> bool:
    """Whether a compressed-tensors group's targets take `module`: "re:" patterns and full
    names as compressed-tensors matches them; a class-name target ("Linear") takes any."""
    return any((t.startswith("re:") and re.match(t[3:], module)) or t == module
               or t[:1].isupper() for t in targets)  # fmt: skip


def _decompress(parts: dict[str, torch.Tensor], dtype: torch.dtype, compressor, scheme):
    return compressor.decompress(parts, scheme)["weight"].to(dtype)
