"""compress --bits: the factors quantized in the stream and written as compressed-tensors
pack-quantized. The packed tensors give back exactly the quantized values; the output loads
in stock transformers where streamsvd is not installed and gives streamsvd's own logits; a
kill while a block is being quantized resumes to the same bytes; what cannot be combined
with quantized factors is refused."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from conftest import tiny_config, write_checkpoint
from test_remote_code import run_stock
from test_resume import KILLED, _config, blocks_computed, output_hashes, run_cli

from streamsvd import CompressConfig, compress, load_compressed
from streamsvd.calib import stdlib_docstrings
from streamsvd.checkpoint import CheckpointReader
from streamsvd.errors import StreamSVDError
from streamsvd.quantize import DAMP, QuantSettings, gptq, packed_tensors, unpacked_weight

QUANT = ("--bits", "4", "--group-size", "16")  # the tiny model's k/v ranks hold one group


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_packed_tensors_give_back_the_quantized_values(bits, symmetric):
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(24, 96, generator=gen, dtype=torch.float64)
    X = torch.randn(96, 400, generator=gen, dtype=torch.float64)
    settings = QuantSettings(bits, 32, symmetric)
    q = gptq(W, X @ X.T, bits, 32, symmetric, scale_dtype=torch.float32)
    packed = packed_tensors(q, settings, torch.float32)
    assert packed["weight_packed"].dtype == torch.int32
    assert packed["weight_packed"].numel() * 32 == W.numel() * bits  # dense packing
    codes = unpack_from_int32(packed["weight_packed"], bits, torch.Size(W.shape))
    assert torch.equal(codes.to(torch.int32) + 2 ** (bits - 1), q.codes)
    # scale·(code − zero) of a float32 scale and small integers is exact in float64, and
    # float32's product is that value correctly rounded: the two must agree bit for bit
    expected = q.dequantize().to(torch.float32)
    assert torch.equal(unpacked_weight(packed, settings.scheme()), expected)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(stdlib_docstrings(40_000))
    return path


STOCK = r"""
import json, sys
sys.modules["streamsvd"] = None  # as where streamsvd is not installed
import torch
from transformers import AutoModelForCausalLM
path, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
with torch.no_grad():
    logits = model.eval()(ids).logits
q = model.model.layers[0].self_attn.q_proj
print("\nRESULT", json.dumps({"class": type(model).__name__, "logits": logits.tolist(),
                             "down": q.down.weight.tolist()}))
"""


def test_stock_transformers_loads_the_quantized_output(calib, tmp_path):
    model = write_checkpoint(tmp_path / "model", tiny_config(layers=2))
    out = tmp_path / "out"
    summary = compress(CompressConfig(model=str(model), out=str(out), calib=str(calib),
                                      ratio=0.2, nsamples=8, seqlen=32, batch_size=4,
                                      bits=4))  # fmt: skip
    assert summary["quantization"] == {"bits": 4, "group_size": 16, "symmetric": True}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    reader = CheckpointReader(out)
    assert any(n.endswith(".down.weight_packed") for n in reader.stored)
    assert not any(n.endswith(".down.weight") for n in reader.stored)
    ids = torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    result, _ = run_stock(STOCK, [str(out), json.dumps(ids.tolist())], tmp_path, 300)
    assert result["class"] == "StreamSVDForCausalLM"
    ours_model = load_compressed(out)
    with torch.no_grad():
        ours = ours_model(ids).logits
    # the same dequantized weights (compressed-tensors' decompressor on both sides) ...
    down = ours_model.model.layers[0].self_attn.q_proj.down.weight
    assert torch.equal(torch.tensor(result["down"], dtype=torch.float32), down)
    # ... and the same modules, so the same float32 operations in the same order
    assert torch.equal(torch.tensor(result["logits"], dtype=torch.float32), ours)


def test_killed_while_quantizing_resumes_to_identical_bytes(tmp_path):
    root = tmp_path
    model = write_checkpoint(root / "model", tiny_config(layers=3))
    text = root / "calib.txt"
    text.write_text(stdlib_docstrings(40_000))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses
    try:
        compress(_config(model, text, root / "reference", "svdllm-a", bits=4, group_size=16))
    finally:
        torch.set_num_threads(before)
    out = root / "out"
    result = run_cli(model, text, out, "svdllm-a", "quantize:1", extra=QUANT)
    assert result.returncode == KILLED, result.stderr[-3000:]
    result = run_cli(model, text, out, "svdllm-a", extra=QUANT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at block 2/3" in result.stderr
    assert blocks_computed(result.stderr) == [2, 3]
    assert output_hashes(out) == output_hashes(root / "reference")


def test_what_quantized_factors_cannot_be_combined_with_is_refused(calib, tmp_path):
    model = write_checkpoint(tmp_path / "model", tiny_config(layers=1))
    with pytest.raises(StreamSVDError, match="choose one"):
        CompressConfig(model=str(model), out=str(tmp_path / "o"), bits=4, dense=True)
    with pytest.raises(StreamSVDError, match="--bits must be one of"):
        CompressConfig(model=str(model), out=str(tmp_path / "o"), bits=3)
    with pytest.raises(StreamSVDError, match="does not divide the input width"):
        compress(CompressConfig(model=str(model), out=str(tmp_path / "o"), calib=str(calib),
                                bits=4, group_size=128, nsamples=4, seqlen=32))  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_bits_whiten_with_gptqs_damping(calib, tmp_path, monkeypatch):
    """With --bits the whitening's Cholesky gets GPTQ's ridge (step.whitening_damping),
    without it none: unquantized outputs are as before."""
    import streamsvd.stats as stats_module

    model = write_checkpoint(tmp_path / "model", tiny_config(layers=1))
    seen = []
    plain = stats_module.damped_cholesky_

    def spy(gram, what="Gram", least=0.0, *args):
        seen.append((what, least))
        return plain(gram, what, least, *args)

    monkeypatch.setattr(stats_module, "damped_cholesky_", spy)
    for bits in (None, 4):
        seen.clear()
        compress(CompressConfig(model=str(model), out=str(tmp_path / f"out{bits}"),
                                calib=str(calib), ratio=0.2, nsamples=4, seqlen=32,
                                batch_size=4, bits=bits))  # fmt: skip
        whitened = [least for what, least in seen if what.endswith(" G'")]  # "<linears> G'"
        assert whitened and set(whitened) == {DAMP if bits else 0.0}
