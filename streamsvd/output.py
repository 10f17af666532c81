"""The output format, block by block: what a block's shard holds, named as the output's
model (lowrank.py) reads it. Each factorised linear becomes a LowRankLinear's `down` and
`up` (the bias on `up`), with --bits their packed codes in place of the weights
(compressed-tensors' pack-quantized format); what refinement trained is written as
trained; every other tensor of the block (norms, a router) bit for bit; experts left dense
fused back as transformers' module holds them."""

from __future__ import annotations

import torch
from torch import nn

from .experts import fuse_dense_experts


def block_tensors(model: nn.Module, block: nn.Module, prefix: str,
                  original: dict[str, torch.Tensor], linears: dict[str, nn.Module],
                  factors: dict[str, tuple], trained: list[str], quantized: dict[str, dict],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:  # fmt: skip
    """The tensors of the shard of the block at `prefix` (e.g. "model.layers.3"), full
    names: `original`, the checkpoint's tensors of the block (full names); `linears`, its
    factorised linears and `factors` their (down, up) weights (names relative to the
    block); `trained`, the parameters refinement trained (relative names), read from
    `block` and rounded to `dtype`; `quantized`, each quantized linear's packed tensors by
    factor ({"down": ..., "up": ...})."""
    tensors = {}
    for name, (down, up) in factors.items():
        full = f"{prefix}.{name}"
        tensors[f"{full}.down.weight"] = down
        tensors[f"{full}.up.weight"] = up
        if linears[name].bias is not None:
            tensors[f"{full}.up.bias"] = original[f"{full}.bias"]
    for name, tensor in original.items():  # norms and the like: bit for bit
        if name.rsplit(".", 1)[0][len(prefix) + 1 :] not in linears:
            tensors[name] = tensor
    for name in trained:  # factors (and norms, biases) as trained
        tensors[f"{prefix}.{name}"] = block.get_parameter(name).detach().to(dtype).cpu()
    for name, packed_factors in quantized.items():  # in place of the factors' weights
        for factor, packed in packed_factors.items():
            full = f"{prefix}.{name}.{factor}"
            del tensors[f"{full}.weight"]
            tensors |= {f"{full}.{k}": v for k, v in packed.items()}
    return fuse_dense_experts(model, tensors)  # experts left dense, if any
