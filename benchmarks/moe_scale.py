"""Mixtures of experts at real widths: what the plan says one block of a Mixtral-8x7B
(47B) and of a Qwen3-30B-A3B shape needs, on CPU and on a 24 GiB GPU, and a measured
one-block run against the plan.

    .venv/bin/python benchmarks/moe_scale.py                    # plans, then 30b-a3b:1
    .venv/bin/python benchmarks/moe_scale.py --measure 8x7b:1   # 2 h on a 2-core CPU

Same settings and method as benchmarks/scale.py (svdllm-a, ratio 0.2; plans at the
compress defaults of 64×512 calibration, batch 8; measured runs with a small calibration,
--nsamples × --seqlen, since the sums that set the memory do not depend on it). Every
expert's statistics are its own, so a block holds the sums of all its experts at once:
that, not the width, is what a mixture of experts adds. Writes
benchmarks/results/moe_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys

from scale import RESULTS, RUNS, GiB, measure, plan_cfg

from streamsvd.plan import make_plan, measure_baseline
from streamsvd.synth import SHAPES, synthesize

SHAPE_NAMES = ["8x7b", "30b-a3b"]


def plans() -> list[dict]:
    rows = []
    for name in SHAPE_NAMES:
        ckpt = RUNS / f"scale-shapes-{name}"
        if not ckpt.exists():
            synthesize(ckpt, name, SHAPES[name].layers, values=False)
        cpu = plan_cfg(ckpt, "cpu")
        fixed = measure_baseline(cpu)
        on_cpu = make_plan(cpu, fixed, timing=True)
        on_gpu = make_plan(plan_cfg(ckpt, "cuda"), fixed, device_memory=24 * GiB, timing=False)
        rows.append({
            "shape": name, "source": SHAPES[name].source, "blocks": on_cpu.blocks,
            "linears_per_block": len(on_cpu.linears),
            "params_before": on_cpu.params_before, "params_after": on_cpu.params_after,
            "host_phases": on_cpu.host_phases, "host_peak": on_cpu.host_peak_bytes,
            "gpu_host_phases": on_gpu.host_phases, "gpu_host_peak": on_gpu.host_peak_bytes,
            "device_phases": on_gpu.device_phases, "device_peak": on_gpu.device_peak_bytes,
            "cpu_seconds_per_block": on_cpu.seconds_per_block["total"],
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write(result: dict) -> None:
    gib = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    lines = ["# Mixtures of experts at real widths (svdllm-a, ratio 0.2)", "",
             f"Command: `{result['command']}`", "",
             "## Plan per block (64×512 calibration, batch 8)", "",
             "| shape | blocks | linears per block | parameters | host peak, CPU run (GiB) "
             "| by phase | device peak, 24 GiB GPU (GiB) | host peak of that GPU run (GiB) "
             "| CPU time per block, plan |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["plans"]:
        phases = ", ".join(f"{k} {gib(v)}" for k, v in r["host_phases"].items())
        lines.append(f"| {r['shape']} ({r['source']}) | {r['blocks']} | "
                     f"{r['linears_per_block']} | {r['params_before'] / 1e9:.1f}B → "
                     f"{r['params_after'] / 1e9:.1f}B | {gib(r['host_peak'])} | {phases} | "
                     f"{gib(r['device_peak'])} | {gib(r['gpu_host_peak'])} | "
                     f"{r['cpu_seconds_per_block'] / 60:.1f} min |")  # fmt: skip
    for r in result["runs"]:
        lines += ["", f"## Measured: {r['run']} on CPU ({result['calibration']})", "",
                  "| phase | peak RSS (GiB) | plan (GiB) | measured / plan |",
                  "|---|---|---|---|",
                  f"| whole run | {gib(r['peak_rss'])} | {gib(r['planned_peak'])} | "
                  f"{r['peak_rss'] / r['planned_peak']:.3f} |"]  # fmt: skip
        for phase, p in r["phases"].items():
            if p["planned"]:
                lines.append(f"| {phase} | {gib(p['measured'])} | {gib(p['planned'])} | "
                             f"{p['measured'] / p['planned']:.3f} |")  # fmt: skip
        seconds = [b["total"] for b in r["block_seconds"]]
        lines += [
            "",
            f"Seconds per block: {seconds} measured, "
            f"{r['planned_seconds_per_block']['total']:.0f} planned (same calibration).",
        ]
    path = RESULTS / "moe_scale.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", nargs="*", default=["30b-a3b:1"], help="shape:layers runs")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/moe_scale.py", *sys.argv[1:]]),
        "calibration": f"{args.nsamples}×{args.seqlen} tokens of WikiText-2 valid",
        "plans": plans(),
        "runs": [],
    }
    for spec in args.measure:
        result["runs"].append({**measure(spec, args), "command": result["command"]})
    (RESULTS / "moe_scale.json").write_text(json.dumps(result, indent=2))
    write(result)


if __name__ == "__main__":
    main()
