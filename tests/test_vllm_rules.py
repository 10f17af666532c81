"""A low-rank output against the rules vLLM's Transformers backend documents for a custom
model (`LLM(model=OUT, model_impl="transformers", trust_remote_code=True)`; the rules and
their source: docs/models.md#vllm). vLLM needs a GPU and is not installed here, so each
rule is checked the way the backend applies it, in a process that cannot import
streamsvd:

1. config.json's `auto_map` names `AutoConfig` first and `AutoModel` (and keeps
   `AutoModelForCausalLM`); each entry resolves, through transformers' dynamic module
   loading from the output folder, to an importable class (vLLM's
   `_try_resolve_transformers` loads them so).
2. The customisation is in the base model: `AutoModel.from_config` on `meta` (how the
   backend builds it) and `AutoModel.from_pretrained` both give the base model with a
   LowRankLinear of the recorded rank at every factorised layer; and it declares
   `_supports_attention_backend` (`is_backend_compatible()`, which vLLM checks).
3. Attention goes through transformers' attention interface: with an attention function
   registered in `AttentionInterface` and named in `config._attn_implementation` (as the
   backend does with its "vllm" function), every decoder layer's attention calls it, is
   causal, and receives a keyword argument given to the base model's forward (the backend
   passes its `attention_instances` so); the hidden states are sdpa's and eager's.
4. A mixture of experts: the sparse block's `experts` is an nn.ModuleList whose forward
   takes (hidden_states, top_k_index, top_k_weights).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_remote_code import run_stock

from streamsvd import CompressConfig, compress
from streamsvd.synth import write_family

AS_VLLM_LOADS = r"""
import inspect, json, sys
sys.modules["streamsvd"] = None  # as where streamsvd is not installed
import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

path, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
auto_map = json.load(open(f"{path}/config.json"))["auto_map"]
classes = {key: get_class_from_dynamic_module(ref, path) for key, ref in auto_map.items()}
LowRankLinear = sys.modules[classes["AutoModel"].__module__].LowRankLinear

def low_rank(model):
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}

calls = []
def probe(module, query, key, value, attention_mask, **kwargs):
    calls.append({"layer": module.layer_idx, "is_causal": module.is_causal,
                  "marker": kwargs.get("streamsvd_marker")})
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
AttentionInterface.register("streamsvd_probe", probe)
AttentionMaskInterface.register("streamsvd_probe", sdpa_mask)

config = AutoConfig.from_pretrained(path, trust_remote_code=True)
with torch.device("meta"):
    skeleton = AutoModel.from_config(config, trust_remote_code=True)
hidden = {}
for impl in ("sdpa", "eager", "streamsvd_probe"):
    base = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float64,
                                     attn_implementation=impl).eval()
    with torch.no_grad():
        hidden[impl] = base(ids, use_cache=False, return_dict=False,
                            streamsvd_marker="passed")[0]
experts = [(type(m).__mro__[1].__name__, isinstance(m.experts, nn.ModuleList),
            list(inspect.signature(m.experts.forward).parameters))
           for m in base.modules() if hasattr(m, "experts")]
print("\nRESULT", json.dumps({
    "auto_map": list(auto_map), "classes": {k: c.__name__ for k, c in classes.items()},
    "backend_compatible": classes["AutoModel"].is_backend_compatible(),
    "base": type(base).__name__, "skeleton_low_rank": low_rank(skeleton),
    "low_rank": low_rank(base), "calls": calls, "layers": config.num_hidden_layers,
    "experts": experts, "hidden": {k: v.tolist() for k, v in hidden.items()},
}))
"""


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_output_meets_vllm_transformers_backend_rules(family, small_calib_text, tmp_path):
    model = write_family(family, tmp_path / "model", dtype=torch.float64, layers=2)
    out = tmp_path / "out"
    compress(CompressConfig(model=str(model), out=str(out), calib=str(small_calib_text), ratio=0.3,
                            nsamples=8, seqlen=32, batch_size=4))  # fmt: skip
    ids = torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    got, _ = run_stock(AS_VLLM_LOADS, [str(out), json.dumps(ids.tolist())], tmp_path, 300)

    # 1. auto_map: AutoConfig first, AutoModel before the task class; all importable
    assert got["auto_map"] == ["AutoConfig", "AutoModel", "AutoModelForCausalLM"]
    assert got["classes"] == {"AutoConfig": "StreamSVDConfig", "AutoModel": "StreamSVDModel",
                              "AutoModelForCausalLM": "StreamSVDForCausalLM"}  # fmt: skip
    # 2. the base model holds every factorised layer, at its rank, built either way
    config = json.loads((out / "config.json").read_text())
    prefix = "model."  # both families' base_model_prefix
    recorded = {name.removeprefix(prefix): r for name, r in config["streamsvd"]["ranks"].items()}
    assert recorded and all(name.startswith("layers.") for name in recorded)
    assert got["base"] == "StreamSVDModel"
    assert got["low_rank"] == recorded
    assert got["skeleton_low_rank"] == recorded
    assert got["backend_compatible"] is True
    # 3. each layer's attention through the registered function, causal, kwargs passed down
    layers = got["layers"]
    assert sorted(c["layer"] for c in got["calls"]) == list(range(layers))
    assert all(c["is_causal"] is True and c["marker"] == "passed" for c in got["calls"])
    hidden = {k: torch.tensor(v, dtype=torch.float64) for k, v in got["hidden"].items()}
    scale = float(hidden["sdpa"].abs().max())
    error = {k: float((v - hidden["sdpa"]).abs().max()) / scale for k, v in hidden.items()}
    assert error["streamsvd_probe"] <= 1e-12  # sdpa itself, called through the interface
    # eager's softmax runs in float32 (eager_attention_forward): float32 roundings, 2^-24
    # each, over 2 layers of attention; the bound is 64 of them
    assert error["eager"] <= 64 * torch.finfo(torch.float32).eps / 2
    # 4. experts: an nn.ModuleList called as transformers' experts modules are
    if family == "qwen3_moe":
        assert len(got["experts"]) == layers
        for _, is_module_list, params in got["experts"]:
            assert is_module_list
            assert params == ["hidden_states", "top_k_index", "top_k_weights"]
    else:
        assert got["experts"] == []
