"""What the default run plans at real widths, with block refinement off and on, and with
4-bit factors (--bits 4): peak host memory of a CPU run, and peak device (and host) memory
of a run on one 24 GiB GPU.

    .venv/bin/python benchmarks/plan_widths.py

Plans use the compress defaults (svdllm-a, sequential statistics, 64 windows of 512,
batch 8, block refinement's 2-window steps) at ratios 0.2 and 0.4, on shape-only
checkpoints (`synth --shape-only`: sparse files, no disk); the GPU is planned here
without one (`--device-memory 24`). How close a plan comes to a measured run:
benchmarks/scale.py and tests/test_scale.py.

Writes benchmarks/results/plan_widths.json and plan_widths.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvd.pipeline import CompressConfig  # noqa: E402
from streamsvd.plan import make_plan, measure_baseline  # noqa: E402
from streamsvd.refine import DEFAULT_BATCH, DEFAULT_EPOCHS  # noqa: E402
from streamsvd.synth import synthesize  # noqa: E402

GiB = 2**30
WIDTHS = ["7b", "13b", "70b", "405b"]
RATIOS = [0.2, 0.4]
REFINE_EPOCHS = [0, DEFAULT_EPOCHS]  # the closed form, and refined (the default)
BITS = [None, 4]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"
CALIB = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main() -> None:
    rows = []
    for width in WIDTHS:
        ckpt = RUNS / f"scale-shapes-{width}"
        if not ckpt.exists():
            synthesize(ckpt, width, 1, values=False)
        fixed = None
        for ratio in RATIOS:
            for epochs, bits in [(e, b) for b in BITS for e in REFINE_EPOCHS]:
                cfg = {"model": str(ckpt), "out": str(RUNS / "plan-out-unused"),
                       "calib": str(CALIB), "ratio": ratio, "refine_epochs": epochs,
                       "bits": bits,
                       # 405B's down_proj has 53,248 inputs: a run needs --nsamples 104 there
                       "allow_few_tokens": True}  # fmt: skip
                # a CPU holds refinement's streams in host memory where it has the room
                # (what --refine-streams auto picks then): fixed here, not this machine's
                cpu = CompressConfig(device="cpu", refine_streams="host", **cfg)
                gpu = CompressConfig(device="cuda", **cfg)
                fixed = fixed or measure_baseline(cpu)
                on_cpu = make_plan(cpu, fixed, timing=False)
                in_bf16 = CompressConfig(device="cpu", compute_dtype="checkpoint",
                                         refine_streams="host", **cfg)  # fmt: skip
                on_cpu_bf16 = make_plan(in_bf16, fixed, timing=False)
                on_gpu = make_plan(gpu, fixed, device_memory=24 * GiB, timing=False)
                rows.append({"width": width, "ratio": ratio, "refine_epochs": epochs,
                             "bits": bits,
                             "cpu_host": on_cpu.host_peak_bytes,
                             "cpu_host_bf16": on_cpu_bf16.host_peak_bytes,
                             "gpu_device": on_gpu.device_peak_bytes,
                             "gpu_host": on_gpu.host_peak_bytes,
                             "gpu_refine_streams": on_gpu.refine_streams or "–",
                             "cpu_host_phases": on_cpu.host_phases,
                             "gpu_device_phases": on_gpu.device_phases})  # fmt: skip
                print(f"{width} ratio {ratio} refine {epochs} bits {bits}: CPU host "
                      f"{on_cpu.host_peak_bytes / GiB:.1f} GiB, GPU device "
                      f"{on_gpu.device_peak_bytes / GiB:.1f} GiB", flush=True)  # fmt: skip
    command = "python benchmarks/plan_widths.py"
    RESULTS.joinpath("plan_widths.json").write_text(
        json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
    )
    lines = ["# The default run's plan at real widths, refinement off and on, 4-bit factors",
             "",
             f"Command: `{command}`. svdllm-a, sequential statistics, 64×512 calibration, "
             f"batch 8, refinement steps of {DEFAULT_BATCH} windows; shape-only checkpoints; "
             "the GPU is one of 24 GiB, planned without it. A CPU runs the bf16 blocks in "
             "float32 (compute dtype auto); the next column keeps them in bf16 "
             "(`--compute-dtype checkpoint`), as the GPU does. With refinement a CPU run holds "
             "its streams in host memory (`--refine-streams host`, what auto picks where "
             "there is room); the GPU run's place is auto's on 24 GiB. At 405B, 64×512 tokens "
             "are fewer than down_proj's 53,248 inputs: a run needs `--nsamples 104` (or "
             "`--allow-few-tokens`); planned here with 64×512 like the others.",
             "", "| width | ratio | refine epochs | bits | CPU run: host | CPU run in bf16: "
             "host | GPU run: device | GPU run: host | GPU: refinement's streams |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        bits = r.get("bits") or "–"
        lines.append(f"| {r['width']} | {r['ratio']} | {r['refine_epochs']} | {bits} | "
                     f"{r['cpu_host'] / GiB:.1f} GiB | {r['cpu_host_bf16'] / GiB:.1f} GiB | "
                     f"{r['gpu_device'] / GiB:.1f} GiB | "
                     f"{r['gpu_host'] / GiB:.1f} GiB | {r['gpu_refine_streams']} |")  # fmt: skip
    RESULTS.joinpath("plan_widths.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
