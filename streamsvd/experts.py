"""Mixture-of-experts layers as one small MLP of nn.Linear per expert.

transformers 5 keeps a block's experts fused in 3-D parameters (`gate_up_proj`: experts ×
2·intermediate × hidden, ...) and describes their layout with the `use_experts_implementation`
decorator (concatenated or interleaved gate/up, transposed, biases, gate or not). Here each
expert becomes gate/up/down nn.Linears, so that everything streamsvd does to a linear —
statistics from the inputs it sees, factorisation, LowRankLinear in its place — applies to
an expert unchanged: an expert's linears see exactly the tokens the router sends it. The
forward computes what the fused module computes, expert by expert.

`split` turns the fused parameters (as transformers loads them) into per-expert weights;
`fuse` turns dense per-expert weights back into the fused parameters, for a checkpoint
that stock transformers loads.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module: decorated with `use_experts_implementation` (which sets
    these attributes) and holding its experts in 3-D parameters."""
    return (
        hasattr(module, "is_transposed")
        and hasattr(module, "has_gate")
        and isinstance(getattr(module, "down_proj", None), nn.Parameter)
        and module.down_proj.dim() == 3
    )


class ExpertMLP(nn.Module):
    """One expert: gate_proj and up_proj (or up_proj alone) and down_proj."""

    def __init__(self, hidden: int, intermediate: int, has_gate: bool, bias: bool, dtype):
        super().__init__()
        kw = dict(bias=bias, device="meta", dtype=dtype)
        if has_gate:
            self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)


class UnfusedExperts(nn.ModuleList):
    """Stands in for a fused experts module; same call signature, same result. Expert e's
    linears are `e.gate_proj`, `e.up_proj`, `e.down_proj`, as many checkpoints name them."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.num_experts = fused.down_proj.shape[0]
        self.has_gate = fused.has_gate
        self.has_bias = fused.has_bias
        self.is_transposed = fused.is_transposed
        self.is_concatenated = fused.is_concatenated
        self.fused_shapes = {n: tuple(p.shape) for n, p in fused.named_parameters(recurse=False)}
        down = fused.down_proj.shape[1:]
        hidden, intermediate = (down[1], down[0]) if self.is_transposed else down
        dtype = fused.down_proj.dtype
        self.extend(
            ExpertMLP(hidden, intermediate, self.has_gate, self.has_bias, dtype)
            for _ in range(self.num_experts)
        )
        # the activation: the fused class's own gating (or act_fn), bound to the fused
        # module, which keeps its non-parameter state (clamp limits, ...)
        self._fused = [fused]  # a list: not registered as a submodule, holds no weights
        self.post_expert_norm = getattr(fused, "post_expert_norm", None)
        self.replay: tuple | None = None  # see same_routing

    def _activate(self, expert: ExpertMLP, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused[0]
        if not self.has_gate:
            return fused.act_fn(expert.up_proj(x))
        gate, up = expert.gate_proj(x), expert.up_proj(x)
        if self.is_concatenated:
            gate_up = torch.cat([gate, up], dim=-1)
        else:  # interleaved: gate0, up0, gate1, up1, ...
            gate_up = torch.stack([gate, up], dim=-1).flatten(-2)
        return fused._apply_gate(gate_up)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self.replay is not None:
            if self.replay == ():  # the first call: remember its routing
                self.replay = (top_k_index, top_k_weights)
            else:  # later calls: route as the first did
                top_k_index, top_k_weights = self.replay
        out = torch.zeros_like(hidden_states)
        if hidden_states.is_meta:  # planning: routing has no values, every expert runs once
            for expert in self:
                expert.down_proj(self._activate(expert, hidden_states))
            return out
        for e, expert in enumerate(self):
            token_idx, top_k_pos = torch.where(top_k_index == e)
            if len(token_idx) == 0:
                continue
            y = expert.down_proj(self._activate(expert, hidden_states[token_idx]))
            if self.post_expert_norm is not None:
                y = self.post_expert_norm(y)
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    # -- weights -------------------------------------------------------------------------
    def split(self, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-expert weights (names relative to this module) from fused parameters, e.g.
        {"gate_up_proj": ..., "gate_up_proj_bias": ...}."""
        out = {}
        for role, value in fused.items():
            base, suffix = (role[:-5], "bias") if role.endswith("_bias") else (role, "weight")
            for e in range(self.num_experts):
                w = value[e].t() if suffix == "weight" and self.is_transposed else value[e]
                for name, part in self._roles(base, w):
                    out[f"{e}.{name}.{suffix}"] = part.contiguous()
        return out

    def _roles(self, role: str, w: torch.Tensor):
        """The per-expert linears a fused role holds (its rows, or a bias's entries)."""
        if role != "gate_up_proj":
            return [(role, w)]
        if self.is_concatenated:
            gate, up = w.chunk(2, dim=0)
        else:
            gate, up = w[0::2], w[1::2]
        return [("gate_proj", gate), ("up_proj", up)]

    def fuse(self, per_expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fused parameters from dense per-expert weights (names relative to this module):
        the inverse of `split`."""
        out = {}
        for role in self.fused_shapes:
            base, suffix = (role[:-5], "bias") if role.endswith("_bias") else (role, "weight")
            names = ("gate_proj", "up_proj") if base == "gate_up_proj" else (base,)
            stacked = []
            for e in range(self.num_experts):
                parts = [per_expert[f"{e}.{n}.{suffix}"] for n in names]
                if len(parts) == 1:
                    w = parts[0]
                elif self.is_concatenated:
                    w = torch.cat(parts, dim=0)
                else:
                    w = torch.stack(parts, dim=1).flatten(0, 1)
                stacked.append(w.t() if suffix == "weight" and self.is_transposed else w)
            out[role] = torch.stack(stacked)
        return out


def unfuse_experts(model: nn.Module) -> dict[str, UnfusedExperts]:
    """Replace every fused experts module of a (meta) model by UnfusedExperts; returns them
    by module name."""
    found = {name: m for name, m in model.named_modules() if is_fused_experts(m)}
    out = {}
    for name, fused in found.items():
        parent, _, child = name.rpartition(".")
        out[name] = UnfusedExperts(fused)
        setattr(model.get_submodule(parent) if parent else model, child, out[name])
    return out


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
