"""The quality benchmarks run end to end (benchmarks/common.py's compress-and-score runner,
through each script's own command line), on a tiny random checkpoint instead of SmolLM2 so
that a benchmark that rots fails here rather than at its next hour-long rerun."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamsvd.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"

sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py)

pytestmark = pytest.mark.skipif(
    not (DATA / "valid.txt").exists(), reason=f"WikiText-2 not found at {DATA}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-block Llama of synth's `tiny` shape (512 positions: the protocols' windows)."""
    return synthesize(tmp_path_factory.mktemp("bench") / "tiny", "tiny", dtype=torch.float32)


def run(script: str, *options: str) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / script), *options]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"


def test_a_score_in_its_own_process_equals_the_score_in_this_one(tiny):
    proto = common.protocol("heldout", DATA, tiny.parent)
    here = common.score(tiny, proto)
    there = common.score_in_process(tiny, proto)
    assert math.isfinite(here) and here > 1
    # float32 log-likelihoods summed over 48×512 tokens; the two processes may use
    # different thread counts, so sums may associate differently: a few float32 ulps
    assert there == pytest.approx(here, rel=1e-5)


def test_refine_cells_give_rows_that_score_the_compressed_model(tiny, tmp_path):
    run("refine.py", "--model", str(tiny), "--data-dir", str(DATA), "--results", str(tmp_path),
        "--cells", "0.4:0:0", "0.4:1:1e-3:b2")  # fmt: skip
    result = json.loads((tmp_path / "refine_heldout.json").read_text())
    original, closed, refined = result["rows"]
    assert original["method"] == "original"
    assert (closed["epochs"], refined["epochs"]) == (0, 1)
    for row in (closed, refined):
        assert math.isfinite(row["perplexity"]) and row["perplexity"] != original["perplexity"]
        assert "--ratio 0.4" in row["command"] and "$TMP/out" in row["command"]
    assert "--refine-batch 2" in refined["command"]
    table = (tmp_path / "refine_heldout.md").read_text()
    assert f"{refined['perplexity']:.2f}" in table and "held out" in table


def test_a_bf16_refine_cell_runs_through_the_emulation(tiny, tmp_path):
    """A `bf16` cell compresses with --refine-precision bfloat16 through
    benchmarks/bf16_emulation.py, which multiplies on bf16-rounded values: not the bytes of
    float32 refinement, whose cell scores otherwise."""
    run("refine.py", "--model", str(tiny), "--data-dir", str(DATA), "--results", str(tmp_path),
        "--cells", "0.4:1:1e-3:b2", "0.4:1:1e-3:b2:bf16", "--no-original")  # fmt: skip
    fp32, bf16 = json.loads((tmp_path / "refine_heldout.json").read_text())["rows"]
    assert bf16["precision"] == "bfloat16" and "precision" not in fp32
    assert "--refine-precision bfloat16" in bf16["command"]
    assert math.isfinite(bf16["perplexity"]) and bf16["perplexity"] != fp32["perplexity"]
    assert "| bfloat16 |" in (tmp_path / "refine_heldout.md").read_text()


def test_allocation_and_quality_p1_write_their_tables(tiny, tmp_path):
    run("allocation.py", "--model", str(tiny), "--data-dir", str(DATA), "--results",
        str(tmp_path), "--allocations", "uniform", "--sequential", "no")  # fmt: skip
    rows = json.loads((tmp_path / "allocation_heldout.json").read_text())["rows"]
    assert [r["allocation"] for r in rows] == ["original", "uniform"]
    assert math.isfinite(rows[1]["perplexity"])
    run("quality_p1.py", "--model", str(tiny), "--data-dir", str(DATA), "--results",
        str(tmp_path), "--methods", "svd", "--ratios", "0.4", "--nsamples", "8", "--windows",
        "4")  # fmt: skip
    result = json.loads((tmp_path / "quality_p1.json").read_text())
    assert result["protocol"].startswith("P1 variant: 8 calibration windows, 4 eval windows")
    assert [r["method"] for r in result["rows"]] == ["original", "svd"]
    assert "--nsamples 8" in result["rows"][1]["command"]
