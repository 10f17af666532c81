"""Tiny random checkpoints on disk, written as sharded safetensors, with a small tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

# The suite runs as one worker per core (pytest-xdist, dev.sh): OpenMP threads that spin
# while they wait would take the cores from the other workers. Read when torch loads, so set
# before it; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from streamsvd.calib import stdlib_docstrings  # noqa: E402
from streamsvd.synth import bpe_tokenizer_json  # noqa: E402

VOCAB = 512


def _tokenizer_json() -> str:
    """A byte-level BPE trained on stdlib docstrings: no download, deterministic."""
    return bpe_tokenizer_json(VOCAB)


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
    if arch == "opt":  # learned position embeddings; gqa does not apply
        from transformers import OPTConfig

        common.pop("num_key_value_heads")
        common["ffn_dim"] = common.pop("intermediate_size")
        return OPTConfig(**common, word_embed_proj_dim=hidden, enable_bias=True, pad_token_id=1)
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


def assert_within_summation_bound(got: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """got = A·B up to rounding in float64, in whatever order the sums were taken: each entry
    is a dot product of length N, so |got − A·B| ≤ 2γ_N·(|A|·|B|) with γ_N = N·u/(1 − N·u)
    and u = 2⁻⁵³ (Higham, Accuracy and Stability of Numerical Algorithms, §3.1), one γ_N for
    `got` and one for the reference product. Independent of the BLAS and its blocking."""
    n_terms = A.shape[1]
    u = torch.finfo(torch.float64).eps / 2
    gamma = n_terms * u / (1 - n_terms * u)
    bound = 2 * gamma * (A.abs() @ B.abs())
    assert bool(((got - A @ B).abs() <= bound).all()), float(((got - A @ B).abs() / bound).max())


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


@pytest.fixture(scope="session")
def small_calib_text(tmp_path_factory) -> Path:
    """Enough text for a few dozen windows of 32 tokens, quick to tokenise."""
    path = tmp_path_factory.mktemp("small_calib") / "calib.txt"
    path.write_text(stdlib_docstrings(40_000))
    return path


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP workers that
    wait on busy cores make every small op many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def worker_cores() -> int:
    """This test worker's share of the usable cores (pytest-xdist runs one worker per core)."""
    from streamsvd.cpus import usable_cpus

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, usable_cpus() // workers)


def pytest_collection_modifyitems(config, items):
    """The real-model tests first: they are the longest file, so with one worker per core
    the other workers run the rest beside them instead of after them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
