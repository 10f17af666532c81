"""The plan's time per block against a measured run: flops alone (the plan until now) and
with what is not flops (elementwise passes and activation I/O, streamsvd/speed.py).

For each model: the rates of this machine measured once (speed.measure_speed and
measure_store, as --dry-run measures them), both estimates from them, then the compress run
itself (its own process, the CLI), whose summary gives the measured seconds per stage per
block (mean over blocks).

    .venv/bin/python benchmarks/plan_time.py                 # synthetic 128-wide, SmolLM2

Writes benchmarks/results/plan_time.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from streamsvd.checkpoint import CheckpointReader  # noqa: E402
from streamsvd.default_model import default_model_path  # noqa: E402
from streamsvd.model import build_skeleton, compute_dtype, find_blocks, load_config  # noqa: E402
from streamsvd.pipeline import CompressConfig  # noqa: E402
from streamsvd.plan import input_groups, linear_plans  # noqa: E402
from streamsvd.speed import block_seconds, measure_speed, measure_store  # noqa: E402

STAGES = ("forward", "stats", "activations", "cholesky", "svd", "update")


def estimates(cfg: CompressConfig) -> dict:
    config = load_config(cfg.model)
    compute = compute_dtype(cfg.compute_dtype, CheckpointReader(cfg.model).dtype())
    model = build_skeleton(config, compute)
    _, blocks = find_blocks(model)
    linears = linear_plans(blocks[0], cfg.ratio)
    groups = input_groups(model, blocks[0], cfg.ratio)
    text = config.get_text_config()
    width = max(lp.shape[1] for lp in linears)
    rates = measure_speed(cfg.device, compute, cfg.method, width)
    tmp = Path(tempfile.mkdtemp())
    rates |= measure_store(tmp, cfg.seqlen, text.hidden_size, compute)
    shutil.rmtree(tmp)
    flops_only = {k: v for k, v in rates.items() if k not in ("elementwise", "store_read",
                                                              "store_write")}  # fmt: skip
    return {"flops": block_seconds(cfg, text, linears, groups, flops_only),
            "full": block_seconds(cfg, text, linears, groups, rates),
            "rates": {k: v for k, v in rates.items() if k != "device_name"}}  # fmt: skip


def measured(cfg: CompressConfig, threads: int) -> dict:
    summary = Path(cfg.out).with_suffix(".json")
    subprocess.run([sys.executable, "-m", "streamsvd", "-q", "compress", "--model", cfg.model,
                    "--out", cfg.out, "--calib", cfg.calib or "", "--nsamples",
                    str(cfg.nsamples), "--seqlen", str(cfg.seqlen), "--ratio", str(cfg.ratio),
                    "--device", "cpu", "--threads", str(threads), "--summary-json",
                    str(summary)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
    blocks = json.loads(summary.read_text())["block_seconds"]
    mean = {k: sum(b.get(k, 0.0) for b in blocks) / len(blocks) for k in (*STAGES, "total")}
    shutil.rmtree(cfg.out)
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/wikitext-2")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="streamsvd-plantime-"))
    synth = tmp / "synth128"
    subprocess.run([sys.executable, "-m", "streamsvd", "-q", "synth", "--shape", "tiny",
                    "--layers", "4", "--out", str(synth), "--dtype", "fp32"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    calib = str(args.data_dir / "valid.txt")
    cases = {
        "synthetic 128-wide, 4 blocks, 64×512": CompressConfig(
            model=str(synth), out=str(tmp / "o1"), calib=calib, ratio=0.4),
        "SmolLM2-135M, 30 blocks, 16×512": CompressConfig(
            model=str(default_model_path()), out=str(tmp / "o2"), calib=calib, nsamples=16,
            ratio=0.4),
    }  # fmt: skip
    rows = []
    for name, cfg in cases.items():
        est = estimates(cfg)
        rows.append({"case": name, **est, "measured": measured(cfg, threads)})
        print(json.dumps(rows[-1]["measured"]), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    result = {"command": "python benchmarks/plan_time.py", "threads": threads, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "plan_time.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# The plan's time per block against measured runs",
        "",
        f"Command: `{result['command']}` (CPU, {threads} threads, svdllm-a at 0.4, calibration "
        "from WikiText-2 valid.txt). Seconds per block: the plan from flops alone (as until "
        "now), the plan with elementwise passes and activation I/O (now), and the run's mean.",
        "",
        "| case | stage | plan, flops only | plan, now | measured |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for stage in (*STAGES, "total"):
            a, b = r["flops"].get(stage, 0.0), r["full"].get(stage, 0.0)
            lines.append(f"| {r['case']} | {stage} | {a:.2f} | {b:.2f} | "
                         f"{r['measured'][stage]:.2f} |")  # fmt: skip
    (args.results / "plan_time.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
