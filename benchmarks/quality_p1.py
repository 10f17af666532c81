"""Quality protocol P1 (../shared/BENCHMARKS.md): perplexity of SmolLM2-135M, original and
compressed by every method at every ratio, with compression wall time and peak RSS.

    bash dev.sh bench-quality                      # full P1: 64 calib windows, 128 eval windows
    .venv/bin/python benchmarks/quality_p1.py --methods svdllm-w svdllm-a --ratios 0.4

Each compression runs in its own process (benchmarks/common.py's runner), so its peak RSS
is its own. Writes benchmarks/results/quality_p1.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

from streamsvd.factorize import METHODS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser, "quality_p1")
    parser.add_argument("--methods", nargs="+", default=["svd", "svdllm-w", "svdllm-u", "svdllm-a"],
                        choices=list(METHODS))  # fmt: skip
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    parser.add_argument("--windows", type=int, default=128, help="evaluation windows")
    parser.add_argument("--refine-epochs", type=int, default=0,
                        help="block refinement after each closed form (default 0)")  # fmt: skip
    args = parser.parse_args()
    model = args.model or common.smollm2()
    proto = dataclasses.replace(common.protocol("p1", args.data_dir), nsamples=args.nsamples,
                                windows=args.windows)  # fmt: skip
    name = (
        "P1"
        if (args.nsamples, args.windows) == (64, 128)
        else (f"P1 variant: {args.nsamples} calibration windows, {args.windows} eval windows")
    )
    result = {"protocol": name, "model": common.describe(model), "rows": [],
              "command": common.command_line("quality_p1.py")}  # fmt: skip
    start = time.perf_counter()
    result["rows"].append(
        {"method": "original", "ratio": 0.0, "perplexity": common.score(model, proto)}
    )
    cells = [(ratio, method) for ratio in args.ratios for method in args.methods]
    env = common.one_thread_each(args.jobs)

    def run_cell(cell: tuple[float, str]) -> dict:
        ratio, method = cell
        with tempfile.TemporaryDirectory(prefix="streamsvd-p1-") as tmp:
            work = Path(tmp)
            options = ["--ratio", str(ratio), "--method", method,
                       # each method's closed form; benchmarks/refine.py measures refinement
                       "--refine-epochs", str(args.refine_epochs)]  # fmt: skip
            summary, command = common.compress(model, work, proto, options, env)
            return {
                "method": method,
                "ratio": ratio,
                "perplexity": common.score_in_process(work / "out", proto, env),
                "compress_seconds": summary["seconds"],
                "peak_rss_mb": summary["peak_rss_mb"],
                "stage_seconds": summary["stage_seconds"],
                "linear_params_kept": summary["linear_params_after"]
                / summary["linear_params_before"],
                "command": command,
            }

    def on_row(row: dict) -> None:
        result["rows"].append(row)
        common.save(args.results, args.name, result, markdown(result), start)

    common.run_cells(cells, run_cell, args.jobs, on_row)
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"# {result['protocol']}: {result['model']}",
        "",
        f"Command: `{result['command']}` (CPU, 2 cores)",
        "",
        "| method | ratio | perplexity | compress time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ppl = f"{r['perplexity']:.3g}" if r["perplexity"] >= 1e5 else f"{r['perplexity']:.2f}"
        lines.append(
            f"| {r['method']} | {r['ratio']} | {ppl} | "
            f"{r.get('compress_seconds', '–')} | {r.get('peak_rss_mb', '–')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
