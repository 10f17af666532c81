"""Threads on a shared CPU: the demo's plain-SVD pass (SmolLM2-135M, ratio 0.2) under
thread settings, with other jobs on the machine, block times and total.

Each setting runs `streamsvd compress --method svd` in its own process; settings take
turns (A B C A B C ...) so that the load drifts over all of them alike. `--hogs N` starts
N busy single-threaded matrix-product loops beside it (other people's jobs); the load
average is recorded either way, since other work on the machine counts too.

    .venv/bin/python benchmarks/threads.py --hogs 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
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

SETTINGS = {  # name: (--threads, extra environment)
    # set but empty: the CLI keeps it, and OpenMP reads it as unset (its own default: spin)
    "all cores, OpenMP's default wait": (None, {"OMP_WAIT_POLICY": ""}),
    "all cores, OMP_WAIT_POLICY=PASSIVE (the CLI's default)": (
        None,
        {"OMP_WAIT_POLICY": "PASSIVE"},
    ),
    "1 thread": (1, {}),
}
HOG = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


def run_once(model: Path, threads: int | None, extra: dict, work: Path) -> dict:
    out, summary = work / "out", work / "summary.json"
    cli = [sys.executable, "-m", "streamsvd.cli", "-q", "compress", "--model", str(model),
           "--out", str(out), "--method", "svd", "--ratio", "0.2", "--summary-json",
           str(summary), "--device", "cpu"]  # fmt: skip
    if threads:
        cli += ["--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(cli, check=True, cwd=ROOT, env={**os.environ, **extra},
                   stdout=subprocess.DEVNULL)  # fmt: skip
    wall = time.perf_counter() - start
    blocks = [b["total"] for b in json.loads(summary.read_text())["block_seconds"]]
    subprocess.run(["rm", "-rf", str(out), f"{out}.work"], check=True)
    return {"wall_s": wall, "block_s": blocks, "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hogs", type=int, default=2, help="busy 1-thread jobs beside the run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--name", default="threads")
    args = ap.parse_args()
    model = default_model_path()
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    runs: dict[str, list] = {name: [] for name in SETTINGS}
    try:
        with tempfile.TemporaryDirectory(prefix="streamsvd-threads-") as tmp:
            for r in range(args.repeats):
                for name, (threads, extra) in SETTINGS.items():
                    runs[name].append(run_once(model, threads, extra, Path(tmp)))
                    print(f"[{r + 1}/{args.repeats}] {name}: {runs[name][-1]['wall_s']:.0f} s",
                          flush=True)  # fmt: skip
    finally:
        for hog in hogs:
            hog.kill()
    rows = []
    for name, results in runs.items():
        blocks = [b for r in results for b in r["block_s"]]
        rows.append({"setting": name, "wall_s": [round(r["wall_s"], 1) for r in results],
                     "block_min_s": min(blocks), "block_median_s": statistics.median(blocks),
                     "block_max_s": max(blocks),
                     "load_average": [round(r["load"], 2) for r in results]})  # fmt: skip
    record = {"command": "python benchmarks/threads.py " + " ".join(sys.argv[1:]),
              "cpus_usable": usable_cpus(), "hogs": args.hogs, "note": args.note,
              "rows": rows}  # fmt: skip
    results_dir = ROOT / "benchmarks" / "results"
    (results_dir / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Threads on a shared CPU: plain SVD of SmolLM2-135M at 0.2, {args.hogs} busy "
             f"1-thread jobs beside it", "",
             f"Command: `{record['command']}`. Usable cores: {usable_cpus()}. {args.note}", "",
             "| setting | wall (s), each run | block min (s) | block median (s) | "
             "block max (s) | load average |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        walls, loads = ", ".join(map(str, row["wall_s"])), ", ".join(map(str, row["load_average"]))
        lines.append(f"| {row['setting']} | {walls} | {row['block_min_s']:.1f} | "
                     f"{row['block_median_s']:.1f} | {row['block_max_s']:.1f} | "
                     f"{loads} |")  # fmt: skip
    (results_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
