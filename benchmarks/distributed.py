"""Scaling on torch.distributed: the same compress run on 1 and N processes (torchrun),
wall time per stage, speed-up, the share of wall time spent communicating, peak RSS per
process, and the output's P1 perplexity (../shared/BENCHMARKS.md) beside one process's.

    .venv/bin/python benchmarks/distributed.py                      # CPU: 1 and 2 processes
    .venv/bin/python benchmarks/distributed.py --device cuda --processes 1 2 4

On CPU each process takes its share of the usable cores (1 process: all of them), so
speed-up compares the same machine used whole both ways. "communicate" is time inside
collectives, waiting for the slowest rank included. Writes
benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

ROOT = common.ROOT

STAGES = ("load", "forward", "activations", "stats", "cholesky", "svd", "update", "refine",
          "write", "communicate")  # fmt: skip


def compress(processes: int, args, out: Path) -> dict:
    summary = out.with_suffix(".json")
    launcher = [sys.executable, "-m", "streamsvd"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "-m", "streamsvd"]  # fmt: skip
    command = launcher + ["-q", "compress", "--model", str(args.model), "--out", str(out),
                          "--calib", str(args.data_dir / "valid.txt"), "--nsamples",
                          str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0",
                          "--ratio", str(args.ratio), "--device", args.device,
                          "--summary-json", str(summary), *args.extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    result = json.loads(summary.read_text())
    per = result.get("per_process", [result])
    return {
        "processes": processes,
        "wall_s": round(wall, 1),  # process start-up included
        "run_s": result["seconds"],
        # rank 0's stages; the others' are in per_process
        "stage_s": {k: result["stage_seconds"].get(k, 0.0) for k in STAGES},
        "communicate_share": round(
            result["stage_seconds"].get("communicate", 0.0) / result["seconds"], 3
        ),  # fmt: skip
        "peak_rss_mb": [p["peak_rss_mb"] for p in per],
        "command": " ".join(command[1:]).replace(str(out.parent), "$TMP"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--nsamples", type=int, default=64, help="P1's 64 by default")
    ap.add_argument("--seqlen", type=int, default=512, help="P1's 512 by default")
    ap.add_argument("--model", type=Path, default=None, help="default: SmolLM2-135M (P1)")
    ap.add_argument("--data-dir", type=Path, default=common.DATA_DIR)
    ap.add_argument("--no-score", action="store_true", help="skip P1 perplexity")
    ap.add_argument("--extra", nargs="*", default=[], help="more compress options")
    ap.add_argument("--name", default="distributed")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    args.model = args.model or common.smollm2()
    tmp = Path(tempfile.mkdtemp(prefix="streamsvd-dist-"))
    rows = []
    try:
        for processes in args.processes:
            out = tmp / f"out{processes}"
            row = compress(processes, args, out)
            if not args.no_score:
                p1 = common.protocol("p1", args.data_dir)
                row["perplexity"] = common.score_in_process(out, p1)
            shutil.rmtree(out)
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(args, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(args, rows: list[dict]) -> None:
    base = next((r for r in rows if r["processes"] == 1), rows[0])
    result = {
        "model": str(args.model),
        "device": args.device,
        "cores": len(os.sched_getaffinity(0)),
        "ratio": args.ratio,
        "nsamples": args.nsamples,
        "command": common.command_line("distributed.py"),
        "rows": rows,
    }
    lines = [
        f"# Scaling on torch.distributed: {Path(args.model).name}, ratio {args.ratio}, "
        f"{args.nsamples}×{args.seqlen} calibration windows of WikiText-2 valid.txt, {args.device}",
        "",
        f"Command: `{result['command']}` ({result['cores']} usable cores; each process takes "
        "its share of them). Times in seconds; stages are rank 0's, `communicate` is time in "
        "collectives including waits for the slowest rank. Perplexity: P1.",
        "",
        "| processes | run (s) | speed-up | " + " | ".join(STAGES) + " | communicating "
        "| peak RSS per process (MiB) | P1 perplexity |",
        "|---" * (len(STAGES) + 6) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['run_s']:.0f} | {base['run_s'] / r['run_s']:.2f}× | "
            + " | ".join(f"{r['stage_s'][k]:.1f}" for k in STAGES)
            + f" | {r['communicate_share']:.1%} | "
            + ", ".join(f"{m:.0f}" for m in r["peak_rss_mb"])
            + (f" | {r['perplexity']:.2f} |" if "perplexity" in r else " | – |")
        )
    common.save(args.results, args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
