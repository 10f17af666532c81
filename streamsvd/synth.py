"""Synthetic Llama-family checkpoints at real shapes, for measuring memory and time at scale.

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
    """Widths and head layout of a Llama-family model."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int  # the real model's depth (synthesize takes any)
    max_positions: int = 4096
    rope_theta: float = 10000.0
    source: str = ""


SHAPES: dict[str, Shape] = {
    "tiny": Shape(128, 344, 4, 2, 1024, 2, 512, source="test shape"),
    "1b": Shape(2048, 5632, 32, 4, 32000, 22, 2048, source="TinyLlama-1.1B"),
    "7b": Shape(4096, 11008, 32, 32, 32000, 32, source="Llama-2-7B"),
    "13b": Shape(5120, 13824, 40, 40, 32000, 40, source="Llama-2-13B"),
    "34b": Shape(8192, 22016, 64, 8, 32000, 48, 16384, 1e6, source="CodeLlama-34B"),
    "70b": Shape(8192, 28672, 64, 8, 32000, 80, source="Llama-2-70B"),
    "405b": Shape(16384, 53248, 128, 8, 128256, 126, 131072, 5e5, source="Llama-3.1-405B"),
}

_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def llama_config(shape: Shape, layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
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
    head_dim = h // shape.heads
    attn = h * head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    block = attn + 3 * h * i + 2 * h
    return (layers * block + 2 * v * h + h) * dtype.itemsize


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
    config = llama_config(shape, layers, dtype)
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
