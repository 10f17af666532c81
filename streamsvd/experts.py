"""Mixture-of-experts helpers around modeling.UnfusedExperts (each expert as its own
linears): which modules they are, routing both streams alike while statistics are taken,
fusing dense per-expert weights back for a checkpoint stock transformers loads."""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from .modeling import UnfusedExperts


def unfused_modules(model: nn.Module) -> dict[str, UnfusedExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, UnfusedExperts)}


def fuse_dense_experts(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict:
    """`tensors` (full names) with each expert set's dense per-expert weights replaced by the
    fused parameters transformers' module has, so that stock transformers loads them."""
    out = dict(tensors)
    for path, experts in unfused_modules(model).items():
        if f"{path}.0.down_proj.weight" not in out:
            continue
        names = [n for n in out if n.startswith(path + ".")]
        per_expert = {n[len(path) + 1 :]: out.pop(n) for n in names}
        out |= {f"{path}.{k}": v for k, v in experts.fuse(per_expert).items()}
    return out


@contextlib.contextmanager
def same_routing(block: nn.Module):
    """Within: the experts of `block` route every forward as they routed the first. Statistics
    pair each token's original and compressed-stream inputs, so the compressed stream must
    reach the experts the original stream's router chose."""
    modules = [m for m in block.modules() if isinstance(m, UnfusedExperts)]
    for m in modules:
        m.replay = ()
    try:
        yield
    finally:
        for m in modules:
            m.replay = None


def expert_index(linear_name: str) -> str | None:
    """'mlp.experts.3.down_proj' -> 'mlp.experts.3': the expert a linear belongs to."""
    match = re.match(r"(.*\.experts\.\d+)\.", linear_name)
    return match.group(1) if match else None
