"""Threads on a shared CPU: a compress under OpenMP wait settings, alone and beside other
jobs, block times and total.

Two workloads: `--workload svd` is the demo's plain-SVD pass (SmolLM2-135M, ratio 0.2);
`--workload default` is the compress defaults (refinement on, 64×512 calibration) on a
synthetic 512-wide two-block checkpoint (issue 42's case). Each setting runs `streamsvd
compress` in its own process; settings take turns (A B C A B C ...) so that the load drifts
over all of them alike. Beside the run: `--hogs N` busy single-threaded matrix-product
loops, or `--competitor K` one K-thread torch job (with OpenMP's default wait, as another
user's job would have). `--alone-too` runs each setting alone as well, between its shared
runs, and reports the ratio shared/alone. The load average is recorded either way, since
other work on the machine counts too.

    .venv/bin/python benchmarks/threads.py --hogs 2 --repeats 2
    .venv/bin/python benchmarks/threads.py --workload default --competitor 2 --alone-too \
        --name threads_competitor
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvd.cpus import usable_cpus  # noqa: E402
from streamsvd.default_model import default_model_path  # noqa: E402
from streamsvd.synth import Shape, synthesize  # noqa: E402

SETTINGS = {  # name: (--threads, extra environment)
    # set but empty: the CLI keeps it, and OpenMP reads it as unset (its own default: spin)
    "all cores, OpenMP's default wait": (None, {"OMP_WAIT_POLICY": ""}),
    "all cores, OMP_WAIT_POLICY=PASSIVE (the CLI's default)": (
        None,
        {"OMP_WAIT_POLICY": "PASSIVE"},
    ),
    # libgomp spins this many times before it sleeps (its default 300000; PASSIVE: 0)
    "all cores, GOMP_SPINCOUNT=10000": (None, {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"}),
    "1 thread": (1, {}),
}
HOG = "import torch\ntorch.set_num_threads({})\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
WIDE_512 = Shape(512, 1376, 8, 4, 1024, 2, 512, source="512-wide test shape")


def run_once(model: Path, args, threads: int | None, extra: dict, work: Path) -> dict:
    out, summary = work / "out", work / "summary.json"
    cli = [sys.executable, "-m", "streamsvd.cli", "-q", "compress", "--model", str(model),
           "--out", str(out), "--summary-json", str(summary), "--device", "cpu"]  # fmt: skip
    if args.workload == "svd":
        cli += ["--method", "svd", "--ratio", "0.2"]
    cli += shlex.split(args.compress_args)
    if threads:
        cli += ["--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(cli, check=True, cwd=ROOT, env={**os.environ, **extra},
                   stdout=subprocess.DEVNULL)  # fmt: skip
    wall = time.perf_counter() - start
    blocks = [b["total"] for b in json.loads(summary.read_text())["block_seconds"]]
    subprocess.run(["rm", "-rf", str(out), f"{out}.work"], check=True)
    return {"wall_s": wall, "block_s": blocks, "load": os.getloadavg()[0]}


def start_others(args) -> list[subprocess.Popen]:
    """Other people's jobs: 1-thread hogs and one K-thread competitor, each with OpenMP's
    default wait."""
    env = {**os.environ, "OMP_WAIT_POLICY": ""}
    jobs = [HOG.format(1)] * args.hogs + ([HOG.format(args.competitor)] if args.competitor else [])
    return [subprocess.Popen([sys.executable, "-c", job], env=env) for job in jobs]


def summarise(name: str, results: list[dict]) -> dict:
    blocks = [b for r in results for b in r["block_s"]]
    return {"setting": name, "wall_s": [round(r["wall_s"], 1) for r in results],
            "block_min_s": min(blocks), "block_median_s": statistics.median(blocks),
            "block_max_s": max(blocks),
            "load_average": [round(r["load"], 2) for r in results]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["svd", "default"], default="svd")
    ap.add_argument("--hogs", type=int, default=2, help="busy 1-thread jobs beside the run")
    ap.add_argument("--competitor", type=int, default=0, help="threads of one torch job beside")
    ap.add_argument("--alone-too", action="store_true", help="also run each setting alone")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compress-args", default="", help="more compress options, one string")
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--name", default="threads")
    args = ap.parse_args()
    conditions = (["alone"] if args.alone_too else []) + ["shared"]
    runs = {(name, c): [] for name in args.settings for c in conditions}
    with tempfile.TemporaryDirectory(prefix="streamsvd-threads-") as tmp:
        if args.workload == "svd":
            model = default_model_path()
        else:
            model = synthesize(Path(tmp) / "wide512", WIDE_512, dtype=__import__("torch").float32)
        for r in range(args.repeats):
            for name in args.settings:
                threads, extra = SETTINGS[name]
                for condition in conditions:
                    others = start_others(args) if condition == "shared" else []
                    try:
                        time.sleep(1 if others else 0)  # the others are busy before the run
                        runs[name, condition].append(
                            run_once(model, args, threads, extra, Path(tmp))
                        )
                    finally:
                        for job in others:
                            job.kill()
                            job.wait()
                    print(f"[{r + 1}/{args.repeats}] {name}, {condition}: "
                          f"{runs[name, condition][-1]['wall_s']:.0f} s", flush=True)  # fmt: skip
                    write(args, summarise_all(args, runs))  # a run cut short keeps what it did


def summarise_all(args, runs: dict) -> list[dict]:
    rows = []
    for name in args.settings:
        if not runs[name, "shared"]:
            continue
        row = summarise(name, runs[name, "shared"])
        if args.alone_too and runs[name, "alone"]:
            alone = summarise(name, runs[name, "alone"])
            row["alone_wall_s"] = alone["wall_s"]
            row["shared_over_alone"] = round(
                statistics.median(row["wall_s"]) / statistics.median(alone["wall_s"]), 2
            )
        rows.append(row)
    return rows


def write(args, rows: list[dict]) -> None:
    what = (
        "plain SVD of SmolLM2-135M at 0.2"
        if args.workload == "svd"
        else "the compress defaults (refinement on) on a synthetic 512-wide two-block checkpoint"
    )
    beside = (f"{args.hogs} busy 1-thread jobs" if args.hogs else "") + (
        f"{' and ' if args.hogs else ''}one {args.competitor}-thread torch job"
        if args.competitor else "")  # fmt: skip
    record = {"command": "python benchmarks/threads.py " + " ".join(sys.argv[1:]),
              "workload": what, "cpus_usable": usable_cpus(), "hogs": args.hogs,
              "competitor_threads": args.competitor, "note": args.note,
              "rows": rows}  # fmt: skip
    results_dir = ROOT / "benchmarks" / "results"
    (results_dir / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    ratio = args.alone_too
    lines = [f"# Threads on a shared CPU: {what}, {beside or 'nothing'} beside it", "",
             f"Command: `{record['command']}`. Usable cores: {usable_cpus()}. {args.note}", "",
             "| setting | wall (s), each run beside | block min (s) | block median (s) | "
             "block max (s) | load average |" + (" wall alone (s) | beside / alone |" if ratio
                                                 else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if ratio else "")]  # fmt: skip
    for row in rows:
        walls, loads = ", ".join(map(str, row["wall_s"])), ", ".join(map(str, row["load_average"]))
        line = (f"| {row['setting']} | {walls} | {row['block_min_s']:.1f} | "
                f"{row['block_median_s']:.1f} | {row['block_max_s']:.1f} | {loads} |")  # fmt: skip
        if ratio and "alone_wall_s" in row:
            line += f" {', '.join(map(str, row['alone_wall_s']))} | {row['shared_over_alone']}× |"
        lines.append(line)
    (results_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
