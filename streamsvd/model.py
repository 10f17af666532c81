"""The model as a meta-device skeleton: find its decoder blocks and linears, fill one block
with real tensors, run it, empty it again. Knows nothing about files or activations."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from torch.utils._pytree import tree_map_only
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from .errors import StreamSVDError
from .experts import expert_index
from .modeling import SECTION, linear_shape, unfuse_experts

log = logging.getLogger(__name__)


def load_config(path: str | os.PathLike) -> PretrainedConfig:
    """The checkpoint's config; for a streamsvd output, the original architecture's (its
    own model_type makes stock transformers ask for trust_remote_code)."""
    try:
        base = _base_type(path)
        if base is None:
            return AutoConfig.from_pretrained(path)
        data = json.loads((Path(path) / "config.json").read_text())
        data.pop("auto_map", None)
        data.pop("model_type")
        return AutoConfig.for_model(base, **data)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StreamSVDError(f"{path} has no usable config.json: {first}") from exc


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer. Given the config explicitly, so that a streamsvd output's
    own model_type does not make transformers ask about its modeling code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, config=load_config(path))


def _base_type(path: str | os.PathLike) -> str | None:
    """The original model_type recorded in a streamsvd output's config.json, else None."""
    try:
        data = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    section = data.get(SECTION) if isinstance(data, dict) else None
    return section.get("base_model_type") if isinstance(section, dict) else None


COMPUTE_DTYPES = ("auto", "checkpoint", "float32")


def compute_dtype(setting: str, checkpoint: torch.dtype, device: str) -> torch.dtype:
    """The dtype blocks run in. "auto" runs in float32 where the checkpoint's half precision
    would hurt: float16 activations overflow (65504) in some real models, and likelier in a
    compressed stream; and on a CPU half-precision matrix products are 20-100x slower than
    float32 ones unless it has native bfloat16 (AVX-512 BF16, AMX), and no more accurate
    (benchmarks/results/bf16_cpu.md). bfloat16 on a GPU, which computes it natively with
    float32's range, runs as it is."""
    on_cpu = torch.device(device).type == "cpu"
    half = checkpoint in (torch.float16, torch.bfloat16)
    if setting == "float32" or (
        setting == "auto" and half and (on_cpu or checkpoint == torch.float16)
    ):
        return torch.float32
    return checkpoint


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM with every parameter on `meta` (buffers such as rotary frequencies are
    real), in the checkpoint's dtype so that filled tensors keep their exact bytes."""
    _refuse_non_causal(config)
    try:
        with init_empty_weights():
            try:
                model = AutoModelForCausalLM.from_config(
                    config, attn_implementation="sdpa", dtype=dtype
                )
            except ValueError as exc:  # a family without SDPA attention (gpt-oss's sinks)
                if "attention implementation" not in str(exc):
                    raise
                model = AutoModelForCausalLM.from_config(
                    config, attn_implementation="eager", dtype=dtype
                )
    except ValueError as exc:
        raise StreamSVDError(
            f"model type {config.model_type!r} is not a causal language model transformers "
            f"can build: {str(exc).splitlines()[0]}"
        ) from exc
    unfuse_experts(model)
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
        if type(module) is not nn.ModuleList or len(module) == 0:  # not UnfusedExperts
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


LINEAR_TYPES = (nn.Linear, Conv1D)


def check_supported(blocks: nn.ModuleList) -> None:
    """Refuse blocks holding weights streamsvd would otherwise pass over in silence: a
    tensor of three or more dimensions left fused (experts in a layout transformers does
    not describe with `use_experts_implementation`, a convolution)."""
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            if p.dim() >= 3:
                raise StreamSVDError(
                    f"block {i} holds {name}, a {p.dim()}-D weight of shape {list(p.shape)} "
                    f"in {type(block.get_submodule(name.rpartition('.')[0])).__name__}, "
                    "which streamsvd cannot factorise: it splits only experts modules that "
                    "transformers describes with use_experts_implementation"
                )


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Every linear map inside a block, by its name relative to the block, in module order:
    nn.Linear, and GPT-2's Conv1D (a linear layer that stores its weight transposed)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, LINEAR_TYPES)}


def factorised_linears(block: nn.Module, ratio: float) -> dict[str, nn.Module]:
    """The block's linears that compression factorises at `ratio` (the rest stay dense)."""
    from .factorize import worth_factorising

    return {
        name: layer
        for name, layer in linear_layers(block).items()
        if worth_factorising(*linear_shape(layer), ratio)
    }


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


def _run_decoder(model: PreTrainedModel, input_ids: torch.Tensor, hooks: list) -> None:
    """Run the model's decoder until a hook raises _StopForward, then remove the hooks."""
    try:
        with torch.no_grad():
            model.get_decoder()(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()


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

    _run_decoder(model, input_ids, [first_block.register_forward_pre_hook(hook, with_kwargs=True)])
    if "hidden" not in caught:
        raise StreamSVDError("the model's forward never reached its first decoder block")
    return caught["hidden"], caught["kwargs"]


@contextlib.contextmanager
def buffers_on_meta(module: nn.Module) -> Iterator[None]:
    """Send a module's real buffers (a router's bias) to `meta` meanwhile, so that it runs
    on `meta` inputs; they come back afterwards."""
    real = [
        (owner, name, buf)
        for owner in module.modules()
        for name, buf in owner._buffers.items()
        if buf is not None and not buf.is_meta
    ]
    for owner, name, buf in real:
        owner._buffers[name] = buf.to("meta")
    try:
        yield
    finally:
        for owner, name, buf in real:
            owner._buffers[name] = buf


def every_block_kwargs(model: PreTrainedModel, blocks: nn.ModuleList,
                       input_ids: torch.Tensor) -> list[dict]:  # fmt: skip
    """The keyword arguments the model hands each block: blocks of different attention types
    (Gemma-2's sliding and full layers, gpt-oss) get different masks or position
    embeddings, taken from the model's own forward. The blocks run on `meta` meanwhile, so
    no block weights are needed and nothing is computed."""
    caught: list[dict] = []
    on_meta = contextlib.ExitStack()

    def before(module, args, kwargs):
        caught.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if len(caught) == len(blocks):
            raise _StopForward
        on_meta.enter_context(buffers_on_meta(module))
        return to_device(args, "meta"), to_device(kwargs, "meta")

    def after(module, args, output):
        on_meta.close()

    handles = [b.register_forward_pre_hook(before, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(after) for b in blocks]
    try:
        _run_decoder(model, input_ids, handles)
    finally:
        on_meta.close()
    if len(caught) != len(blocks):
        raise StreamSVDError(f"the model's forward reached {len(caught)} of its "
                             f"{len(blocks)} decoder blocks")  # fmt: skip
    return caught


def to_device(obj, device):
    """Move the tensors inside nested tuples/lists/dicts (a block's kwargs) to a device; a
    tensor met twice (one mask shared by many blocks) is moved once and stays shared, which
    accelerate's `send_to_device` would copy once per reference."""
    moved: dict[int, torch.Tensor] = {}

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in moved:
            moved[id(tensor)] = tensor.to(device)
        return moved[id(tensor)]

    return tree_map_only(torch.Tensor, move, obj)


def block_arguments(model: PreTrainedModel, blocks: nn.ModuleList, batch_sizes: set[int],
                    seqlen: int, device) -> list[dict[int, dict]]:  # fmt: skip
    """For each block, its keyword arguments by batch size: some depend on it (Bloom's
    ALiBi biases are per sample)."""
    by_size = {
        b: to_device(
            every_block_kwargs(model, blocks, torch.zeros(b, seqlen, dtype=torch.long)), device
        )  # fmt: skip
        for b in sorted(batch_sizes)
    }
    return [{b: by_size[b][i] for b in by_size} for i in range(len(blocks))]


def run_block(block: nn.Module, hidden: torch.Tensor, arguments: dict[int, dict]) -> torch.Tensor:
    """The block's output hidden states; `arguments` as block_arguments gives them."""
    out = block(hidden, **arguments[hidden.shape[0]])
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


def sequential_stages(names: list[str], groups: list[list[str]]) -> list[list[str]]:
    """The order in which a block computes its linears, as stages: linears reading one
    tensor (q/k/v) share a stage, and so do all experts' linears of one kind, which run
    side by side. `names` are in registration order, which is the order of computation in
    transformers' decoder blocks; `groups` are the shared-input groups."""
    group_of = {name: group for group in groups for name in group}
    stages: dict[str, list[str]] = {}
    for name in names:
        lead = group_of.get(name, [name])[0]
        if expert_index(lead):
            lead = re.sub(r"\.experts\.\d+\.", ".experts.*.", lead)
        stages.setdefault(lead, []).append(name)
    return list(stages.values())


def input_groups(model, block, ratio: float) -> list[list[str]]:
    """Which of a block's linears read the very same tensor, found by running the block on
    `meta` (no memory, any width): only the embedding rows it looks up are ever touched."""
    prefix, blocks = find_blocks(model)
    params = dict(model.named_parameters())
    fakes = {  # untouched empty tensors: no RSS
        name: torch.empty(params[name].shape, dtype=params[name].dtype)
        for name in before_blocks(model, prefix, list(params))
    }
    fill(model, fakes, "cpu")
    try:
        hidden, kwargs = catch_block_inputs(model, blocks[0], torch.zeros(1, 4, dtype=torch.long))
        names = list(factorised_linears(block, ratio))
        with torch.inference_mode(), buffers_on_meta(block), capture_inputs(block, names) as seen:
            run_block(block, hidden.to("meta"), {1: to_device(kwargs, "meta")})
    finally:
        unfill(model, list(fakes))
    return shared_input_groups(seen)


def block_stages(model, blocks: nn.ModuleList, ratio: float) -> list[list[list[str]]]:
    """Each block's `sequential_stages`, from its `input_groups`: found once for each kind
    of block (blocks alike in structure share them: every block of most models, DeepSeek's
    dense first blocks and its experts' blocks apart), before any block is filled."""
    found: dict[str, list[list[str]]] = {}
    stages = []
    for block in blocks:
        kind = repr(block)  # its modules, their types and shapes
        if kind not in found:
            names = list(factorised_linears(block, ratio))
            found[kind] = sequential_stages(names, input_groups(model, block, ratio))
        stages.append(found[kind])
    return stages


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None)
