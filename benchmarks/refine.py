"""Block refinement (streamsvd/refine.py) on SmolLM2-135M: perplexity, compression time and
peak RSS of the default method with refinement off and at each setting asked for.

On the held-out protocol (the default, for choosing settings) or P1 (for reporting); see
benchmarks/common.py, which runs each cell (compress, then score, each in a process of its
own).

A cell is `ratio:epochs:lr[:λ][:bN][:hN][:norms][:heal][:bf16][:qB[:gN][:asym]]` (qB:
factors quantized to B bits, `compress --bits B`, as benchmarks/quantized.py's cells, with
their block bytes; hN: the last N calibration windows held out of refinement, the best epoch
on them kept, `compress --refine-holdout N`, with the blocks that declined; bf16:
`--refine-precision bfloat16`, its autocast emulated in float32 arithmetic
(benchmarks/bf16_emulation.py: torch's own is ~10× slower on CPUs without native bf16)):

    .venv/bin/python benchmarks/refine.py --cells 0.4:0:0 0.4:2:1e-4 0.4:2:1e-3 --jobs 2
    .venv/bin/python benchmarks/refine.py --protocol p1 --cells 0.4:2:1e-4
    .venv/bin/python benchmarks/refine.py --cells 0.4:16:3e-4:0.25:b2:h8 --no-original
    .venv/bin/python benchmarks/refine.py --cells 0.4:16:3e-4:0.25:b2:bf16 --no-original

Writes
benchmarks/results/<name>.{json,md} after every cell; with --jobs N, N cells run at once,
1 thread each. With --work DIR a killed cell resumes when the same command runs again
(streamsvd's own resume; the row then says `resumed`, and its times cover the last run only).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (benchmarks/common.py)
from quantized import block_bytes  # noqa: E402

from streamsvd.refine import DEFAULT_TARGET  # noqa: E402


def parse_cell(text: str) -> dict:
    """ratio:epochs:lr[:λ][:bN][:hN][:norms][:heal][:bf16][:qB[:gN][:asym]] (λ: --refine-target,
    default the library's; bN: --refine-batch N, default the calibration batch of 8; hN:
    --refine-holdout N; heal: also `streamsvd heal` the output on the calibration text, and
    score both; qB, gN, asym: --bits B, --group-size N (default compress's), --asymmetric)."""
    ratio, epochs, lr, *rest = text.split(":")
    flags = {x for x in rest if x in ("norms", "heal", "asym", "bf16") or x[0] in "bhqg"}
    target = next((float(x) for x in rest if x not in flags), DEFAULT_TARGET)

    def number(prefix: str) -> int | None:
        return next((int(x[1:]) for x in flags if x.startswith(prefix) and x[1:].isdigit()),
                    None)  # fmt: skip

    cell = {"ratio": float(ratio), "epochs": int(epochs), "lr": float(lr), "target": target,
            "batch": number("b"), "norms": "norms" in rest, "heal": "heal" in rest}  # fmt: skip
    if number("q"):  # only quantized cells carry these keys: older rows stay as they were
        cell.update(bits=number("q"), group_size=number("g"), symmetric="asym" not in rest)
    if number("h"):  # likewise only cells with a holdout
        cell.update(holdout=number("h"))
    if "bf16" in rest:  # and cells refined in bf16 autocast
        cell.update(precision="bfloat16")
    return cell


def cell_options(cell: dict, method: str) -> list[str]:
    """The compress options a cell stands for."""
    refined = ["--refine-lr", str(cell["lr"]), "--refine-target", str(cell["target"])]
    return [
        "--ratio", str(cell["ratio"]), "--method", method,
        "--refine-epochs", str(cell["epochs"]), *(refined if cell["epochs"] else []),
        *(["--refine-batch", str(cell["batch"])] if cell["batch"] else []),
        *(["--refine-holdout", str(cell["holdout"])] if "holdout" in cell else []),
        *(["--refine-precision", cell["precision"]] if "precision" in cell else []),
        *(["--refine-norms"] if cell["norms"] else []),
        *(["--bits", str(cell["bits"])] if "bits" in cell else []),
        *(["--group-size", str(cell["group_size"])] if cell.get("group_size") else []),
        *(["--asymmetric"] if not cell.get("symmetric", True) else []),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser, "refine_<protocol>")
    parser.add_argument("--protocol", choices=["heldout", "p1"], default="heldout")
    parser.add_argument(
        "--cells",
        nargs="+",
        type=parse_cell,
        required=True,
        help="ratio:epochs:lr[:λ][:bN][:hN][:norms][:heal][:bf16][:qB[:gN][:asym]], e.g. "
        "0.4:2:1e-4",
    )
    parser.add_argument("--method", default="svdllm-a")
    parser.add_argument("--no-original", action="store_true", help="skip scoring the original")
    parser.add_argument("--source-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the checkpoint compressed: SmolLM2 as converted (float32), or "
                             "saved in bfloat16 as a user's checkpoint would be")  # fmt: skip
    parser.add_argument("--work", type=Path,
                        help="keep each cell's run in DIR until the cell is scored, so that "
                             "the same command resumes a killed one (default: a temporary "
                             "folder, removed)")  # fmt: skip
    args = parser.parse_args()
    name = args.name.replace("<protocol>", args.protocol)
    model = args.model or common.smollm2(args.source_dtype)
    tmp = args.work or Path(tempfile.mkdtemp(prefix="streamsvd-refine-"))
    tmp.mkdir(parents=True, exist_ok=True)
    proto = common.protocol(args.protocol, args.data_dir, tmp)
    result = common.load(args.results, name)
    result.update(what=proto.what, model=f"{common.describe(model)}, CPU",
                  command=common.command_line("refine.py"))  # fmt: skip
    if not args.no_original and not any(r["method"] == "original" for r in result["rows"]):
        result["rows"].append({"method": "original", "perplexity": common.score(model, proto)})
        common.save(args.results, name, result, markdown(result))
    start = time.perf_counter()

    def on_row(row: dict) -> None:
        result["rows"].append(row)
        common.save(args.results, name, result, markdown(result), start)

    run = functools.partial(run_cell, args=args, model=model, proto=proto, tmp=tmp)
    try:
        common.run_cells(args.cells, run, args.jobs, on_row)
    finally:
        if not args.work:
            shutil.rmtree(tmp, ignore_errors=True)


def run_cell(cell: dict, args, model: Path, proto: common.Protocol, tmp: Path) -> dict:
    """Compress with the cell's settings, heal if asked, score; the cell's row."""
    if args.work:  # one folder per cell, named by its settings, kept until it is scored
        work = tmp / "-".join(str(v) for v in cell.values())
        work.mkdir(exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(dir=tmp))
    resumed = any(work.iterdir())  # a killed earlier run of this cell left its files
    env = common.one_thread_each(args.jobs)
    # bf16 on a CPU: torch's autocast, emulated in float32 arithmetic (~10× faster here)
    entry = [str(HERE / "bf16_emulation.py")] if "precision" in cell else None
    summary, command = common.compress(model, work, proto, cell_options(cell, args.method), env,
                                       entry)  # fmt: skip
    row = heal(work, proto, env) if cell["heal"] else {}
    ppl = common.score_in_process(work / "out", proto, env)
    if "holdout" in cell:  # blocks whose closed form scored best on the held-out windows
        row.update(refine_declined=summary["refine_declined"],
                   kept_epochs=[r["kept_epoch"] for r in summary["refine_losses"]])  # fmt: skip
    if "bits" in cell:  # the group size compress chose, and the bytes it wrote
        row.update(group_size=summary["quantization"]["group_size"],
                   block_bytes=block_bytes(work / "out"))  # fmt: skip
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
        "threads": common.threads_of(env),
        "cells_at_once": args.jobs,  # more than the cores share them: times are rough
        **({"resumed": True} if resumed else {}),  # times: the last run's only
        "command": command,
    }


def heal(work: Path, proto: common.Protocol, env: dict | None) -> dict:
    """`streamsvd heal` of work/out on the calibration text, scored: the row's heal cells."""
    healed, heal_json = work / "healed", work / "heal.json"
    shutil.rmtree(healed, ignore_errors=True)  # a killed heal starts again
    command = [sys.executable, "-m", "streamsvd.cli", "-q", "heal", "--model", str(work / "out"),
               "--out", str(healed), "--data", str(proto.calib), "--device", "cpu",
               "--summary-json", str(heal_json)]  # fmt: skip
    subprocess.run(command, check=True, cwd=common.ROOT, env=env)
    summary = json.loads(heal_json.read_text())
    return {
        "healed_perplexity": common.score_in_process(healed, proto, env),
        "heal_seconds": summary["seconds"],
        "heal_peak_rss_mb": summary["peak_rss_mb"],
        "heal_command": common.as_shown(command[4:], work),
    }


def markdown(result: dict) -> str:
    quantized = any("bits" in r for r in result["rows"])  # then two more columns
    held = any("holdout" in r for r in result["rows"])  # and two more
    bf16 = any("precision" in r for r in result["rows"])  # and one more
    extra = 2 * quantized + 2 * held + bf16
    lines = [
        f"# Block refinement{', quantized factors' if quantized else ''}, {result['what']}",
        "",
        f"{result['model']}. Command(s): `{result['command']}` (the last; rows accumulate "
        f"over runs; {os.cpu_count()} cores). Refinement: AdamW, 10% warm-up, cosine decay, "
        "clip 1.0, float32"
        + (" or bf16 autocast, emulated (benchmarks/bf16_emulation.py)." if bf16 else "."),
        "",
        "| method | ratio | refine epochs | peak lr | refine batch | target λ | norms too "
        + ("| held out | blocks declined " if held else "")
        + ("| precision " if bf16 else "")
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
            + (f"{r.get('precision', 'float32')} | " if bf16 else "")
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
    return "\n".join(lines) + "\n"


def factors(row: dict) -> str:
    """The factors' storage and the decoder blocks' bytes on disk, as table cells."""
    if "bits" not in row:
        return "unquantized | – | "
    kind = "symmetric" if row["symmetric"] else "asymmetric"
    return f"{row['bits']}-bit g{row['group_size']} {kind} | {row['block_bytes'] / 2**20:.2f} | "


if __name__ == "__main__":
    main()
