"""Choose svdllm-a's λ (factorize.UPDATE_FRACTION) on held-out text, never on the test set.

WikiText-2 valid.txt is split by lines: the first 80% is the calibration text, the last
20% the held-out text scored for perplexity. test.txt is not read. SmolLM2-135M, CPU.

    .venv/bin/python benchmarks/tune_lambda.py    # λ in 0, .1, .25, .4, .6 at ratio 0.4
    .venv/bin/python benchmarks/tune_lambda.py --lambdas 0.2 0.3 --ratios 0.2

Writes benchmarks/results/tune_lambda.{json,md} after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quality_p1 import run_arguments  # noqa: E402  (benchmarks/, on sys.path as the script's folder)

from streamsvd import CompressConfig, compress, factorize  # noqa: E402
from streamsvd.calib import eval_windows, tokenize  # noqa: E402
from streamsvd.default_model import default_model_path  # noqa: E402
from streamsvd.evaluate import perplexity  # noqa: E402

CALIB_FRACTION = 0.8


def heldout_split(data_dir: Path) -> tuple[str, str]:
    """(calibration text, held-out text): valid.txt's lines, the first 80% and the rest."""
    lines = (data_dir / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * CALIB_FRACTION)
    return "".join(lines[:cut]), "".join(lines[cut:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/wikitext-2")
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.0, 0.1, 0.25, 0.4, 0.6])
    parser.add_argument("--allocation", default="uniform", help="compress --allocation")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                        help="compress --sequential, the default; results/tune_lambda.md was "
                        "measured --no-sequential, before it was")  # fmt: skip
    parser.add_argument("--only-svdllm-a", action="store_true", help="skip svdllm-w and -u")
    args = run_arguments(parser, "tune_lambda", ratios=[0.4], nsamples=32, windows=48)

    from transformers import AutoTokenizer

    model = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    calib_text, heldout_text = heldout_split(args.data_dir)
    windows = eval_windows(
        tokenize(tokenizer, heldout_text, special_tokens=True), 512, args.windows
    )
    result = {
        "what": (
            f"svdllm-a λ sweep (allocation {args.allocation}"
            f"{', sequential statistics' if args.sequential else ''}): calibrate on the "
            f"first {CALIB_FRACTION:.0%} of valid.txt "
            f"({args.nsamples}×512, seed 0), perplexity on {len(windows)}×512 windows of the "
            "last 20%; test.txt unused"
        ),
        "command": "python benchmarks/tune_lambda.py " + " ".join(sys.argv[1:]),
        "rows": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="streamsvd-lambda-") as tmp:
        calib_path = Path(tmp) / "calib.txt"
        calib_path.write_text(calib_text, encoding="utf-8")
        result["rows"].append(
            {"method": "original", "perplexity": perplexity(model, windows, progress=False)}
        )
        print(json.dumps(result["rows"][-1]), flush=True)
        runs = [] if args.only_svdllm_a else [(r, "svdllm-w", None) for r in args.ratios]
        runs += [] if args.only_svdllm_a else [(r, "svdllm-u", None) for r in args.ratios]
        runs += [(r, "svdllm-a", lam) for r in args.ratios for lam in args.lambdas]
        for ratio, method, lam in runs:
            if lam is not None:
                factorize.UPDATE_FRACTION = lam  # svdllm_a reads it at call time
            out = Path(tmp) / f"{method}-{ratio}-{lam}"
            summary = compress(
                CompressConfig(
                    model=str(model),
                    out=str(out),
                    ratio=ratio,
                    method=method,
                    calib=str(calib_path),
                    nsamples=args.nsamples,
                    seqlen=512,
                    seed=0,
                    allocation=args.allocation,
                    sequential=args.sequential,
                )
            )
            row = {
                "method": method,
                "ratio": ratio,
                "lambda": lam,
                "allocation": args.allocation,
                "sequential": args.sequential,
                "perplexity": perplexity(out, windows, progress=False),
                "compress_seconds": summary["seconds"],
            }
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            result["total_seconds"] = round(time.perf_counter() - start, 1)
            save(args, result)


def save(args, result: dict) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# " + result["what"],
        "",
        f"Command: `{result['command']}` (CPU, 2 cores)",
        "",
        "| method | ratio | λ | held-out perplexity |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lam = "–" if r.get("lambda") is None else r["lambda"]
        lines.append(f"| {r['method']} | {r.get('ratio', '–')} | {lam} | {r['perplexity']:.2f} |")
    (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
