"""Rank allocation and within-block sequential statistics, compared: perplexity,
compression time (the spectra pass apart) and peak RSS of SmolLM2-135M for each
allocation, with and without --sequential, at each ratio, on the held-out protocol (the
default, for choosing) or P1 (for reporting); see benchmarks/common.py.

    .venv/bin/python benchmarks/allocation.py                       # held out, ratio 0.4
    .venv/bin/python benchmarks/allocation.py --protocol p1 --ratios 0.2 0.4 0.6

Writes benchmarks/results/allocation_<protocol>.{json,md} after every row. With --jobs N,
N cells (compression + perplexity) run at once, each on 1 thread: on a 2-core machine that
is as fast in total, and every row's time is measured under the same load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

from streamsvd.allocate import ALLOCATIONS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser, "allocation_<protocol>")
    parser.add_argument("--protocol", choices=["heldout", "p1"], default="heldout")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.4])
    parser.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=ALLOCATIONS)
    parser.add_argument("--sequential", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    args = parser.parse_args()
    name = args.name.replace("<protocol>", args.protocol)
    model = args.model or common.smollm2()
    tmp = Path(tempfile.mkdtemp(prefix="streamsvd-allocation-"))
    proto = common.protocol(args.protocol, args.data_dir, tmp)
    env = common.one_thread_each(args.jobs)
    result = {
        "what": proto.what,
        "model": f"{common.describe(model)}, method svdllm-a",
        "command": common.command_line("allocation.py"),
        "rows": [{"allocation": "original", "perplexity": common.score(model, proto)}],
    }
    cells = [(ratio, sequential == "yes", allocation) for ratio in args.ratios
             for sequential in args.sequential for allocation in args.allocations]  # fmt: skip
    start = time.perf_counter()

    def run_cell(cell: tuple[float, bool, str]) -> dict:
        ratio, sequential, allocation = cell
        work = Path(tempfile.mkdtemp(dir=tmp))
        options = ["--ratio", str(ratio), "--allocation", allocation,
                   "--sequential" if sequential else "--no-sequential"]  # fmt: skip
        summary, command = common.compress(model, work, proto, options, env)
        ppl = common.score_in_process(work / "out", proto, env)
        shutil.rmtree(work)
        return {
            "allocation": allocation,
            "sequential": sequential,
            "ratio": ratio,
            "perplexity": ppl,
            "compress_seconds": summary["seconds"],
            "spectra_seconds": summary["spectra_seconds"],
            "peak_rss_mb": summary["peak_rss_mb"],
            "linear_params_after": summary["linear_params_after"],
            "threads": common.threads_of(env),
            "cells_at_once": args.jobs,  # more than the cores share them: times are rough
            "command": command,
        }

    def on_row(row: dict) -> None:
        result["rows"].append(row)
        common.save(args.results, name, result, markdown(result), start)

    try:
        common.run_cells(cells, run_cell, args.jobs, on_row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown(result: dict) -> str:
    last = result["rows"][-1]
    lines = [
        f"# Allocation × sequential statistics, {result['what']}",
        "",
        f"{result['model']}. Command: `{result['command']}` (CPU, {os.cpu_count()} cores; "
        f"{last.get('cells_at_once', 1)} compressions at a time, "
        f"{last.get('threads', os.cpu_count())} thread(s) each)",
        "",
        "| allocation | sequential | ratio | perplexity | compress time (s) | of which "
        "spectra pass (s) | peak RSS (MiB) | linear params kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["allocation"] == "original":
            lines.append(f"| original | – | – | {r['perplexity']:.2f} | – | – | – | – |")
            continue
        lines.append(
            f"| {r['allocation']} | {'yes' if r['sequential'] else 'no'} | {r['ratio']} | "
            f"{r['perplexity']:.2f} | {r['compress_seconds']:.0f} | "
            f"{r['spectra_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['linear_params_after']:,} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
