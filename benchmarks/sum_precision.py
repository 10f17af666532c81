"""Float32 or float64 sums? The relative error of float32-accumulated Grams of real layer
inputs, and what it does to the whitened truncation's loss, on SmolLM2-135M.

    .venv/bin/python benchmarks/sum_precision.py              # Gram errors (minutes)
    .venv/bin/python benchmarks/sum_precision.py --p1 0.2 0.4  # + P1 with float32 sums

Inputs of every linear of blocks 0, 14 and 29, on P1's first --nsamples calibration windows
(WikiText-2 valid, 512 tokens). For each input group: ‖G32 − G64‖/‖G64‖ with G32 summed in
float32 a micro-batch at a time, as a float32 accumulator would; and, for the group's first
linear at ratio 0.2, the loss ‖(W − W')X‖² of svdllm-w's truncation whitened with each Gram,
measured against the float64 Gram, as a ratio to the float64 result. With --p1: protocol P1
of the default method with float32 sums (`stats.SUM_DTYPE`, factorised in float64 all the
same), to set beside quality_p1.py's float64 rows. Writes
benchmarks/results/sum_precision.json and .md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from streamsvd.calib import calibration_windows, tokenize  # noqa: E402
from streamsvd.default_model import default_model_path  # noqa: E402
from streamsvd.factorize import rank_for, whitened_truncation  # noqa: E402
from streamsvd.model import shared_input_groups  # noqa: E402
from streamsvd.stats import damped_cholesky  # noqa: E402

BLOCKS = (0, 14, 29)
NSAMPLES, SEQLEN, BATCH = 16, 512, 4


def p1_float32(ratios: list[float]) -> list[dict]:
    """P1 perplexity of svdllm-a with float32 sums, compressed in this process."""
    import tempfile
    import time

    from streamsvd import CompressConfig, compress, stats
    from streamsvd.calib import eval_windows
    from streamsvd.evaluate import perplexity

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    data = ROOT.parent / "shared/data/wikitext-2"
    test = tokenize(tok, (data / "test.txt").read_text(encoding="utf-8"), special_tokens=True)
    windows = eval_windows(test, 512, 128)
    stats.SUM_DTYPE = torch.float32
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamsvd-f32-") as tmp:
        for ratio in ratios:
            out = Path(tmp) / f"f32-{ratio}"
            start = time.perf_counter()
            compress(
                CompressConfig(
                    model=str(path),
                    out=str(out),
                    ratio=ratio,
                    calib=str(data / "valid.txt"),
                    nsamples=64,
                    seqlen=512,
                )
            )
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "ratio": ratio,
                    "sums": "float32",
                    "compress_seconds": round(seconds, 1),
                    "perplexity": perplexity(out, windows, progress=False),
                }
            )
            print(json.dumps(rows[-1]), flush=True)  # fmt: skip
    stats.SUM_DTYPE = torch.float64
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p1", nargs="*", type=float, default=[], metavar="RATIO")
    args = parser.parse_args()
    out = ROOT / "benchmarks/results"
    if args.p1:
        rows = p1_float32(args.p1)
        (out / "sum_precision_p1.json").write_text(json.dumps(rows, indent=2))
        write_markdown(out)
        return
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = (ROOT.parent / "shared/data/wikitext-2/valid.txt").read_text(encoding="utf-8")
    ids = tokenize(tok, text)
    windows = calibration_windows(ids, NSAMPLES, SEQLEN, 0)  # P1's first windows
    rows = []
    for b in BLOCKS:
        block = model.model.layers[b]
        names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        sums64, sums32, first = {}, {}, None
        for start in range(0, NSAMPLES, BATCH):
            seen = {}
            hooks = [block.get_submodule(n).register_forward_pre_hook(
                lambda m, a, n=n, seen=seen: seen.__setitem__(n, a[0])) for n in names]  # fmt: skip
            with torch.inference_mode():
                model(input_ids=windows[start : start + BATCH], use_cache=False)
            for h in hooks:
                h.remove()
            groups = shared_input_groups(seen)
            first = first or groups
            for group in groups:
                x = seen[group[0]].reshape(-1, seen[group[0]].shape[-1])
                key = tuple(group)
                x64 = x.double()
                sums64[key] = sums64.get(key, 0) + x64.T @ x64
                sums32[key] = sums32.get(key, 0) + x.T @ x  # float32 accumulator
        for group in first:
            key = tuple(group)
            G64, G32 = sums64[key], sums32[key].double()
            rel = float((G32 - G64).norm() / G64.norm())
            W = block.get_submodule(group[0]).weight.detach()
            rank = rank_for(*W.shape, 0.2)
            losses = {}
            for label, G in (("float64", G64), ("float32", G32)):
                A, B = whitened_truncation(W, damped_cholesky(G), rank)
                D = W.double() - A @ B
                losses[label] = float(torch.einsum("ij,jk,ik->", D, G64, D))
            rows.append(
                {
                    "block": b,
                    "group": list(group),
                    "tokens": NSAMPLES * SEQLEN,
                    "gram_rel_error": rel,
                    "loss_ratio_f32_over_f64": losses["float32"] / losses["float64"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)  # fmt: skip
    (out / "sum_precision.json").write_text(json.dumps(rows, indent=2))
    write_markdown(out)


def write_markdown(out: Path) -> None:
    """sum_precision.md from the JSON of both parts (the P1 part where it was run), with
    quality_p1.py's float64 rows beside the float32 ones."""
    rows = json.loads((out / "sum_precision.json").read_text())
    lines = ["# Float32 vs float64 Gram sums (SmolLM2-135M, real inputs)", "",
             "Command: `.venv/bin/python benchmarks/sum_precision.py` (16×512 P1 calibration "
             "tokens, blocks 0, 14, 29; ratio 0.2 for the loss)", "",
             "| block | input group | ‖G32 − G64‖/‖G64‖ | whitened loss, f32 / f64 − 1 |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['block']} | {', '.join(r['group'])} | {r['gram_rel_error']:.2e} | "
                     f"{r['loss_ratio_f32_over_f64'] - 1:+.1e} |")  # fmt: skip
    p1 = out / "sum_precision_p1.json"
    if p1.exists():
        f64 = {r["ratio"]: r["perplexity"] for r in
               json.loads((out / "quality_p1_default.json").read_text())["rows"]
               if r["method"] == "svdllm-a"}  # fmt: skip
        lines += ["", "## P1, default method (svdllm-a)", "",
                  "Command: `.venv/bin/python benchmarks/sum_precision.py --p1 0.2 0.4`; "
                  "float64 from `benchmarks/quality_p1.py --methods svdllm-a --name "
                  "quality_p1_default`", "",
                  "| ratio | float64 sums | float32 sums |", "|---|---|---|"]  # fmt: skip
        for r in json.loads(p1.read_text()):
            lines.append(f"| {r['ratio']} | {f64.get(r['ratio'], float('nan')):.4f} | "
                         f"{r['perplexity']:.4f} |")  # fmt: skip
    (out / "sum_precision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
