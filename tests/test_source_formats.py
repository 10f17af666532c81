"""Every source format is read right or refused by name, before the first block.

FP8 checkpoints are made here from a tiny random bfloat16 Llama, as DeepSeek-V3 and the
official FP8 releases ship theirs: each block linear as float8_e4m3fn codes with float32
scales (quant_method "fp8": one `weight_scale_inv` per 16 × 16 block, the last block of a
width that 16 does not divide, 72, partial; or one per tensor), or in compressed-tensors'
float-quantized and int-quantized formats (float8 or int8 codes, one `weight_scale` per
output row). Embeddings and norms stay
bfloat16. Beside each, its dequantized twin: the same weights dequantized here, by a plain
loop over the blocks, and saved in bfloat16.

The reader dequantizes each weight as transformers computes it (float32 product, rounded
once to bfloat16), so compress sees exactly the twin's weights: every later step is the
same deterministic CPU computation on the same bytes, and the two outputs must be
identical, tensor for tensor and logit for logit (not merely close).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from streamsvd import CompressConfig, compress, formats, load_compressed
from streamsvd.checkpoint import CheckpointReader, copy_side_files, shard_name, write_index
from streamsvd.cli import main
from streamsvd.errors import StreamSVDError
from streamsvd.model import build_skeleton, find_blocks, load_config
from streamsvd.names import ModelTensors
from streamsvd.plan import make_plan

BLOCK = [16, 16]  # 72 = 4·16 + 8: partial blocks along every hidden-wide dimension
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
SMALL = dict(nsamples=8, seqlen=32, batch_size=4, ratio=0.3, refine_epochs=1)


# -- writing checkpoints ----------------------------------------------------------------


def stored(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, as stored."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}
    return out


def write_like(src: Path, dst: Path, tensors: dict, quantization: dict | None = None,
               shards: int = 3) -> Path:  # fmt: skip
    """`tensors` as a checkpoint in `shards` files, with src's config (and `quantization`
    as its quantization_config) and tokenizer."""
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    if quantization is not None:
        config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config))
    copy_side_files(src, dst)
    names = sorted(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per : (k + 1) * per]
        save_file({n: tensors[n].clone() for n in part}, dst / shard_name(k + 1, shards),
                  metadata={"format": "pt"})  # fmt: skip
        weight_map |= dict.fromkeys(part, shard_name(k + 1, shards))
    write_index(dst, weight_map)
    return dst


def block_linears(tensors: dict) -> list[str]:
    return [n for n, t in tensors.items() if n.startswith("model.layers.") and t.dim() == 2]


def fp8_blocks(W: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """W as float8 codes and float32 scales (absmax / 448): one per block, or per tensor."""
    rows, cols = W.shape
    r, c = block or (rows, cols)
    scales = torch.empty(-(-rows // r), -(-cols // c))
    codes = torch.empty(W.shape, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = W[i * r : (i + 1) * r, j * c : (j + 1) * c].float()
            scales[i, j] = tile.abs().max() / FP8_MAX
            codes[i * r : (i + 1) * r, j * c : (j + 1) * c] = (tile / scales[i, j]).to(codes.dtype)
    return codes, scales if block else scales.reshape(())


def dequantized(codes: torch.Tensor, scales: torch.Tensor, block: list[int] | None):
    """The weight the codes stand for, a block at a time: float32 product, one rounding."""
    rows, cols = codes.shape
    r, c = block or (rows, cols)
    grid = scales.reshape(-(-rows // r), -(-cols // c))
    out = torch.empty(codes.shape, dtype=torch.bfloat16)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            tile = codes[i * r : (i + 1) * r, j * c : (j + 1) * c].float() * grid[i, j]
            out[i * r : (i + 1) * r, j * c : (j + 1) * c] = tile.to(torch.bfloat16)
    return out


def fp8_config(block: list[int] | None) -> dict:
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
            "weight_block_size": block}  # fmt: skip


def compressed_tensors_config(kind: str = "float") -> dict:
    """W8A8 with one weight scale per output row: float8 (float-quantized) or int8."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    weights = QuantizationArgs(num_bits=8, type=kind, strategy="channel", symmetric=True)
    inputs = QuantizationArgs(num_bits=8, type=kind, strategy="token", dynamic=True,
                              symmetric=True)  # fmt: skip
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=f"{kind}-quantized",
                                quantization_status="compressed", ignore=["lm_head"])  # fmt: skip
    return {"quant_method": "compressed-tensors", **config.to_dict()}


def per_row(W: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W as float8 or int8 codes with one float32 scale per output row (absmax / top code)."""
    top = FP8_MAX if kind == "float" else 127
    scale = W.float().abs().amax(dim=1, keepdim=True) / top
    if kind == "float":
        return (W.float() / scale).to(torch.float8_e4m3fn), scale
    return (W.float() / scale).round().clamp(-128, 127).to(torch.int8), scale


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (the quantized checkpoint, its dequantized twin), each made on first use."""
    root = tmp_path_factory.mktemp("formats")
    base = write_checkpoint(root / "base", tiny_config(hidden=72), dtype=torch.bfloat16)
    made = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind in made:
            return made[kind]
        tensors = stored(base)
        quantized, twin = dict(tensors), dict(tensors)
        for name in block_linears(tensors):
            if kind.startswith("compressed-tensors"):
                codes, scale = per_row(tensors[name], kind.rpartition("-")[2])
                quantized[name[: -len("weight")] + "weight_scale"] = scale
                twin[name] = (codes.float() * scale).to(torch.bfloat16)
            else:
                block = BLOCK if kind == "fp8-block" else None
                codes, scales = fp8_blocks(tensors[name], block)
                quantized[name + "_scale_inv"] = scales
                twin[name] = dequantized(codes, scales, block)
            quantized[name] = codes
        if kind.startswith("compressed-tensors"):
            config = compressed_tensors_config(kind.rpartition("-")[2])
        else:
            config = fp8_config(BLOCK if kind == "fp8-block" else None)
        made[kind] = (write_like(base, root / kind, quantized, config),
                      write_like(base, root / f"{kind}-twin", twin))  # fmt: skip
        return made[kind]

    return get


@pytest.fixture(scope="module")
def base_checkpoint(checkpoints) -> Path:
    return checkpoints("fp8-block")[0].parent / "base"


KINDS = ["fp8-block", "fp8-tensor", "compressed-tensors-float", "compressed-tensors-int"]


# -- read right ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_weights_read_as_their_dequantized_values(kind, checkpoints):
    quantized, twin = checkpoints(kind)
    reader, want = CheckpointReader(quantized), CheckpointReader(twin)
    assert reader.dtype() == torch.bfloat16  # never float8, nor the scales' float32
    assert reader.shapes() == want.shapes()  # the scales are not tensors of the model
    assert sorted(reader) == sorted(want)
    got = reader.tensors(list(want))
    for name, value in want.tensors(list(want)).items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert len(reader.quantized) == len(block_linears(stored(twin)))


def test_activation_scales_are_left_out(checkpoints, tmp_path):
    """Static activation scales quantize inputs at run time and are no part of a weight:
    the reader leaves them out, and nothing counts them as unread."""
    quantized, _ = checkpoints("fp8-block")
    tensors = stored(quantized)
    scales = {n[: -len("weight")] + "activation_scale": torch.tensor(0.5)
              for n in block_linears(stored(checkpoints("fp8-block")[1]))}  # fmt: skip
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    model = write_like(quantized, tmp_path / "static", tensors | scales, config)
    found = tensors_of(model)
    assert sorted(found.reader.runtime_scales) == sorted(scales)
    assert not found.unused and not set(scales) & set(found.reader)


def test_fp8_blocks_follow_transformers_and_compressed_tensors(checkpoints, monkeypatch):
    """Partial edge blocks included, the reader's values are those of transformers'
    `_dequantize_fp8_weight` (the float32 product rounded once) and of compressed-tensors'
    FP8 block dequantizer, whatever the chunk the product is taken in."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    ct = pytest.importorskip(
        "compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer"
    )
    quantized, _ = checkpoints("fp8-block")
    raw = stored(quantized)
    library = ct.FP8BlockDequantizer(weight_block_size=BLOCK, dtype=torch.bfloat16)
    partial = 0
    for chunk in (formats.CHUNK, 40):  # 40 values: several chunks a weight
        monkeypatch.setattr(formats, "CHUNK", chunk)
        reader = CheckpointReader(quantized)
        for name in reader.quantized:
            codes, scales = raw[name], raw[name + "_scale_inv"]
            got = reader[name]
            want = _dequantize_fp8_weight(codes, scales, BLOCK, torch.float32).bfloat16()
            assert torch.equal(got, want), name
            assert torch.equal(got, library._create_dequantized_weight(codes, scales)), name
            partial += any(n % b for n, b in zip(codes.shape, BLOCK, strict=True))
    assert partial  # the edge blocks were exercised


def test_ue8m0_byte_scales_read_as_transformers_reads_them():
    """MXFP8-style scales stored as bytes (scale_fmt "ue8m0"): 2^(byte − 127)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    codes = (torch.randn(32, 48) * 100).to(torch.float8_e4m3fn)
    scales = torch.randint(110, 140, (2, 3), dtype=torch.uint8)
    got = formats._fp8_dequantize({"weight": codes, "scale": scales}, torch.bfloat16,
                                  block=[16, 16], ue8m0=True)  # fmt: skip
    want = Fp8Dequantize(None)._dequantize_one(codes, scales, output_dtype=torch.bfloat16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_checkpoint_compresses_as_its_twin(kind, checkpoints, small_calib_text,
                                                     tmp_path):  # fmt: skip
    quantized, twin = checkpoints(kind)
    outs = {}
    for source in (quantized, twin):
        out = tmp_path / source.name
        summary = compress(CompressConfig(model=str(source), out=str(out),
                                          calib=str(small_calib_text), **SMALL))  # fmt: skip
        assert summary["dtype"] == "bfloat16"
        outs[source] = out
    a, b = stored(outs[quantized]), stored(outs[twin])
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    config = json.loads((outs[quantized] / "config.json").read_text())
    assert "quantization_config" not in config  # written dense, in bfloat16
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [load_compressed(outs[s])(ids).logits for s in (quantized, twin)]
    assert torch.equal(*logits)


def test_fp8_checkpoint_compresses_to_4_bits(checkpoints, small_calib_text, tmp_path):
    """With --bits the output is compressed-tensors' pack-quantized format, not FP8."""
    quantized, _ = checkpoints("fp8-block")
    out = tmp_path / "out"
    compress(CompressConfig(model=str(quantized), out=str(out), calib=str(small_calib_text),
                            bits=4, group_size=8, **SMALL))  # fmt: skip
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"
    assert not any(n.endswith("_scale_inv") for n in stored(out))


@pytest.mark.parametrize("kind", ["fp8-block", "fp8-tensor"])
def test_the_plan_counts_the_dequantized_block(kind, checkpoints, tmp_path):
    """--dry-run plans an FP8 checkpoint as its bfloat16 twin: the block it holds is the
    dequantized one (two bytes a value), not the float8 codes and their scales."""
    quantized, twin = checkpoints(kind)
    fixed = {"peak": 0, "after": 0}
    plans = [make_plan(CompressConfig(model=str(p), out=str(tmp_path / p.name), nsamples=8,
                                      seqlen=32), fixed=fixed, timing=False)
             for p in (quantized, twin)]  # fmt: skip
    fp8, bf16 = plans
    assert fp8.dtype == bf16.dtype == "bfloat16"
    assert fp8.host_phases == bf16.host_phases
    assert fp8.params_before == bf16.params_before
    assert fp8.checkpoint_bytes == bf16.checkpoint_bytes == 2 * bf16.params_before
    assert fp8.disk_bytes["activations"] == bf16.disk_bytes["activations"]


# -- refused by name -------------------------------------------------------------------


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(["-q", *argv])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def refused(model: Path, tmp_path: Path, calib: Path, says: list[str], dry_run: bool = False):
    """compress exits 2 with one line naming the problem, and writes nothing."""
    out = tmp_path / "out"
    argv = ["compress", "--model", str(model), "--out", str(out), "--calib", str(calib),
            "--nsamples", "4", "--seqlen", "32"] + ["--dry-run"] * dry_run  # fmt: skip
    code, stderr = run(argv)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for word in says:
        assert word in lines[0], lines[0]
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # no out, .work, .partial
    return lines[0]


def gptq_like(tensors: dict, layer: str) -> dict:
    """A GPTQ linear's tensors in place of `layer`'s weight (4 bits, groups of 16)."""
    out, n = dict(tensors), tensors[f"{layer}.weight"].shape[1]
    m = out.pop(f"{layer}.weight").shape[0]
    return out | {f"{layer}.qweight": torch.zeros(n // 8, m, dtype=torch.int32),
                  f"{layer}.qzeros": torch.zeros(n // 16, m // 8, dtype=torch.int32),
                  f"{layer}.scales": torch.ones(n // 16, m, dtype=torch.float16),
                  f"{layer}.g_idx": torch.arange(n, dtype=torch.int32) // 16}  # fmt: skip


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_other_quantized_formats_are_refused_by_name(method, dry_run, base_checkpoint,
                                                     small_calib_text, tmp_path):  # fmt: skip
    tensors = gptq_like(stored(base_checkpoint), "model.layers.0.self_attn.q_proj")
    model = write_like(base_checkpoint, tmp_path / "model", tensors,
                       {"quant_method": method, "bits": 4, "group_size": 16})  # fmt: skip
    refused(model, tmp_path, small_calib_text, [repr(method), "dequantize"], dry_run)


def test_unread_compressed_tensors_formats_are_refused(base_checkpoint, small_calib_text,
                                                       tmp_path):  # fmt: skip
    config = compressed_tensors_config()
    config["format"] = config["config_groups"]["group_0"]["format"] = "nvfp4-pack-quantized"
    model = write_like(base_checkpoint, tmp_path / "model", stored(base_checkpoint), config)
    refused(model, tmp_path, small_calib_text, ["nvfp4-pack-quantized"])


def test_float8_weights_without_scales_are_refused(base_checkpoint, small_calib_text, tmp_path):
    tensors = stored(base_checkpoint)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    model = write_like(base_checkpoint, tmp_path / "model", tensors)
    refused(model, tmp_path, small_calib_text, [name, "float8"])


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_stray_tensor_is_refused_by_name(dry_run, base_checkpoint, small_calib_text, tmp_path):
    tensors = stored(base_checkpoint)
    tensors["model.layers.0.mlp.foo_scale"] = torch.ones(72)
    model = write_like(base_checkpoint, tmp_path / "model", tensors)
    refused(model, tmp_path, small_calib_text, ["model.layers.0.mlp.foo_scale", "1 checkpoint"],
            dry_run)  # fmt: skip


def tensors_of(path: Path) -> ModelTensors:
    reader = CheckpointReader(path)
    return ModelTensors(reader, build_skeleton(load_config(path), reader.dtype()))


def test_extras_transformers_expects_are_accepted(base_checkpoint, tmp_path):
    """Per-layer rotary inv_freq buffers of older checkpoints, which transformers' loading
    leaves out, are read by nothing and refuse nothing; a tensor beside them still does."""
    tensors = stored(base_checkpoint)
    extras = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(9) for i in (0, 1)}
    model = write_like(base_checkpoint, tmp_path / "model", tensors | extras)
    found = tensors_of(model)
    assert sorted(found.unused) == sorted(extras)
    found.check_unused(find_blocks(found.model)[0])
    stray = write_like(base_checkpoint, tmp_path / "stray", tensors | extras |
                       {"model.layers.1.self_attn.rotary_emb.scale": torch.ones(9)})  # fmt: skip
    with pytest.raises(StreamSVDError, match=r"1 checkpoint tensor.*rotary_emb\.scale"):
        tensors_of(stray).check_unused("model.layers")


def test_the_model_classs_own_ignored_keys_are_accepted(tmp_path):
    """GPT-2 hub checkpoints store each block's causal-mask buffer (`h.0.attn.bias`), which
    GPT2LMHeadModel's _keys_to_ignore_on_load_unexpected names."""
    from streamsvd.synth import write_family

    base = write_family("gpt2", tmp_path / "base", layers=2, dtype=torch.bfloat16)
    masks = {f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 8, 8) for i in (0, 1)}
    found = tensors_of(write_like(base, tmp_path / "masks", stored(base) | masks))
    assert sorted(found.unused) == sorted(masks)
    found.check_unused(find_blocks(found.model)[0])


def test_multi_token_prediction_layers_are_accepted(tmp_path):
    """DeepSeek-V3 ships its MTP module as one more block than num_hidden_layers
    (num_nextn_predict_layers of them): accepted; a block past those is not."""
    from streamsvd.synth import write_family

    base = write_family("deepseek_v3", tmp_path / "base", layers=2, dtype=torch.bfloat16)
    tensors = stored(base)
    mtp = {n.replace("model.layers.1.", "model.layers.2.", 1): t for n, t in tensors.items()
           if n.startswith("model.layers.1.")}  # fmt: skip
    mtp |= {"model.layers.2.eh_proj.weight": torch.ones(4, 8),
            "model.layers.2.enorm.weight": torch.ones(4)}  # fmt: skip
    assert load_config(base).num_nextn_predict_layers == 1
    found = tensors_of(write_like(base, tmp_path / "mtp", tensors | mtp))
    assert sorted(found.unused) == sorted(mtp)
    found.check_unused("model.layers")
    beyond = {n.replace("model.layers.2.", "model.layers.3.", 1): t for n, t in mtp.items()}
    found = tensors_of(write_like(base, tmp_path / "beyond", tensors | mtp | beyond))
    with pytest.raises(StreamSVDError, match=r"model\.layers\.3\."):
        found.check_unused("model.layers")


def test_an_unquantized_checkpoint_reads_as_before(base_checkpoint):
    """No format, no views: every tensor is read as stored."""
    reader = CheckpointReader(base_checkpoint)
    assert reader.quant_method is None and not reader.quantized and not reader.runtime_scales
    raw = stored(base_checkpoint)
    assert sorted(reader) == sorted(raw)
    assert all(torch.equal(reader[n], raw[n]) for n in raw)
