"""The layers a compressed checkpoint is made of, self-contained (torch and transformers
only): streamsvd uses them, and every low-rank output carries a copy of this file as its
modeling code, so that stock `AutoModelForCausalLM.from_pretrained(out,
trust_remote_code=True)` loads it where streamsvd is not installed.

- LowRankLinear: y = A·(B·x) + b in place of a linear layer (or of GPT-2's Conv1D).
- UnfusedExperts: a transformers experts module (3-D fused parameters, its layout described
  by `use_experts_implementation`) as one small MLP of nn.Linear per expert, computing what
  the fused module computes. Each expert's linears then see exactly the tokens its router
  sends it, and can be factorised like any other linear.
- compressed_structure: turns the original architecture into the compressed one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

SECTION = "streamsvd"  # the config.json section that describes a compressed checkpoint


class LowRankLinear(nn.Module):
    """y = A·(B·x) + b, stored as `down` (B: rank × in) and `up` (A: out × rank, bias)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> LowRankLinear:
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias is not None, A.device, dtype)
        with torch.no_grad():
            layer.down.weight.copy_(B)
            layer.up.weight.copy_(A)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight as out × in, whichever way it is stored (a view, no copy):
    GPT-2's Conv1D stores it transposed."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features)."""
    return tuple(linear_weight(layer).shape)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


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
            for expert in self:  # on its own input tensor, as each gets its own tokens
                expert.down_proj(self._activate(expert, hidden_states.clone()))
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
        out[name] = UnfusedExperts(fused)
        replace_module(model, name, out[name])
    return out


def compressed_structure(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """The original architecture (experts already unfused) with a LowRankLinear of the
    recorded rank in place of each factorised layer, on the device and dtype of the layer it
    replaces (meta in a skeleton)."""
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        out_features, in_features = linear_shape(layer)
        low = LowRankLinear(in_features, out_features, rank, layer.bias is not None,
                            layer.weight.device, layer.weight.dtype)  # fmt: skip
        replace_module(model, name, low)
    return model


def low_rank_structure(model: nn.Module, section: dict, prefix: str = "") -> nn.Module:
    """A freshly built original model (or, with the whole model's `prefix`, its base model)
    turned into the compressed one that config.json's streamsvd `section` records."""
    unfuse_experts(model)
    ranks = {} if section.get("dense") else section["ranks"]
    if prefix:
        ranks = {name.removeprefix(prefix + "."): rank for name, rank in ranks.items()}
    return compressed_structure(model, ranks)


def remote_code_footer(config_class: str, model_class: str, base_type: str,
                       base_class: str) -> str:  # fmt: skip
    """The lines that, appended to this file, make it the modeling code of one compressed
    checkpoint: its config and model classes, the original ones with the compressed
    structure the config's section records; and its base model (`base_class`, what
    AutoModel and vLLM's Transformers backend load) likewise."""
    return f'''

# ---- written by streamsvd compress for this checkpoint ------------------------------------
from transformers import {config_class} as _OriginalConfig  # noqa: E402
from transformers import {model_class} as _OriginalModel  # noqa: E402
from transformers import {base_class} as _OriginalBase  # noqa: E402


class StreamSVDConfig(_OriginalConfig):
    model_type = "streamsvd_{base_type}"


class StreamSVDForCausalLM(_OriginalModel):
    """{model_class} with each factorised layer as a LowRankLinear of the recorded rank."""

    config_class = StreamSVDConfig

    def __init__(self, config):
        super().__init__(config)
        low_rank_structure(self, getattr(config, SECTION))


class StreamSVDModel(_OriginalBase):
    """{base_class} with each factorised layer as a LowRankLinear: the base model alone."""

    config_class = StreamSVDConfig

    def __init__(self, config):
        super().__init__(config)
        low_rank_structure(self, getattr(config, SECTION), _OriginalModel.base_model_prefix)
'''
