"""Synthetic checkpoints at real shapes (Llama family, and Mixtral- and Qwen3-MoE-style
mixtures of experts, written with one 2-D weight per expert under the names streamsvd
reads them by), for measuring memory and time at scale.

`synthesize` writes config, tokenizer and sharded safetensors of a named shape (7B, 13B,
34B, 70B widths and head layouts, grouped-query attention where the real model has it) at
any depth, tensor by tensor and row block by row block: memory stays at one row block of
one matrix whatever the size of the checkpoint. The index is written last and the directory
renamed into place, so a directory that exists is a finished checkpoint.

The weights are random, but each block linear has a decaying singular spectrum, so that
SVD work and ranks behave as for a trained model: W = U·diag(s)·V + E, with min(m, n)/8
random directions of power-law weights s_i ∝ i^(-1/2) carrying half of the energy and a
Gaussian bulk E (a Marchenko–Pastur spectrum) the other half. Entries have std 0.02, as
Llama's initialisation. Each tensor is drawn from its own seed (run seed and tensor name),
so a tensor's values do not depend on the depth or the sharding.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import fsync_path, shard_name, write_index
from .errors import StreamSVDError

STD = 0.02  # entry std of every random matrix (Llama's initializer_range)
SPIKE_FRACTION = 8  # min(m, n) / SPIKE_FRACTION directions with power-law weights
ROW_BLOCK = 1 << 24  # values generated at a time (64 MiB of float32)
TOKENIZER_VOCAB = 1024  # the synthetic tokenizer's size; ids index the model's larger vocab


@dataclass(frozen=True)
class Shape:
    """Widths and head layout of a Llama-family model, or of a mixture of experts."""

    hidden: int
    intermediate: int  # of the dense MLP; of each expert in a mixture of experts
    heads: int
    kv_heads: int
    vocab: int
    layers: int  # the real model's depth (synthesize takes any)
    max_positions: int = 4096
    rope_theta: float = 10000.0
    source: str = ""
    family: str = "llama"  # or "mixtral", "qwen3_moe"
    experts: int = 0
    top_k: int = 0
    head_dim: int | None = None  # hidden / heads unless given


SHAPES: dict[str, Shape] = {
    "tiny": Shape(128, 344, 4, 2, 1024, 2, 512, source="test shape"),
    "1b": Shape(2048, 5632, 32, 4, 32000, 22, 2048, source="TinyLlama-1.1B"),
    "7b": Shape(4096, 11008, 32, 32, 32000, 32, source="Llama-2-7B"),
    "13b": Shape(5120, 13824, 40, 40, 32000, 40, source="Llama-2-13B"),
    "34b": Shape(8192, 22016, 64, 8, 32000, 48, 16384, 1e6, source="CodeLlama-34B"),
    "70b": Shape(8192, 28672, 64, 8, 32000, 80, source="Llama-2-70B"),
    "405b": Shape(16384, 53248, 128, 8, 128256, 126, 131072, 5e5, source="Llama-3.1-405B"),
    "8x7b": Shape(4096, 14336, 32, 8, 32000, 32, 32768, 1e6, source="Mixtral-8x7B (47B)",
                  family="mixtral", experts=8, top_k=2),
    "30b-a3b": Shape(2048, 768, 32, 4, 151936, 48, 40960, 1e6, source="Qwen3-30B-A3B",
                     family="qwen3_moe", experts=128, top_k=8, head_dim=128),
    "tiny-moe": Shape(128, 96, 4, 2, 1024, 2, 512, source="test shape", family="mixtral",
                      experts=4, top_k=2),
}  # fmt: skip

_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shape_config(shape: Shape, layers: int, dtype: torch.dtype):
    """The transformers config of a shape at `layers` blocks."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        dtype=str(dtype).removeprefix("torch."),
    )
    if shape.head_dim:
        common["head_dim"] = shape.head_dim
    if shape.family == "llama":
        return AutoConfig.for_model("llama", intermediate_size=shape.intermediate, **common)
    if shape.family == "mixtral":
        return AutoConfig.for_model("mixtral", intermediate_size=shape.intermediate,
                                    num_local_experts=shape.experts,
                                    num_experts_per_tok=shape.top_k, **common)  # fmt: skip
    if shape.family == "qwen3_moe":
        return AutoConfig.for_model("qwen3_moe", moe_intermediate_size=shape.intermediate,
                                    num_experts=shape.experts, num_experts_per_tok=shape.top_k,
                                    decoder_sparse_step=1, mlp_only_layers=[],
                                    **common)  # fmt: skip
    raise StreamSVDError(f"no config for shape family {shape.family!r}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    values: Callable[[], Iterator[torch.Tensor]]  # float32 row blocks, in order

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * dtype.itemsize


def tensor_specs(config, seed: int) -> list[TensorSpec]:
    """Every parameter of the model the config describes, in the model's order, with a
    generator of its values: block linears get decaying spectra, other matrices Gaussian
    entries, norms ones, biases small Gaussians."""
    from .model import build_skeleton, find_blocks, linear_layers

    model = build_skeleton(copy.deepcopy(config), torch.float32)  # building sets its dtype
    prefix, blocks = find_blocks(model)
    linear = {
        f"{prefix}.{i}.{name}.weight" for i, b in enumerate(blocks) for name in linear_layers(b)
    }
    specs = []
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        gen_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        if name in linear:
            values = _bind(_decaying_rows, shape, gen_seed)
        elif p.dim() == 2:
            values = _bind(_gaussian_rows, shape, gen_seed, STD)
        elif "norm" in name:
            values = _bind(_constant, shape, 1.0)
        else:
            values = _bind(_gaussian_rows, shape, gen_seed, STD)
        specs.append(TensorSpec(name, shape, values))
    return specs


def _bind(fn, *args) -> Callable[[], Iterator[torch.Tensor]]:
    return lambda: fn(*args)


def _row_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, ROW_BLOCK // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _gaussian_rows(shape: tuple[int, ...], seed: int, std: float) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
    for start, stop in _row_blocks(rows, cols):
        yield torch.randn(stop - start, cols, generator=gen) * std


def _constant(shape: tuple[int, ...], value: float) -> Iterator[torch.Tensor]:
    yield torch.full(shape, value)


def _decaying_rows(shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """Rows of W = U·diag(s)·V + E (see the module docstring), a row block at a time."""
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    k = max(1, min(m, n) // SPIKE_FRACTION)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    s *= STD * math.sqrt(0.5 * m * n) / s.norm()  # the spikes hold half of ‖W‖²
    US = torch.randn(m, k, generator=gen) * (s / math.sqrt(m))  # (m, k), columns ≈ s_i·unit
    V = torch.randn(k, n, generator=gen) / math.sqrt(n)  # (k, n), rows ≈ unit
    bulk = STD * math.sqrt(0.5)
    for start, stop in _row_blocks(m, n):
        yield US[start:stop] @ V + torch.randn(stop - start, n, generator=gen) * bulk


def write_safetensors(path: Path, specs: list[TensorSpec], dtype: torch.dtype,
                      values: bool = True) -> None:  # fmt: skip
    """Write one safetensors file tensor by tensor, from the header that the shapes alone
    determine: never more than one row block in memory. Temp file, fsync, rename.
    values=False leaves the data a hole in a sparse file (zeros, no disk, no time)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        size = spec.nbytes(dtype)
        header[spec.name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads its header to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        if not values:
            f.truncate(8 + len(raw) + offset)
            specs = []
        for spec in specs:
            written = 0
            for block in spec.values():
                data = block.to(dtype).contiguous().view(torch.uint8).numpy()
                f.write(data)
                written += data.nbytes
            if written != spec.nbytes(dtype):
                raise RuntimeError(f"{spec.name}: wrote {written} bytes, expected more")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pack_shards(specs: list[TensorSpec], dtype: torch.dtype, max_bytes: int):
    """Greedy packing in model order, as save_pretrained does: a shard is closed when the
    next tensor would take it past max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.nbytes(dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def checkpoint_bytes(shape: Shape, layers: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Weight bytes of a synthetic checkpoint, from the shape alone."""
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    head_dim = shape.head_dim or h // shape.heads
    attn = h * head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    mlp = 3 * h * i if not shape.experts else shape.experts * (3 * h * i + h)  # + router
    norms = 2 * h + (2 * head_dim if shape.family == "qwen3_moe" else 0)  # q/k norms
    return (layers * (attn + mlp + norms) + 2 * v * h + h) * dtype.itemsize


def synthesize(
    out: str | os.PathLike,
    shape: str | Shape,
    layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 2 << 30,
    values: bool = True,
) -> Path:
    """Write a synthetic checkpoint to `out` (which must not exist); returns its path.
    values=False writes the shapes only, every weight zero in sparse files: enough for
    `compress --dry-run` at any size (405B on a laptop), useless for running."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise StreamSVDError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")
        shape = SHAPES[shape]
    layers = shape.layers if layers is None else layers
    if layers < 1:
        raise StreamSVDError(f"layers must be at least 1, got {layers}")
    if dtype not in _ST_DTYPES:
        raise StreamSVDError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    out = Path(out)
    if out.exists():
        raise StreamSVDError(f"output {out} already exists; remove it or choose another --out")
    config = shape_config(shape, layers, dtype)
    specs = tensor_specs(config, seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = pack_shards(specs, dtype, max_shard_bytes)
    weight_map = {}
    for k, group in enumerate(shards):
        name = shard_name(k + 1, len(shards))
        write_safetensors(tmp / name, group, dtype, values)
        weight_map.update({spec.name: name for spec in group})
    config.save_pretrained(tmp)
    synthetic_tokenizer(min(TOKENIZER_VOCAB, shape.vocab)).save_pretrained(tmp)
    write_index(tmp, weight_map)
    fsync_path(tmp)
    os.replace(tmp, out)
    return out


def synthetic_tokenizer(vocab: int):
    """A byte-level BPE trained on Python's docstrings: offline and deterministic."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(bpe_tokenizer_json(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@functools.cache
def bpe_tokenizer_json(vocab: int) -> str:
    """A byte-level BPE of `vocab` ids (`<eos>` is 0) trained on 200k characters of
    Python's docstrings, as JSON; trained once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .calib import stdlib_docstrings

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([stdlib_docstrings(200_000)], trainer)
    return tok.to_str()


# Small sizes for any decoder family: each config sets those of these attributes it has.
_TINY = dict(
    vocab_size=TOKENIZER_VOCAB // 2, max_position_embeddings=256, n_positions=256,
    hidden_size=64, n_embd=64, d_model=64, word_embed_proj_dim=64,
    intermediate_size=128, ffn_dim=128, n_inner=128, ffn_hidden_size=128,
    num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=16,
    # mixtures of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, decoder_sparse_step=1,
    # multi-head latent attention (DeepSeek)
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=16, qk_head_dim=16,
    sliding_window=16, query_pre_attn_scalar=16, rotary_dim=8,
    eos_token_id=0, bos_token_id=0, pad_token_id=1,
)  # fmt: skip


# Every decoder family streamsvd has been tried on and compresses (benchmarks/families.py;
# tests/test_remote_code.py loads each one's output through its own modeling code).
FAMILIES = [
    "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "gemma3_text",
    "olmo2", "granite", "stablelm", "starcoder2", "cohere", "opt", "falcon", "mixtral",
    "qwen3_moe", "deepseek_v3", "gpt_neox", "gpt_oss", "gpt2", "qwen2_moe", "olmoe",
    "granitemoe", "cohere2", "olmo", "gptj", "bloom", "mpt", "deepseek_v2", "exaone4", "glm4",
    "smollm3", "ernie4_5", "hunyuan_v1_dense",
]  # fmt: skip


def tiny_family_config(model_type: str, layers: int = 4, **overrides):
    """A small random-init config of any transformers decoder family, e.g. "mixtral":
    the family's defaults with the widths above; mixed attention types keep their
    pattern over `layers` blocks."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    sizes = {**_TINY, "num_hidden_layers": layers, "n_layer": layers}
    # overrides last: configs alias some names (num_local_experts is num_experts)
    for key, value in [*sizes.items(), *overrides.items()]:
        if hasattr(text, key):
            try:
                setattr(text, key, value)
            except AttributeError:  # a derived property (Falcon's head_dim)
                pass
    if getattr(text, "qk_rope_head_dim", None):  # MLA: the rotary part is the "head_dim"
        text.head_dim = text.qk_rope_head_dim
    types = getattr(text, "layer_types", None)
    if types:  # the pattern over the new depth: sliding, full, sliding, full, ...
        kinds = list(dict.fromkeys(types))
        text.layer_types = [kinds[i % len(kinds)] for i in range(layers)]
    mlp_types = getattr(text, "mlp_layer_types", None)
    if mlp_types:
        text.mlp_layer_types = [mlp_types[min(i, len(mlp_types) - 1)] for i in range(layers)]
    return config


def write_family(model_type: str, path: Path, seed: int = 0, layers: int = 4,
                 dtype: torch.dtype = torch.float32, **overrides) -> Path:  # fmt: skip
    """A tiny random checkpoint of `model_type`, saved as transformers saves real ones
    (save_pretrained: hub names, per-expert weights), with the synthetic tokenizer.
    Weights are larger than the default init, so that blocks do real work."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_family_config(model_type, layers, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="200KB")
    synthetic_tokenizer(TOKENIZER_VOCAB // 2).save_pretrained(path)
    return Path(path)


def synth_command(out: str, shape: str, layers: int | None, dtype: str, seed: int,
                  max_shard_size: float, shape_only: bool) -> Path:  # fmt: skip
    """`streamsvd synth`: `synthesize`, with the dtype by name and the shard size in GiB;
    prints what it wrote."""
    path = synthesize(out, shape, layers, DTYPES[dtype], seed, int(max_shard_size * 2**30),
                      not shape_only)  # fmt: skip
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"wrote {path} ({size / 2**30:,.2f} GiB)")
    return path
