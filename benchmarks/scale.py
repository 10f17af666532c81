"""The default method (svdllm-a) at real widths: what the plan says a block needs at 7B, 13B,
70B and 405B widths, before this release's memory diet and after, and measured runs of
synthetic checkpoints against the plan: peak RSS by phase and seconds per stage per block.

    .venv/bin/python benchmarks/scale.py                       # plans, then 70b:2 13b:1 7b:1
    .venv/bin/python benchmarks/scale.py --measure 70b:1 70b:2 --nsamples 8 --seqlen 256

Plans use the compress defaults (64 windows of 512, batch 8, ratio 0.2) on shape-only
checkpoints (`synth --shape-only`: sparse files, no disk), on CPU and for a 24 GiB GPU
(`--device cuda --device-memory 24`, planned here without one). "Before" is the plan of
--base (default: the last commit before the diet), run from a `git archive` of it, with a
stand-in for the CUDA calls its plan made. Measured runs use real random weights (`synth`,
bf16) and a small calibration (--nsamples × --seqlen tokens: the Gram sizes, which set the
memory, do not depend on it), each in its own process through the CLI; the run reports its
peak RSS per phase (VmHWM reset at each phase's start) and its seconds per stage per block.

Writes benchmarks/results/scale.json, scale.md and scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

from streamsvd.pipeline import CompressConfig  # noqa: E402
from streamsvd.plan import make_plan, measure_baseline  # noqa: E402
from streamsvd.synth import synthesize  # noqa: E402

GiB = 2**30
BASE = "1dcf431"  # the last commit before the memory diet
WIDTHS = ["7b", "13b", "70b", "405b"]
RESULTS = common.ROOT / "benchmarks" / "results"
RUNS = common.ROOT / "benchmarks" / "runs"
CALIB = common.DATA_DIR / "valid.txt"

OLD_PLAN = """
import json, sys
import torch
torch.cuda.is_available = lambda: True  # plan a GPU run here, as the old plan could not
torch.cuda.mem_get_info = lambda device=None: (24 << 30, 24 << 30)
from streamsvd.pipeline import CompressConfig
from streamsvd.plan import make_plan
args = json.loads(sys.argv[1])
plan = make_plan(CompressConfig(**args["cfg"]), args["fixed"])
print(json.dumps({"host": plan.host_phases, "device": plan.device_phases}))
"""


def plan_cfg(model: Path, device: str, **kw) -> CompressConfig:
    return CompressConfig(model=str(model), out=str(RUNS / "scale-out-unused"), device=device,
                          calib=str(CALIB), method="svdllm-a", ratio=0.2, allow_few_tokens=True,
                          **kw)  # fmt: skip


def old_plan(src: Path, cfg: CompressConfig, fixed: dict) -> dict:
    args = {"cfg": {k: v for k, v in vars(cfg).items()}, "fixed": fixed}
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", OLD_PLAN, json.dumps(args)], env=env,
                          capture_output=True, text=True, cwd=src)  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def plans(base: str) -> list[dict]:
    src = RUNS / f"scale-base-{base}"
    if not src.exists():
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", base, "streamsvd"], cwd=common.ROOT,
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    rows = []
    for width in WIDTHS:
        ckpt = RUNS / f"scale-shapes-{width}"
        if not ckpt.exists():
            synthesize(ckpt, width, 1, values=False)
        cpu, gpu = plan_cfg(ckpt, "cpu"), plan_cfg(ckpt, "cuda")
        fixed = measure_baseline(cpu)
        after_cpu = make_plan(cpu, fixed, timing=True)
        after_gpu = make_plan(gpu, fixed, device_memory=24 * GiB, timing=False)
        before_cpu, before_gpu = old_plan(src, cpu, fixed), old_plan(src, gpu, fixed)
        rows.append({
            "width": width,
            "before_host": max(before_cpu["host"].values()),
            "before_device": max(before_gpu["device"].values()),
            "after_host": after_cpu.host_peak_bytes,
            "after_device": after_gpu.device_peak_bytes,
            "after_host_on_gpu_run": after_gpu.host_peak_bytes,
            "after_host_phases": after_cpu.host_phases,
            "after_device_phases": after_gpu.device_phases,
            "cpu_seconds_per_block": after_cpu.seconds_per_block,
        })  # fmt: skip
        print(f"plan {width}: host {rows[-1]['before_host'] / GiB:.1f} -> "
              f"{rows[-1]['after_host'] / GiB:.1f} GiB, device "
              f"{rows[-1]['before_device'] / GiB:.1f} -> {rows[-1]['after_device'] / GiB:.1f}"
              " GiB", flush=True)  # fmt: skip
    return rows


def measure(spec: str, args) -> dict:
    width, layers = spec.split(":")
    ckpt = RUNS / f"scale-ckpt-{width}-{layers}"
    if not ckpt.exists():
        synthesize(ckpt, width, int(layers))
    out = RUNS / f"scale-out-{width}-{layers}"
    for leftover in (out, Path(f"{out}.work")):
        subprocess.run(["rm", "-rf", str(leftover)], check=True)
    options = [
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--ratio",
        "0.2",
        "--method",
        "svdllm-a",
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--batch-size",
        str(args.batch_size),
        "--calib",
        str(CALIB),
        "--device",
        "cpu",
        "--allow-few-tokens",  # a small calibration on purpose (the module's docstring)
    ]
    cli = [sys.executable, "-m", "streamsvd.cli", "-q", "compress", *options]  # fmt: skip
    plan_json, summary_json = RUNS / f"scale-plan-{spec}.json", RUNS / f"scale-run-{spec}.json"
    subprocess.run([*cli, "--dry-run", "--summary-json", str(plan_json)], check=True)
    start = time.perf_counter()
    subprocess.run([*cli, "--summary-json", str(summary_json)], check=True)
    wall = time.perf_counter() - start
    plan, run = json.loads(plan_json.read_text()), json.loads(summary_json.read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    row = {
        "run": spec,
        "command": " ".join([".venv/bin/python", "benchmarks/scale.py", *sys.argv[1:]]),
        "wall_seconds": round(wall, 1),
        "peak_rss": run["peak_rss_mb"] * 2**20,
        "planned_peak": plan["host_peak_bytes"],
        "phases": {
            phase: {"measured": peaks["host_mb"] * 2**20,
                    "planned": plan["host_phases"].get(phase)}
            for phase, peaks in run["phase_peaks"].items()
        },
        "block_seconds": run["block_seconds"],
        "planned_seconds_per_block": plan["seconds_per_block"],
    }  # fmt: skip
    print(f"run {spec}: peak RSS {row['peak_rss'] / GiB:.2f} GiB vs plan "
          f"{row['planned_peak'] / GiB:.2f} GiB, {wall:.0f}s", flush=True)  # fmt: skip
    return row


def markdown(result: dict) -> str:
    gib = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    lines = [
        "# svdllm-a at real widths",
        "",
        "Commands: "
        + ", ".join(
            f"`{c}`"
            for c in dict.fromkeys([result["command"], *(r.get("command") for r in result["runs"])])
        ),
        "(each run's own command is in scale.json; a run interrupted before it finished is "
        "not listed)",
        "",
        "## Planned peak per block (ratio 0.2, 64×512 calibration, batch 8)",
        "",
        "| width | host, before (GiB) | host, after (GiB) | device, before (GiB) | "
        "device, after (GiB) | host of a GPU run, after (GiB) | CPU time per block, plan |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["plans"]:
        t = r["cpu_seconds_per_block"]["total"]
        lines.append(f"| {r['width']} | {gib(r['before_host'])} | {gib(r['after_host'])} | "
                     f"{gib(r['before_device'])} | {gib(r['after_device'])} | "
                     f"{gib(r['after_host_on_gpu_run'])} | {t / 60:.1f} min |")  # fmt: skip
    if result["runs"]:
        lines += ["", f"## Measured on CPU ({result['calibration']})", "",
                  "| run | phase | peak RSS (GiB) | plan (GiB) | measured / plan |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in result["runs"]:
            lines.append(
                f"| {r['run']} | whole run | {gib(r['peak_rss'])} | "
                f"{gib(r['planned_peak'])} | {r['peak_rss'] / r['planned_peak']:.3f} |"
            )
            for phase, p in r["phases"].items():
                if p["planned"]:
                    lines.append(
                        f"| {r['run']} | {phase} | {gib(p['measured'])} | "
                        f"{gib(p['planned'])} | {p['measured'] / p['planned']:.3f} |"
                    )
        stages = ["load", "forward", "stats", "cholesky", "update", "svd", "write", "total"]
        lines += ["", "## Seconds per stage per block (measured; plan in the last row of each)",
                  "", "| run | block | " + " | ".join(stages) + " |",
                  "|---|---|" + "---|" * len(stages)]  # fmt: skip
        for r in result["runs"]:
            for b in r["block_seconds"]:
                lines.append(
                    f"| {r['run']} | {b['block'] + 1} | "
                    + " | ".join(f"{b.get(s, 0):.1f}" for s in stages)
                    + " |"
                )
            p = r["planned_seconds_per_block"] or {}
            lines.append(
                f"| {r['run']} | plan | " + " | ".join(f"{p.get(s, 0):.1f}" for s in stages) + " |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    widths = [r["width"] for r in result["plans"]]
    x = range(len(widths))
    for k, (key, label) in enumerate([("before_host", "host, before"),
                                      ("after_host", "host, after"),
                                      ("before_device", "GPU, before"),
                                      ("after_device", "GPU, after")]):  # fmt: skip
        ax.bar([i + 0.2 * k - 0.3 for i in x], [r[key] / GiB for r in result["plans"]],
               width=0.2, label=label)  # fmt: skip
    ax.axhline(24, color="k", ls="--", lw=1)
    ax.text(-0.45, 25, "24 GiB GPU", fontsize=8)
    ax.set_xticks(list(x), widths)
    ax.set_yscale("log")
    ax.set_ylabel("planned peak per block (GiB)")
    ax.set_title("svdllm-a, ratio 0.2: plan before and after")
    ax.legend(fontsize=8)
    runs = result["runs"]
    labels, measured, planned = [], [], []
    for r in runs:
        for phase, p in r["phases"].items():
            if p["planned"]:
                labels.append(f"{r['run']}\n{phase}")
                measured.append(p["measured"] / GiB)
                planned.append(p["planned"] / GiB)
    y = range(len(labels))
    bx.bar([i - 0.2 for i in y], planned, width=0.4, label="plan")
    bx.bar([i + 0.2 for i in y], measured, width=0.4, label="measured peak RSS")
    bx.set_xticks(list(y), labels, fontsize=7)
    bx.set_ylabel("GiB")
    bx.set_title("measured on CPU against the plan")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--measure",
        nargs="*",
        default=["70b:2", "13b:1", "7b:1"],
        help="width:blocks runs to measure (default 70b:2 13b:1 7b:1)",
    )
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--base", default=BASE, help="commit whose plan is 'before'")
    p.add_argument("--skip-plans", action="store_true",
                   help="reuse the plans and the other runs in scale.json (a run measured "
                   "again replaces its row)")  # fmt: skip
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    RUNS.mkdir(exist_ok=True)
    earlier = json.loads((RESULTS / "scale.json").read_text()) if args.skip_plans else {}
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/scale.py", *sys.argv[1:]]),
        "calibration": f"{args.nsamples}×{args.seqlen} tokens of WikiText-2 valid, batch "
                       f"{args.batch_size}, bf16, ratio 0.2",
        "plans": earlier["plans"] if args.skip_plans else plans(args.base),
        "runs": [r for r in earlier.get("runs", []) if r["run"] not in args.measure],
    }  # fmt: skip
    for spec in args.measure:
        result["runs"].append(measure(spec, args))
        common.save(RESULTS, "scale", result, markdown(result))  # after every run
    common.save(RESULTS, "scale", result, markdown(result))
    plot(result)


if __name__ == "__main__":
    main()
