"""benchmarks/gpu_check.py, the script a lent GPU runs, in its --dry mode: the same steps
on the CPU at tiny widths. A GPU is lent for minutes, so the script must not find its
bugs there: every step runs here and reports every section the issue asks for."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_reports_every_section(tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--dry", "--results",
         str(results), "--work", str(work)],
        capture_output=True, text=True, timeout=2400, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((results / "gpu_check.json").read_text())
    assert result["dry"] and result["device"] == "CPU (dry run)"

    # both widths finished (7B also with bf16 refinement), each timed by stage, its peaks
    # beside the plan's, projected
    assert [row["shape"] for row in result["scale"]] == ["7b", "70b", "7b"]
    assert result["scale"][2]["variant"] == "--refine-precision bfloat16"
    for row, depth in zip(result["scale"], (32, 80, 32), strict=True):
        assert row["finished"], row
        assert len(row["block_seconds"]) == 2
        for block in row["block_seconds"]:
            stages = {k: v for k, v in block.items() if k not in ("block", "total")}
            assert {"forward", "stats", "refine"} <= set(stages)
            assert sum(stages.values()) <= block["total"] + 0.01 * len(stages)  # rounding
        # every measured phase beside its planned peak (the plan also has setup, write, ...)
        assert row["phase_peaks"] and set(row["phase_peaks"]) <= set(row["plan"]["host_phases_mb"])
        projected = row["projection"]
        assert projected["depth"] == depth
        recomputed = projected["seconds_per_block"] * depth + projected["fixed_seconds"]
        # each figure rounded: per block and fixed to 0.01 s, the projection to 0.1 s
        assert abs(projected["projected_seconds"] - recomputed) <= 0.005 * (depth + 1) + 0.05
        assert 0 <= projected["non_compute_share"] <= 1

    # CPU against CPU: the same bytes, so the same ranks and the same error
    first, second = result["equivalence"]
    assert first["finished"] and second["finished"]
    assert second["ranks_agree"]
    assert first["logit_error"] == second["logit_error"]

    if importlib.util.find_spec("vllm") is None:
        assert result["vllm"] == {"status": "not installed"}
    assert result["factorise"] and result["probe"]

    md = (results / "gpu_check.md").read_text()
    for heading in ["## 7B width", "## 70B width", "### Time per block by stage",
                    "### Peaks against the plan", "### Projected whole model",
                    "## CPU against CPU (dry run)", "## vLLM, Transformers backend",
                    "## Factorise", "## The speed probe"]:  # fmt: skip
        assert heading in md, heading
    assert md.count("### Projected whole model") == 3
    assert "the defaults, `--refine-precision bfloat16`" in md
    assert "Status: not installed." in md or importlib.util.find_spec("vllm") is not None


def test_a_compress_cut_short_still_reports_the_blocks_it_finished(tmp_path, monkeypatch):
    """A scale step whose compress dies before its second block (killed by fault injection,
    as a timeout kills it): the step is unfinished, but keeps the first block's seconds
    from the run's log and projects the model's blocks from them; the markdown says so."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    monkeypatch.setenv("STREAMSVD_FAULT", "between:1")  # SIGKILL before block 1 is loaded
    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    work.mkdir()
    check = gpu_check.Check(results, work, dry=True, budget=4 * 450)
    row = gpu_check.scale_step(check, "7b")
    assert not row["finished"] and "exit status" in row["stopped"]
    [seconds] = row["logged_block_seconds"]  # block 0 alone
    assert seconds > 0
    assert row["projected_block_seconds"] == round(seconds * 32, 1)
    md = "\n".join(gpu_check.scale_lines(row))
    assert "Not finished: failed with exit status" in md
    assert f"Blocks it finished, seconds each (its log): {seconds};" in md
