"""A low-rank output loads with stock transformers where streamsvd is not installed
(`trust_remote_code=True`: the output carries its own modeling code), gives the logits
`load_compressed` gives, and refuses to load without trust_remote_code rather than build
the original architecture with random weights where the factors are.

One of each kind in float64, compared at 1e-9 of the logits' scale (see
tests/test_families.py for why): a dense Llama (tied embeddings, GQA), a mixture of experts
(Qwen3-MoE), GPT-2's Conv1D, and mixed attention (Gemma-2). Then every family the
compressor supports (synth.FAMILIES, 36), in float32, in one stock process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from streamsvd import CompressConfig, compress, load_compressed
from streamsvd.synth import FAMILIES, write_family

ONE_OF_EACH_KIND = ["llama", "qwen3_moe", "gpt2", "gemma2"]

STOCK = r"""
import json, sys
sys.modules["streamsvd"] = None  # as where streamsvd is not installed
import torch
from transformers import AutoModelForCausalLM
path, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
try:
    AutoModelForCausalLM.from_pretrained(path)
    print("LOADED WITHOUT trust_remote_code")
    sys.exit(1)
except ValueError as exc:
    print("refused:", " ".join(str(exc).split()), file=sys.stderr)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float64)
with torch.no_grad():
    logits = model.eval()(ids).logits
print("\nRESULT", json.dumps({"class": type(model).__name__, "logits": logits.tolist()}))
"""


def run_stock(script: str, args: list[str], tmp_path, timeout: int) -> tuple[dict, str]:
    """Run `script` in a fresh interpreter that cannot import streamsvd (no PYTHONPATH, its
    own HF_HOME for the copied remote code): what it printed after RESULT, and all it said."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf")  # where transformers copies remote code
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.split("\nRESULT ")[-1]), done.stdout + done.stderr


@pytest.mark.parametrize("family", ONE_OF_EACH_KIND)
def test_stock_transformers_loads_the_low_rank_output(family, small_calib_text, tmp_path):
    model = write_family(family, tmp_path / "model", dtype=torch.float64, layers=2)
    out = tmp_path / "out"
    compress(CompressConfig(model=str(model), out=str(out), calib=str(small_calib_text), ratio=0.3,
                            nsamples=8, seqlen=32, batch_size=4))  # fmt: skip
    ids = torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    result, said = run_stock(STOCK, [str(out), json.dumps(ids.tolist())], tmp_path, 300)
    # without trust_remote_code transformers asks, and refuses when nobody answers yes
    assert "trust_remote_code=True" in said
    assert result["class"] == "StreamSVDForCausalLM"
    stock = torch.tensor(result["logits"], dtype=torch.float64)
    with torch.no_grad():
        ours = load_compressed(out)(ids).logits
    assert float((stock - ours).abs().max()) <= 1e-9 * float(ours.abs().max())


STOCK_ALL = r"""
import json, sys
sys.modules["streamsvd"] = None  # as where streamsvd is not installed
import torch
from transformers import AutoModel, AutoModelForCausalLM
outs, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
result = {}
for family, path in outs.items():
    try:
        AutoModelForCausalLM.from_pretrained(path)
        refused = False
    except ValueError as exc:
        refused = "trust_remote_code=True" in str(exc)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                 dtype=torch.float32)
    base = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        logits = model.eval()(ids).logits
        hidden = base.eval()(ids).last_hidden_state
    result[family] = {"refused": refused, "class": type(model).__name__,
                      "logits": logits.tolist(), "base": type(base).__name__,
                      "hidden": hidden.tolist()}
print("\nRESULT", json.dumps(result))
"""


def test_every_family_loads_through_its_own_code(small_calib_text, tmp_path):
    """Every family streamsvd compresses (synth.FAMILIES), in one process that cannot import
    streamsvd: each output is refused without trust_remote_code and, with it, gives
    `load_compressed`'s logits; its base model alone (AutoModel, what vLLM's Transformers
    backend loads) gives its hidden states. In float32, as models are run: in float64 GPT-J's logits
    differ by 1e-8 of their scale (the 35 others within 1e-9); the cause is not pinned
    down, a buffer one loader computes in float32 being the likely one. The bound, 1e-5 of
    the scale (about 100 float32 roundings), is far below any error of substance (O(1): a
    wrong or randomly initialised layer)."""
    ids = torch.randint(2, 500, (1, 12), generator=torch.Generator().manual_seed(3))
    outs, ours, hidden = {}, {}, {}
    for family in FAMILIES:
        model = write_family(family, tmp_path / family, dtype=torch.float32, layers=2)
        outs[family] = str(tmp_path / f"{family}-out")
        compress(CompressConfig(model=str(model), out=outs[family], calib=str(small_calib_text),
                                ratio=0.3, nsamples=4, seqlen=16, batch_size=4,
                                allow_few_tokens=True))  # loaders, not quality  # fmt: skip
        loaded = load_compressed(outs[family])
        with torch.no_grad():
            ours[family] = loaded(ids).logits
            base = loaded.get_submodule(loaded.base_model_prefix)
            hidden[family] = base(ids).last_hidden_state
    result, _ = run_stock(STOCK_ALL, [json.dumps(outs), json.dumps(ids.tolist())], tmp_path, 900)
    assert set(result) == set(FAMILIES)
    for family, got in result.items():
        assert got["refused"], family
        assert got["class"] == "StreamSVDForCausalLM", family
        stock = torch.tensor(got["logits"], dtype=torch.float32)
        scale = float(ours[family].abs().max())
        assert float((stock - ours[family]).abs().max()) <= 1e-5 * scale, family
        assert got["base"] == "StreamSVDModel", family
        stock = torch.tensor(got["hidden"], dtype=torch.float32)
        scale = float(hidden[family].abs().max())
        assert float((stock - hidden[family]).abs().max()) <= 1e-5 * scale, family
