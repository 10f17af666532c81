"""The streamed pipeline against a plain in-memory SVD-LLM, and what it writes to disk.

The in-memory reference loads the whole model with transformers, captures each linear's
inputs with forward hooks on the original model (original stream) and on a working copy
whose earlier blocks are already compressed (compressed stream), factorises, and swaps the
block's linears in the copy for low-rank ones: the sequential procedure written out plainly.
With sequential statistics (the default) each linear's compressed-stream inputs are taken
again after the block's earlier linears are swapped; together, once per block.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamsvd import CompressConfig, LowRankLinear, compress, export_dense, load_compressed
from streamsvd.calib import calibration_windows, eval_windows, load_text, tokenize
from streamsvd.evaluate import perplexity
from streamsvd.factorize import METHODS, rank_for
from streamsvd.stats import InputStats

NSAMPLES, SEQLEN, BATCH, RATIO, SEED = 8, 32, 3, 0.3, 7  # batches of 3, 3, 2

MODELS = {
    "llama": dict(arch="llama"),  # GQA, tied embeddings
    "llama-mha-untied": dict(arch="llama", gqa=False, tie=False),
    "llama-bias": dict(arch="llama", bias=True, tie=False),
    "qwen2": dict(arch="qwen2", tie=False),  # q/k/v biases
    "mistral": dict(arch="mistral", gqa=True, tie=False),
    "opt": dict(arch="opt", tie=False),  # learned position embeddings, biases
}
CASES = [
    ("llama", "svd"),
    ("llama", "svdllm-w"),
    ("llama", "svdllm-u"),
    ("llama", "svd-u"),
    ("llama", "svdllm-a"),
    ("llama-mha-untied", "svdllm-u"),
    ("llama-mha-untied", "svdllm-a"),
    ("llama-bias", "svdllm-a"),
    ("qwen2", "svdllm-w"),
    ("qwen2", "svdllm-a"),
    ("mistral", "svdllm-u"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, small_calib_text):
    """Checkpoints and compressed outputs, each made once per module on first use."""
    root = tmp_path_factory.mktemp("pipeline")
    cache: dict = {}

    def checkpoint(model: str, dtype=torch.float32):
        if (model, dtype) not in cache:
            path = root / f"{model}-{str(dtype).removeprefix('torch.')}"
            cache[model, dtype] = write_checkpoint(path, tiny_config(**MODELS[model]), dtype=dtype)
        return cache[model, dtype]

    def compressed(model: str, method: str, dtype=torch.float32, sequential=True):
        key = (model, method, dtype, sequential)
        if key not in cache:
            out = root / f"{model}-{method}-{str(dtype).removeprefix('torch.')}-{sequential}"
            summary = compress(
                CompressConfig(
                    model=str(checkpoint(model, dtype)),
                    out=str(out),
                    ratio=RATIO,
                    method=method,
                    calib=str(small_calib_text),
                    nsamples=NSAMPLES,
                    seqlen=SEQLEN,
                    seed=SEED,
                    batch_size=BATCH,
                    sequential=sequential,
                    refine_epochs=0,  # the in-memory reference is the closed form
                )  # fmt: skip
            )
            cache[key] = (out, summary)
        return cache[key]

    return checkpoint, compressed


# -- the in-memory reference ---------------------------------------------------------


def calibration(checkpoint, calib) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text, _ = load_text(str(calib))
    return calibration_windows(tokenize(tokenizer, text), NSAMPLES, SEQLEN, SEED)


def linear_names(block: nn.Module) -> list[str]:
    return [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def linear_inputs(model, block, names, windows) -> dict[str, torch.Tensor]:
    """What each named linear of `block` sees when the whole model runs on `windows`."""
    seen = {}

    def hook(name):
        return lambda module, args: seen.__setitem__(name, args[0].clone())

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def in_memory_products(checkpoint, calib, method_name: str,
                       sequential: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    method = METHODS[method_name]
    original = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64).eval()
    working = copy.deepcopy(original)  # blocks get compressed one by one
    windows = calibration(checkpoint, calib) if method.needs else None
    blocks = original.get_decoder().layers
    prefix = next(name for name, m in original.named_modules() if m is blocks)
    products = {}
    for i, (block, work_block) in enumerate(zip(blocks, working.get_decoder().layers, strict=True)):
        names = linear_names(block)
        if method.needs:
            x = linear_inputs(original, block, names, windows)  # original stream
            xc = linear_inputs(working, work_block, names, windows)  # compressed stream
        for name in names:
            linear = block.get_submodule(name)
            m, n = linear.weight.shape
            stats = None
            if method.needs:
                if sequential:  # after the block's earlier linears are compressed
                    xc = linear_inputs(working, work_block, [name], windows)
                stats = InputStats(n, method.needs, "cpu", {name: linear.weight})
                stats.add(x[name], xc[name])
                stats = stats.for_linear(name)
            A, B = method.factorize(linear.weight, stats, rank_for(m, n, RATIO))
            low = LowRankLinear.from_factors(A, B, linear.bias, torch.float64)
            parent, _, child = name.rpartition(".")
            setattr(work_block.get_submodule(parent), child, low)
            products[f"{prefix}.{i}.{name}"] = low.up.weight.double() @ low.down.weight.double()
    return products


def tensors_of(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


# -- streamed == in memory -----------------------------------------------------------


@pytest.mark.parametrize(
    "model, method, sequential",
    [(model, method, True) for model, method in CASES]
    # statistics taken together differ only where a method reads the compressed stream
    + [(model, method, False) for model, method in CASES if "comp" in METHODS[method].streams],
)
def test_streaming_equals_in_memory(workspace, small_calib_text, model, method, sequential):
    """In float64 checkpoints: the streamed run and the reference batch their forwards
    differently, and a near-tie of singular values at the cut amplifies rounding
    differences by 1/gap. At float64's u ≈ 1e-16 the margin below covers gaps down to
    1e-10 of the scale; in float32 (u ≈ 6e-8) another CPU's kernels have crossed it."""
    checkpoint, compressed = workspace
    out, _ = compressed(model, method, torch.float64, sequential)
    expected = in_memory_products(checkpoint(model, torch.float64), small_calib_text, method,
                                  sequential)  # fmt: skip
    streamed = load_compressed(out)
    low_rank = {n for n, m in streamed.named_modules() if isinstance(m, LowRankLinear)}
    assert set(expected) == low_rank  # every block linear, and nothing else
    for name, product in expected.items():
        layer = streamed.get_submodule(name)
        assert isinstance(layer, LowRankLinear), name
        got = layer.up.weight.double() @ layer.down.weight.double()
        scale = float(product.abs().max())
        torch.testing.assert_close(got, product, rtol=0, atol=1e-6 * scale, msg=name)


def test_streaming_equals_in_memory_with_learned_positions(workspace, small_calib_text):
    test_streaming_equals_in_memory(workspace, small_calib_text, "opt", "svdllm-a", True)


# -- what is written -----------------------------------------------------------------


@pytest.mark.parametrize(
    "model, method",
    [("llama", "svd"), ("llama", "svdllm-a"), ("llama-bias", "svdllm-a"), ("qwen2", "svdllm-a"),
     ("llama-mha-untied", "svdllm-u")],
)  # fmt: skip
def test_output_copies_everything_else_bit_for_bit(workspace, model, method):
    checkpoint, compressed = workspace
    out, _ = compressed(model, method)
    before, after = tensors_of(checkpoint(model)), tensors_of(out)
    ranks = json.loads((out / "config.json").read_text())["streamsvd"]["ranks"]
    factored = {f"{layer}.{p}" for layer in ranks for p in ("weight", "bias")}
    expected_names = {n for n in before if n not in factored}
    for layer in ranks:
        expected_names |= {f"{layer}.up.weight", f"{layer}.down.weight"}
        if f"{layer}.bias" in before:
            expected_names.add(f"{layer}.up.bias")
            assert torch.equal(after[f"{layer}.up.bias"], before[f"{layer}.bias"]), layer
    assert set(after) == expected_names
    copied = [n for n in before if n not in factored]
    assert any("norm" in n for n in copied) and any("embed" in n for n in copied)
    for name in copied:  # norms, embeddings, LM head
        assert after[name].dtype == before[name].dtype and torch.equal(after[name], before[name])
    assert ("lm_head.weight" in after) == (not MODELS[model].get("tie", True))


@pytest.mark.parametrize("model, method", [("llama", "svd"), ("qwen2", "svdllm-a")])
def test_output_is_a_sharded_checkpoint_with_streamsvd_config(
    workspace, small_calib_text, model, method
):
    checkpoint, compressed = workspace
    out, _ = compressed(model, method)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count >= 2
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    located, total = {}, 0
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            for name in f.keys():
                located[name] = shard
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    assert index["weight_map"] == located  # every tensor, each in the shard that holds it
    assert index["metadata"]["total_size"] == total
    assert not out.with_name(out.name + ".work").exists()
    assert not out.with_name(out.name + ".partial").exists()
    src = checkpoint(model)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    config = json.loads((out / "config.json").read_text())
    section = config.pop("streamsvd")
    original = json.loads((src / "config.json").read_text())
    # the original config, but for what makes it self-describing (tests/test_remote_code.py)
    assert config.pop("auto_map") == {
        "AutoConfig": "modeling_streamsvd.StreamSVDConfig",
        "AutoModelForCausalLM": "modeling_streamsvd.StreamSVDForCausalLM",
        "AutoModel": "modeling_streamsvd.StreamSVDModel",  # the base model, for vLLM
    }
    base = original.pop("model_type")
    assert config.pop("model_type") == f"streamsvd_{base}" and section["base_model_type"] == base
    assert config == original
    assert (out / "modeling_streamsvd.py").exists()
    assert section["method"] == method and section["ratio"] == RATIO
    assert section["complete"] is True
    shapes = {n: t.shape for n, t in tensors_of(src).items()}
    layers = [n.removesuffix(".weight") for n in shapes if ".layers." in n and "proj.weight" in n]
    assert len(layers) == 14
    assert section["ranks"] == {
        layer: rank_for(*shapes[f"{layer}.weight"], RATIO) for layer in layers
    }
    for layer, rank in section["ranks"].items():
        with safe_open(out / index["weight_map"][f"{layer}.down.weight"], "pt") as f:
            assert f.get_slice(f"{layer}.down.weight").get_shape()[0] == rank
    if METHODS[method].needs:
        calib = section["calibration"]
        assert (calib["nsamples"], calib["seqlen"], calib["seed"]) == (NSAMPLES, SEQLEN, SEED)
        text = small_calib_text.read_text()
        assert calib["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    else:
        assert "calibration" in section


# -- using the output ----------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_files_follow_the_umask(workspace, small_calib_text, tmp_path, umask):
    """Shards are written by safetensors for their owner only; the output must get the
    modes any other new file gets, so that colleagues on a shared machine can read it."""
    checkpoint, _ = workspace
    cfg = CompressConfig(model=str(checkpoint("llama")), out=str(tmp_path / "out"),
                         ratio=RATIO, method="svd", calib=str(small_calib_text), nsamples=4,
                         seqlen=SEQLEN)  # fmt: skip
    before = os.umask(umask)
    try:
        compress(cfg)
    finally:
        os.umask(before)
    out = Path(cfg.out)
    assert any(out.glob("*.safetensors"))
    for item in [out, *out.rglob("*")]:
        want = (0o777 if item.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(item.stat().st_mode) == want, (item.name, oct(item.stat().st_mode))


def some_windows(checkpoint, calib, count: int) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenize(tokenizer, calib.read_text()[-20_000:], special_tokens=True)
    return eval_windows(ids, SEQLEN, count)


@torch.no_grad()
def test_compressed_logits_equal_dense_export(workspace, small_calib_text, tmp_path):
    checkpoint, compressed = workspace
    out, _ = compressed("llama-bias", "svdllm-a")  # biases, untied head
    dense_dir = export_dense(out, tmp_path / "dense")
    dense, info = AutoModelForCausalLM.from_pretrained(
        dense_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    low = load_compressed(out)
    for name, layer in low.named_modules():
        if isinstance(layer, LowRankLinear):
            dense_layer = dense.get_submodule(name)
            product = (layer.up.weight.double() @ layer.down.weight.double()).float()
            assert torch.equal(dense_layer.weight, product), name
            assert torch.equal(dense_layer.bias, layer.up.bias), name
    ids = some_windows(checkpoint("llama-bias"), small_calib_text, 3)
    got, want = low(input_ids=ids).logits, dense.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))

    prompt = ids[:1, :8]
    generated = low.generate(prompt, max_new_tokens=6, do_sample=False)
    assert 8 < generated.shape[1] <= 14 and torch.equal(generated[:, :8], prompt)
    assert torch.equal(generated, dense.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("model, method", [("llama", "svdllm-w"), ("llama-mha-untied", "svdllm-u")])
def test_linear_parameters_shrink_by_the_ratio(workspace, model, method):
    checkpoint, compressed = workspace
    out, summary = compressed(model, method)
    before, after = tensors_of(checkpoint(model)), tensors_of(out)
    ranks = json.loads((out / "config.json").read_text())["streamsvd"]["ranks"]
    dense = sum(before[f"{layer}.weight"].numel() for layer in ranks)
    low = sum(after[f"{layer}.{p}.weight"].numel() for layer in ranks for p in ("up", "down"))
    one_rank_each = sum(sum(before[f"{layer}.weight"].shape) for layer in ranks)
    assert (1 - RATIO) * dense - one_rank_each <= low <= (1 - RATIO) * dense
    assert (summary["linear_params_before"], summary["linear_params_after"]) == (dense, low)


@torch.no_grad()
def test_streamed_perplexity_equals_in_memory(workspace, small_calib_text):
    checkpoint, compressed = workspace
    out, _ = compressed("llama", "svdllm-a")
    windows = some_windows(checkpoint("llama"), small_calib_text, 5)
    assert windows.shape == (5, SEQLEN)
    original = AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32)
    results = []
    for path, model in [(checkpoint("llama"), original), (out, load_compressed(out))]:
        want = math.exp(float(model.eval()(input_ids=windows, labels=windows).loss))
        got = perplexity(path, windows, batch_size=2, progress=False)  # batches of 2, 2, 1
        assert got == pytest.approx(want, rel=1e-5)
        results.append(got)
    assert results[0] != results[1]  # the compressed model is a different model
