"""Runs with rank allocation (a spectra pass, then compression) and with within-block
sequential statistics: the budget met, kills in either pass resumed to identical bytes,
the peak memory of one pass, and the stage order a block is compressed in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from safetensors.torch import load_file
from test_resume import output_hashes
from test_scale import PLAN_SHAPE

from streamsvd import CompressConfig, compress, load_compressed
from streamsvd.allocate import Matrix as AllocMatrix
from streamsvd.allocate import rank_bounds
from streamsvd.factorize import rank_for
from streamsvd.model import (
    build_skeleton,
    factorised_linears,
    find_blocks,
    input_groups,
    load_config,
    sequential_stages,
)
from streamsvd.synth import synthesize

LAYERS = 3
# the closed form: these tests are about ranks and statistics (refinement: test_refine.py)
SETTINGS = dict(nsamples=8, seqlen=32, batch_size=4, ratio=0.3, seed=3, device="cpu",
                refine_epochs=0)  # fmt: skip
KILLED = -9


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-block checkpoint and a calibration text; one thread, as the subprocesses use."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("two_pass")
    model = write_checkpoint(root / "model", tiny_config(layers=LAYERS))
    calib = root / "calib.txt"
    from streamsvd.calib import stdlib_docstrings

    calib.write_text(stdlib_docstrings(40_000))
    yield model, calib, root
    torch.set_num_threads(before)


def config(model, calib, out, **changes) -> CompressConfig:
    return CompressConfig(model=str(model), out=str(out), calib=str(calib),
                          **{**SETTINGS, **changes})  # fmt: skip


def output_ranks(out: Path) -> dict[str, int]:
    return json.loads((out / "config.json").read_text())["streamsvd"]["ranks"]


def shapes_of(model: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every block linear, full names, from the skeleton."""
    skeleton = build_skeleton(load_config(str(model)), torch.float32)
    prefix, blocks = find_blocks(skeleton)
    return {
        f"{prefix}.{i}.{name}": tuple(linear.weight.shape)
        for i, block in enumerate(blocks)
        for name, linear in factorised_linears(block, SETTINGS["ratio"]).items()
    }


@pytest.mark.parametrize("allocation", ["grouped", "residual"])
def test_allocated_run_spends_the_uniform_budget_with_its_own_ranks(setup, allocation):
    model, calib, root = setup
    out = root / f"out-{allocation}"
    summary = compress(config(model, calib, out, allocation=allocation))
    ranks, shapes = output_ranks(out), shapes_of(model)
    assert set(ranks) == set(shapes)
    ratio = SETTINGS["ratio"]
    uniform = {name: rank_for(*shape, ratio) for name, shape in shapes.items()}
    target = sum(uniform[n] * sum(s) for n, s in shapes.items())
    spent = sum(ranks[n] * sum(s) for n, s in shapes.items())
    assert target - max(sum(s) for s in shapes.values()) < spent <= target
    assert ranks != uniform  # spectra differ, and so do the ranks
    for name, shape in shapes.items():
        low, high = rank_bounds(AllocMatrix(name, shape), ratio)
        assert 1 <= low <= ranks[name] <= high
    assert summary["allocation"] == allocation
    model_out = load_compressed(out)
    logits = model_out(torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all()


def run_cli(model, calib, out, fault=None, *more) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("STREAMSVD_FAULT", None)
    if fault:
        env["STREAMSVD_FAULT"] = fault
    args = [sys.executable, "-m", "streamsvd.cli", "compress", "--model", str(model),
            "--out", str(out), "--calib", str(calib), *more]  # fmt: skip
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def test_two_pass_run_killed_in_either_pass_resumes_to_identical_bytes(setup):
    model, calib, root = setup
    reference = root / "reference"
    compress(config(model, calib, reference, allocation="grouped"))
    out = root / "killed"
    work = Path(f"{out}.work")
    for fault, journaled in [
        ("activations:1", {"spectra.inputs", "spectra.0"}),  # spectra pass, mid-stream
        ("spectra-write:2", {"spectra.inputs", "spectra.0", "spectra.1"}),  # file half done
    ]:
        journaled |= {"checkpoint"}  # the shards' stats the run began with (sources.py)
        result = run_cli(model, calib, out, fault, "--allocation", "grouped")
        assert result.returncode == KILLED, f"{fault}:\n{result.stderr[-2000:]}"
        stages = set(json.loads((work / "journal.json").read_text())["stages"])
        assert stages == journaled, fault
    result = run_cli(model, calib, out, None, "--allocation", "grouped")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "spectra pass for the grouped allocation: block 3/3" in result.stderr
    assert output_hashes(out) == output_hashes(reference)
    # and a kill in pass 2 resumes without redoing pass 1, from the journaled allocation:
    # even with the spectra files gone, pass 1 never runs again to rewrite the stored
    # inputs that the resume has verified
    out2 = root / "killed2"
    result = run_cli(model, calib, out2, "svd:1", "--allocation", "grouped")
    assert result.returncode == KILLED
    work2 = Path(f"{out2}.work")
    journaled = json.loads((work2 / "journal.json").read_text())["stages"]
    assert journaled["allocation"]["ranks"] == output_ranks(reference)
    assert list(journaled).index("allocation") < list(journaled).index("inputs")
    shutil.rmtree(work2 / "spectra")
    result = run_cli(model, calib, out2, None, "--allocation", "grouped")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Spectra" not in result.stderr and "spectra pass" not in result.stderr
    assert output_hashes(out2) == output_hashes(reference)


def test_a_changed_allocation_is_refused_on_resume(setup):
    model, calib, root = setup
    out = root / "changed"
    assert run_cli(model, calib, out, "svd:0", "--allocation", "grouped").returncode == KILLED
    result = run_cli(model, calib, out, None, "--allocation", "residual")
    assert result.returncode == 2 and "allocation" in result.stderr


def test_allocation_needs_a_calibrated_method(setup):
    model, calib, root = setup
    result = run_cli(model, calib, root / "plain", None, "--allocation", "grouped",
                     "--method", "svd")  # fmt: skip
    assert result.returncode == 2 and "--allocation uniform" in result.stderr
    assert not (root / "plain").exists() and not (root / "plain.work").exists()


def test_two_pass_peak_memory_is_the_one_pass_runs(tmp_path, small_calib_text):
    """Each run in its own process, on a shape where one block's statistics and
    factorisation are a third of the peak: the spectra pass holds less than compression
    (one stream's Grams, no factors), so the peak is the compression pass's."""
    ckpt = synthesize(tmp_path / "model", PLAN_SHAPE, 2, dtype=torch.float32)
    peaks = {}
    for allocation in ("uniform", "grouped"):
        out, summary = tmp_path / allocation, tmp_path / f"{allocation}.json"
        cli = [sys.executable, "-m", "streamsvd.cli", "-q", "compress", "--model", str(ckpt),
               "--out", str(out), "--ratio", "0.3", "--nsamples", "8", "--seqlen", "64",
               "--batch-size", "4", "--device", "cpu", "--calib", str(small_calib_text),
               "--allocation", allocation, "--summary-json", str(summary),
               "--allow-few-tokens"]  # memory, not quality  # fmt: skip
        run = subprocess.run(cli, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[allocation] = json.loads(summary.read_text())["peak_rss_mb"]
    assert peaks["grouped"] == pytest.approx(peaks["uniform"], rel=0.10)


# -- within-block sequential statistics ------------------------------------------------


def test_sequential_stages_follow_the_blocks_computation(tmp_path):
    llama = write_checkpoint(tmp_path / "llama", tiny_config(layers=1))
    skeleton = build_skeleton(load_config(str(llama)), torch.float32)
    _, blocks = find_blocks(skeleton)
    names = list(factorised_linears(blocks[0], 0.3))
    stages = sequential_stages(names, input_groups(skeleton, blocks[0], 0.3))
    assert stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_sequential_stages_put_all_experts_of_a_kind_together():
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj"]
    names += [f"mlp.experts.{e}.{k}" for e in range(3) for k in ("gate_proj", "down_proj")]
    groups = [["self_attn.q_proj", "self_attn.k_proj"], ["self_attn.o_proj"]]
    groups += [[f"mlp.experts.{e}.{k}"] for e in range(3) for k in ("gate_proj", "down_proj")]
    assert sequential_stages(names, groups) == [
        ["self_attn.q_proj", "self_attn.k_proj"],
        ["self_attn.o_proj"],
        [f"mlp.experts.{e}.gate_proj" for e in range(3)],
        [f"mlp.experts.{e}.down_proj" for e in range(3)],
    ]


def test_sequential_statistics_change_only_the_later_stages(setup):
    """q/k/v read the block's input, which no stage of the block changes: their factors are
    the same bytes either way. o_proj's inputs come after q/k/v are compressed: its
    factors differ. Both runs are deterministic and load."""
    model, calib, root = setup
    together, sequential = root / "together", root / "sequential"
    compress(config(model, calib, together, sequential=False))
    compress(config(model, calib, sequential, sequential=True))
    a = {k: v for f in sorted(together.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(sequential.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys()
    first = [k for k in a if ".layers.0.self_attn.q_proj" in k or ".layers.0.self_attn.v_proj" in k]
    assert first and all(torch.equal(a[k], b[k]) for k in first)
    later = [k for k in a if ".layers.0.self_attn.o_proj.up" in k or ".layers.0.mlp.down_proj" in k]
    assert later and not any(torch.equal(a[k], b[k]) for k in later)
    again = root / "sequential-again"
    compress(config(model, calib, again, sequential=True))
    assert output_hashes(again) == output_hashes(sequential)
    assert torch.isfinite(load_compressed(sequential)(torch.arange(16)[None]).logits).all()
