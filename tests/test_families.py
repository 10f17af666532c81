"""Decoder families beyond Llama: checkpoints saved by save_pretrained as real ones are
(hub names, per-expert 2-D weights), read through transformers' own key mapping and weight
conversion; mixtures of experts compressed per expert; mixed sliding/full attention;
GPT-2's Conv1D.

The checkpoints are float64, so that two computations of the same function differ only
by float64 rounding. A model of depth L with width d does O(L·d) dependent multiply-adds
per logit, so rounding moves a logit by about L·d·u·|logit| ≈ 4·128·1.1e-16 ≈ 6e-14 of
its scale; the comparisons allow 1e-9 of it — far above any rounding, far below any
error of substance (a wrongly mapped tensor moves logits by their own size).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from streamsvd import CompressConfig, compress, load_compressed
from streamsvd.calib import stdlib_docstrings
from streamsvd.evaluate import perplexity
from streamsvd.lowrank import export_dense, load_model
from streamsvd.modeling import UnfusedExperts
from streamsvd.synth import write_family

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "gpt_neox", "gemma2", "gpt2"]
MOE = {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"}
REL = 1e-9  # of the logits' scale: see the module docstring
SETTINGS = dict(ratio=0.3, nsamples=8, seqlen=48, batch_size=4, seed=1)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(stdlib_docstrings(40_000))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    made = {}

    def get(family):
        if family not in made:
            made[family] = write_family(family, root / family, dtype=torch.float64)
        return made[family]

    return get


@pytest.fixture(scope="module")
def compressed(checkpoints, calib, tmp_path_factory):
    """Each family compressed once with the default method: (output, summary)."""
    root = tmp_path_factory.mktemp("compressed")
    done = {}

    def get(family):
        if family not in done:
            out = root / family
            cfg = CompressConfig(model=str(checkpoints(family)), out=str(out), calib=str(calib),
                                 **SETTINGS)  # fmt: skip
            done[family] = out, compress(cfg)
        return done[family]

    return get


def ids(n=2, t=40):
    return torch.randint(2, 500, (n, t), generator=torch.Generator().manual_seed(7))


def stock(path, family):
    """Stock transformers' model of a checkpoint, in float64 (its grouped-matmul experts
    take no float64, so mixtures of experts run its eager experts)."""
    extra = {"experts_implementation": "eager"} if family in MOE else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, **extra).eval()


def assert_close(got, want):
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= REL * scale, float((got - want).abs().max())


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_streamsvd_reads_the_checkpoint_as_transformers_does(family, checkpoints):
    """The skeleton streamsvd fills (names mapped and experts split by transformers'
    conversion, experts as per-expert linears) computes what stock transformers computes."""
    path = checkpoints(family)
    ours = load_model(path)
    if family in MOE:
        assert any(isinstance(m, UnfusedExperts) for m in ours.modules())
    assert_close(ours(ids()).logits, stock(path, family)(ids()).logits)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_family_compresses_and_loads_both_ways(family, compressed, tmp_path):
    out, summary = compressed(family)
    # what became low-rank, and what was left as it was, is stated
    assert 0.9 < summary["low_rank_share"] <= 1
    assert summary["linear_params_after"] < 0.8 * summary["linear_params_before"]
    assert not any(n.endswith(("proj.weight", "c_attn.weight", "c_fc.weight"))
                   for n in summary["left_dense"]), summary["left_dense"]  # fmt: skip
    low = load_compressed(out)
    dense_dir = export_dense(out, tmp_path / "dense")
    assert_close(low(ids()).logits, stock(dense_dir, family)(ids()).logits)
    # streamed evaluation of the low-rank output gives the in-memory model's perplexity.
    # transformers computes the loss in float32: a log-softmax over V logits sums V terms,
    # off by at most V·u₃₂ (Higham §3.1), which is the perplexity's relative error too
    windows = ids(3, 32)
    logits = low(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    bound = logits.shape[-1] * torch.finfo(torch.float32).eps / 2
    assert math.isclose(perplexity(out, windows, progress=False), math.exp(float(nll)),
                        rel_tol=bound)  # fmt: skip


@pytest.mark.parametrize("family", sorted(MOE))
def test_experts_are_factorised_with_their_routed_tokens(family, compressed):
    out, summary = compressed(family)
    ranks = json.loads((out / "config.json").read_text())["streamsvd"]["ranks"]
    counts = summary["expert_tokens"]
    config = load_model(out).config
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    experts = experts or config.n_routed_experts
    moe_blocks = {name.rsplit(".", 2)[0] for name in counts}
    assert len(counts) == experts * len(moe_blocks)
    for block in moe_blocks:  # every token goes to top-k experts
        routed = sum(n for name, n in counts.items() if name.startswith(block + "."))
        assert routed == SETTINGS["nsamples"] * SETTINGS["seqlen"] * config.num_experts_per_tok
    for expert in counts:  # each expert's three linears are low-rank
        assert {f"{expert}.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= set(ranks)
    # the router stays dense
    assert any(n.endswith(("mlp.gate.weight", "mlp.router.weight")) for n in summary["left_dense"])


def test_moe_run_resumes_byte_identically(checkpoints, calib, tmp_path):
    """A Qwen3-MoE run SIGKILLed while factorising block 1's experts, then while writing
    block 2's compressed-stream outputs, resumes to the bytes of an uninterrupted run."""
    from test_resume import KILLED, output_hashes

    model = checkpoints("qwen3_moe")
    reference = tmp_path / "reference"
    compress(CompressConfig(model=str(model), out=str(reference), calib=str(calib), **SETTINGS))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "streamsvd.cli", "compress", "--model", str(model),
            "--out", str(out), "--calib", str(calib)]  # fmt: skip
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for fault in ("svd:1", "comp-activations:2"):
        result = subprocess.run(args, env={**env, "STREAMSVD_FAULT": fault},
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == KILLED, f"{fault} never fired:\n{result.stderr[-3000:]}"
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at block 3/4" in result.stderr
    assert output_hashes(out) == output_hashes(reference)


def test_weights_it_cannot_factorise_are_refused_at_once(checkpoints, calib, tmp_path,
                                                         monkeypatch):  # fmt: skip
    """Experts whose fused layout transformers does not describe would be skipped in
    silence: the run refuses before it starts, naming the weight, and writes nothing."""
    import streamsvd.model as model_module
    from streamsvd.errors import StreamSVDError

    monkeypatch.setattr(model_module, "unfuse_experts", lambda model: {})  # as if unknown
    out = tmp_path / "out"
    cfg = CompressConfig(model=str(checkpoints("mixtral")), out=str(out), calib=str(calib),
                         **SETTINGS)  # fmt: skip
    with pytest.raises(StreamSVDError, match=r"mlp\.experts\.gate_up_proj, a 3-D weight"):
        compress(cfg)
    assert not out.exists() and not (tmp_path / "out.work").exists()


@torch.no_grad()
def test_an_expert_without_tokens_gets_the_plain_truncated_svd(calib, tmp_path):
    """With 2 calibration tokens, top-1 routing and 8 experts, most experts see no token:
    they have no statistics, are factorised by W's own truncated SVD (the best rank-r
    approximation of W, Eckart–Young), and the summary names them."""
    model = write_family("qwen3_moe", tmp_path / "model", dtype=torch.float64, layers=2,
                         num_experts=8, num_experts_per_tok=1)  # fmt: skip
    out = tmp_path / "out"
    summary = compress(CompressConfig(model=str(model), out=str(out), calib=str(calib),
                                      ratio=0.3, nsamples=1, seqlen=2, batch_size=1,
                                      allow_few_tokens=True))  # fmt: skip
    idle = summary["experts_without_tokens"]
    assert len(idle) >= 2 * (8 - 2)  # two blocks, at most two experts used in each
    assert all(summary["expert_tokens"][e] == 0 for e in idle)
    original, low = load_model(model), load_compressed(out)
    for expert in idle[:3]:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            W = original.get_submodule(f"{expert}.{proj}").weight
            layer = low.get_submodule(f"{expert}.{proj}")
            U, s, Vh = torch.linalg.svd(W, full_matrices=False)
            r = layer.rank
            best = (U[:, :r] * s[:r]) @ Vh[:r]
            # two float64 SVDs of the same W agree to about k·u·σ₁ per entry
            tol = 64 * W.shape[1] * torch.finfo(torch.float64).eps * float(s[0])
            assert float((layer.dense_weight() - best).abs().max()) <= tol


def test_the_plan_counts_each_experts_statistics(checkpoints):
    """Each expert reads its own tokens, so each has its own sums: the plan, which finds
    the groups by running a block on `meta`, must see one group per expert input."""
    from streamsvd.model import build_skeleton, find_blocks, input_groups, load_config

    model = build_skeleton(load_config(checkpoints("mixtral")), torch.float64)
    _, blocks = find_blocks(model)
    groups = input_groups(model, blocks[0], 0.3)
    experts = [g for g in groups if ".experts." in g[0]]
    assert sorted(experts) == sorted(
        [[f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj"] for e in range(4)]
        + [[f"mlp.experts.{e}.down_proj"] for e in range(4)]
    )


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_moe_compresses_with_allocation_and_sequential(family, checkpoints, calib, compressed,
                                                       tmp_path):  # fmt: skip
    """Experts through the spectra pass (one spectrum per expert linear) and through
    sequential stages (all experts of a kind in one stage): the routed token counts are
    the same as the default run's, the budget is the uniform run's, the ranks are the
    allocation's own, and the output loads."""
    out = tmp_path / "out"
    cfg = CompressConfig(model=str(checkpoints(family)), out=str(out), calib=str(calib),
                         allocation="residual", sequential=True, **SETTINGS)  # fmt: skip
    summary = compress(cfg)
    _, default = compressed(family)
    assert summary["expert_tokens"] == default["expert_tokens"]
    widest = max(m + n for m, n in (shape_of(out, name) for name in ranks_of(out)))
    spent = summary["linear_params_after"]
    assert default["linear_params_after"] - widest < spent <= default["linear_params_after"]
    assert ranks_of(out) != ranks_of(compressed(family)[0])
    assert torch.isfinite(load_model(out)(ids()).logits).all()


def ranks_of(out: Path) -> dict[str, int]:
    return json.loads((out / "config.json").read_text())["streamsvd"]["ranks"]


def shape_of(out: Path, name: str) -> tuple[int, int]:
    """(m, n) of a factorised linear from its two factors' shapes in the output."""
    from streamsvd.checkpoint import CheckpointReader

    shapes = CheckpointReader(out).shapes()
    return shapes[f"{name}.up.weight"][0], shapes[f"{name}.down.weight"][1]
