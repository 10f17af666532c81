"""Every decoder family streamsvd is tried on: a tiny random checkpoint of each, saved by
save_pretrained as real ones are, compressed with the default method, loaded back with
`load_compressed` and (dense export) with stock transformers, logits compared.

    .venv/bin/python benchmarks/families.py [--families llama,mixtral,...] [--calib FILE]

Calibration: 64 windows of 256 tokens of --calib (default: WikiText-2 valid.txt from
../shared when it is there, else Python's docstrings), tokenised by the checkpoints'
small synthetic tokenizer. Writes benchmarks/results/families.{json,md}: family ×
outcome, the share of block parameters that became low-rank, what stayed dense, how
many calibration tokens each expert was routed (mixtures of experts), and two logit
checks against stock transformers (float32, so differences are rounding-sized):
streamsvd's reading of the original checkpoint vs transformers' own, and the low-rank
output (load_compressed) vs its dense export and vs the output loaded by stock
transformers with its own modeling code (trust_remote_code=True).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from streamsvd import CompressConfig, compress  # noqa: E402
from streamsvd.calib import stdlib_docstrings  # noqa: E402
from streamsvd.errors import StreamSVDError  # noqa: E402
from streamsvd.lowrank import export_dense, load_compressed, load_model  # noqa: E402
from streamsvd.synth import FAMILIES, write_family  # noqa: E402

RESULTS = common.ROOT / "benchmarks" / "results"
WIKITEXT_VALID = common.DATA_DIR / "valid.txt"


def try_family(family: str, work: Path, calib: Path) -> dict:
    row: dict = {"family": family}
    t0 = time.perf_counter()
    try:
        src = write_family(family, work / family)
    except Exception as exc:  # transformers itself cannot build or save it
        row.update(outcome="no tiny checkpoint", detail=_first_line(exc))
        return row
    out = work / f"{family}-out"
    try:
        cfg = CompressConfig(model=str(src), out=str(out), ratio=0.2, calib=str(calib),
                             nsamples=64, seqlen=256, batch_size=8)  # fmt: skip
        summary = compress(cfg)
        ids = torch.randint(2, 500, (2, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            view = load_model(src)(ids).logits
            original = _stock(src)(ids).logits
            low = load_compressed(out).float()(ids).logits
            remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                          dtype=torch.float32)  # fmt: skip
            remote = remote.eval()(ids).logits
            dense = _stock(export_dense(out, work / f"{family}-dense"))(ids).logits
        row.update(
            outcome="compressed",
            low_rank_share=summary["low_rank_share"],
            left_dense=summary["left_dense"],
            max_logit_diff_original_view=float((view - original).abs().max()),
            max_logit_diff_dense_export=float((low - dense).abs().max()),
            max_logit_diff_remote_code=float((low - remote).abs().max()),
            logit_scale=float(dense.abs().max()),
            seconds_compress=summary["seconds"],
        )
        if "expert_tokens" in summary:
            counts = list(summary["expert_tokens"].values())
            row["expert_tokens"] = {"experts": len(counts), "min": min(counts),
                                    "max": max(counts), "zero": counts.count(0),
                                    "mean": sum(counts) / len(counts)}  # fmt: skip
    except StreamSVDError as exc:
        row.update(outcome="refused", detail=_first_line(exc))
    except Exception as exc:
        row.update(outcome="error", detail=_first_line(exc), where=traceback.format_exc(-3))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _stock(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", default=str(RESULTS / "families"))
    parser.add_argument("--calib", default=None, help="calibration text file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = Path(args.calib) if args.calib else WIKITEXT_VALID
        if not calib.exists():
            calib = work / "calib.txt"
            calib.write_text(stdlib_docstrings(200_000))
        print(f"calibration: {calib}", flush=True)
        for family in args.families.split(","):
            row = try_family(family, work, calib)
            print(json.dumps({k: v for k, v in row.items() if k != "where"}), flush=True)
            rows.append(row)
            for leftover in work.glob(f"{family}*"):
                shutil.rmtree(leftover, ignore_errors=True)
    out, text = Path(args.out), markdown(rows)
    common.save(out.parent, out.stem, rows, text)  # <out>.json and <out>.md
    print(text)


def markdown(rows: list[dict]) -> str:
    lines = ["| family | outcome | low-rank share of block params | left dense (per block) | "
             "logits: streamsvd's reading vs stock, original | low-rank vs stock dense export "
             "| low-rank vs stock, trust_remote_code | tokens per expert: min / mean / max "
             "(zero) | detail |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        share = f"{r['low_rank_share']:.3f}" if "low_rank_share" in r else ""
        view = diff = remote = experts = ""
        if "max_logit_diff_dense_export" in r:
            view = f"{r['max_logit_diff_original_view']:.1e} (of {r['logit_scale']:.2g})"
            diff = f"{r['max_logit_diff_dense_export']:.1e}"
            remote = f"{r['max_logit_diff_remote_code']:.1e}"
        if "expert_tokens" in r:
            e = r["expert_tokens"]
            experts = f"{e['min']} / {e['mean']:.0f} / {e['max']} ({e['zero']} of {e['experts']})"
        dense = ", ".join(n.split(".*.", 1)[-1] for n in r.get("left_dense", []))
        lines.append(f"| {r['family']} | {r['outcome']} | {share} | {dense} | {view} | {diff} "
                     f"| {remote} | {experts} | {r.get('detail', '')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
