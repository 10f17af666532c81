"""The model as a meta-device skeleton: find its decoder blocks and linears, fill one block
with real tensors, run it, empty it again. Knows nothing about files or activations."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .errors import StreamSVDError

log = logging.getLogger(__name__)


def load_config(path: str | os.PathLike) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StreamSVDError(f"{path} has no usable config.json: {first}") from exc


COMPUTE_DTYPES = ("auto", "checkpoint", "float32")


def compute_dtype(setting: str, checkpoint: torch.dtype) -> torch.dtype:
    """The dtype blocks run in. float16 activations overflow (65504) in some real models,
    and likelier in a compressed stream, so "auto" runs float16 checkpoints in float32;
    bfloat16 has float32's range and runs as it is."""
    if setting == "float32" or (setting == "auto" and checkpoint == torch.float16):
        return torch.float32
    return checkpoint


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM with every parameter on `meta` (buffers such as rotary frequencies are
    real), in the checkpoint's dtype so that filled tensors keep their exact bytes."""
    _refuse_non_causal(config)
    layer_types = set(getattr(config.get_text_config(), "layer_types", None) or [])
    if len(layer_types) > 1:
        raise StreamSVDError(
            f"blocks of mixed attention types {sorted(layer_types)} are not supported yet: "
            "streamsvd runs every block with block 0's attention mask"
        )
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation="sdpa", dtype=dtype
            )
    except ValueError as exc:
        raise StreamSVDError(
            f"model type {config.model_type!r} is not a causal language model transformers "
            f"can build: {str(exc).splitlines()[0]}"
        ) from exc
    return model.eval()


def _refuse_non_causal(config: PretrainedConfig) -> None:
    """A checkpoint saved from an encoder head (BertForMaskedLM, ...) still builds as a
    "causal LM" for some model types (BertLMHeadModel), but attends both ways and was never
    trained to predict the next token: judge by the class that saved it."""
    saved_as = getattr(config, "architectures", None) or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if saved_as and not any(name in causal for name in saved_as):
        raise StreamSVDError(
            f"checkpoint saved as {', '.join(saved_as)} is not a causal language model: "
            "streamsvd compresses decoder LMs (a *ForCausalLM / *LMHeadModel checkpoint)"
        )


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList of identical modules that contain Linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1 or not linear_layers(module[0]):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise StreamSVDError(
            f"{type(model).__name__} has no stack of decoder blocks holding nn.Linear layers"
        )
    return best


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block, by its name relative to the block, in module order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def fill(module: nn.Module, tensors: dict[str, torch.Tensor], device, dtype=None) -> None:
    """Put real tensors into a (meta) module; names are relative to the module."""
    for name, value in tensors.items():
        set_module_tensor_to_device(module, name, device, value=value, dtype=dtype)


def unfill(module: nn.Module, names: list[str]) -> None:
    """Send the named tensors back to `meta`: the inverse of `fill`."""
    for name in names:
        set_module_tensor_to_device(module, name, "meta")


def before_blocks(model: nn.Module, prefix: str, names: list[str]) -> list[str]:
    """Of `names`, the tensors the forward uses before block 0: everything outside the
    block stack except the LM head (token and learned position embeddings, ...)."""
    head = model.get_output_embeddings()
    head_prefix = next((n for n, m in model.named_modules() if m is head), None)
    return [
        n
        for n in names
        if not n.startswith(prefix + ".") and not (head_prefix and n.startswith(head_prefix + "."))
    ]


def empty(module: nn.Module) -> None:
    """Free a block's memory by sending its parameters back to `meta`."""
    module.to("meta")


class _StopForward(Exception):
    """Raised by the input catcher to stop the forward once block 0's inputs are known."""


def catch_block_inputs(
    model: PreTrainedModel, first_block: nn.Module, input_ids: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Run the model's own embedding stage and return what it hands block 0: the hidden
    states and the keyword arguments (position embeddings, mask, ...). Works for any
    architecture because the model builds these itself."""
    caught: dict = {}

    def hook(module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.get_decoder()(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in caught:
        raise StreamSVDError("the model's forward never reached its first decoder block")
    return caught["hidden"], caught["kwargs"]


def to_device(obj, device):
    """Move the tensors inside nested tuples/lists/dicts (a block's kwargs) to a device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def capture_inputs(block: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input tensor each named linear sees during one forward."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(module, args, name=name):
            seen[name] = args[0]

        handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def shared_input_groups(seen: dict[str, torch.Tensor]) -> list[list[str]]:
    """Linears that read the very same tensor (q/k/v, gate/up) share one set of statistics."""
    groups: list[list[str]] = []
    for name, x in seen.items():
        for group in groups:
            if seen[group[0]] is x:
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None)
