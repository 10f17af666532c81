"""Tiny random checkpoints on disk, written as sharded safetensors, with a small tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from streamsvd.calib import stdlib_docstrings

VOCAB = 512


@functools.cache
def _tokenizer_json() -> str:
    """A byte-level BPE trained on stdlib docstrings: no download, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([stdlib_docstrings(200_000)], trainer)
    return tok.to_str()


def tiny_config(arch: str = "llama", gqa: bool = True, tie: bool = True, bias: bool = False,
                layers: int = 2, hidden: int = 64):  # fmt: skip
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=0,
        bos_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common, attention_bias=bias, mlp_bias=bias)
    if arch == "qwen2":  # q/k/v carry biases in Qwen2
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common)
    raise ValueError(arch)


def write_checkpoint(path: Path, config, seed: int = 0, dtype=torch.float32) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # larger weights than the default init, so blocks do real work
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="40KB")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_load_tokenizer(), eos_token="<eos>")
    tokenizer.save_pretrained(path)
    return path


def _load_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json())


@pytest.fixture
def tiny_model(tmp_path):
    """Factory: tiny_model(arch=..., gqa=..., tie=..., bias=...) -> checkpoint dir."""

    def make(name: str = "tiny", **kwargs) -> Path:
        return write_checkpoint(tmp_path / name, tiny_config(**kwargs))

    return make


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(stdlib_docstrings(400_000))
    return path
