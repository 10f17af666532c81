"""Two pictures for the docs, drawn from results already in benchmarks/results/ (nothing is
run, no number is typed in here):

    .venv/bin/python benchmarks/plots.py

- `p1_ratio.png`: P1 perplexity against ratio, one line per method (left) and one per rank
  allocation of the default method (right). Only rows that follow protocol P1 are used: a
  file counts as P1 when its `protocol` is "P1" or its `what` starts with "P1". Every point
  is printed with the file it came from; where two files hold the same cell, the first file
  in `P1_FILES` wins.
- `scale_width.png`: the default method's peak memory per block against model width: the
  plan for a CPU run and for a 24 GiB GPU (64×512 calibration), and the measured peak RSS of
  each CPU run beside that run's own plan (8×256 calibration), from `scale.json`.
  `memory_width.png` (from benchmarks/memory.py) already shows plan and measured against
  width, but for `--method rsvd` at ratio 0.95; `scale.png` shows the default method's
  plans by width and its measured peaks by run and phase, not on one width axis. The runs
  in scale.json predate sequential statistics: they took every linear's statistics
  together, as `--no-sequential` does now.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

RESULTS = common.ROOT / "benchmarks" / "results"

GiB = 2**30

# Files with P1 rows, in the order they win a cell that two of them hold. The allocation
# files (allocation.py --protocol p1) come first: their rows name the allocation and whether
# statistics were sequential. quality_p1_default.json (after the memory diet) comes before
# quality_p1.json (before it); both give svdllm-a at 0.2 the same perplexity.
P1_FILES = [
    "allocation_p1_seq02.json",  # 0.2, sequential statistics, every allocation
    "allocation_p1_ratio02.json",  # 0.2, statistics together, grouped and residual
    "allocation_p1.json",  # 0.4, both ways, every allocation
    "allocation_p1_ratio06.json",  # 0.6, both ways, every allocation
    "allocation_p1_sequential.json",  # 0.4, uniform, sequential (a repeat of allocation_p1's)
    "quality_p1_default.json",  # svdllm-a at 0.2 and 0.4, statistics together
    "quality_p1.json",  # every method at 0.2 and 0.4, statistics together
    "refine_p1.json",  # svdllm-a with block refinement: 2, 4 and 16 (the default) epochs
]
# Rows whose command passes neither --sequential nor --no-sequential ran with the default of
# the day: quality_p1*.json before sequential statistics existed, refine_p1.json after they
# became the default.
SEQUENTIAL_WHEN_UNSAID = {"quality_p1.json": False, "quality_p1_default.json": False,
                          "refine_p1.json": True}  # fmt: skip

# (label, method, allocation, sequential, refinement: None or (epochs, windows a step),
# healed by `streamsvd heal` afterwards), drawn in this order
METHOD_LINES = [
    ("svdllm-w: SVD-LLM whitening", "svdllm-w", "uniform", False, None, False),
    ("svdllm-u: + its update", "svdllm-u", "uniform", False, None, False),
    ("svdllm-a, together", "svdllm-a", "uniform", False, None, False),
    ("svdllm-a, sequential: the closed form", "svdllm-a", "uniform", True, None, False),
    ("refined 2 epochs of 8-window steps", "svdllm-a", "uniform", True, (2, 8), False),
    ("refined 4 epochs of 2-window steps", "svdllm-a", "uniform", True, (4, 2), False),
    ("default: refined 16 epochs of 2-window steps", "svdllm-a", "uniform", True, (16, 2), False),
    ("the closed form, then healed", "svdllm-a", "uniform", True, None, True),
    ("refined 4 epochs, then healed", "svdllm-a", "uniform", True, (4, 2), True),
    ("the default, then healed", "svdllm-a", "uniform", True, (16, 2), True),
]
ALLOCATIONS = ["uniform", "grouped", "residual"]


def is_p1(data: dict) -> bool:
    return data.get("protocol") == "P1" or str(data.get("what", "")).startswith("P1")


def p1_points() -> tuple[dict, float, dict]:
    """{(method, allocation, sequential, refinement, healed): {ratio: (perplexity, file)}},
    the original's perplexity, and plain SVD's {ratio: perplexity}."""
    points: dict = {}
    original = None
    plain_svd: dict = {}
    for name in P1_FILES:
        data = json.loads((RESULTS / name).read_text())
        if not is_p1(data):
            raise SystemExit(f"{name} does not say it follows P1; leave it out of P1_FILES")
        for row in data["rows"]:
            if row.get("method", row.get("allocation")) == "original":
                original = original if original is not None else row["perplexity"]
                continue
            method = row.get("method", "svdllm-a")  # allocation.py runs svdllm-a
            if method == "svd":
                plain_svd.setdefault(row["ratio"], row["perplexity"])
                continue
            command = row.get("command", "")
            if "--no-sequential" in command:
                sequential = False
            elif "--sequential" in command:
                sequential = True
            else:
                sequential = SEQUENTIAL_WHEN_UNSAID[name]
            epochs = row.get("epochs", 0)
            refinement = (epochs, row.get("batch") or 8) if epochs else None
            key = (method, row.get("allocation", "uniform"), sequential, refinement)
            points.setdefault((*key, False), {}).setdefault(row["ratio"], (row["perplexity"], name))
            if "healed_perplexity" in row:
                points.setdefault((*key, True), {}).setdefault(
                    row["ratio"], (row["healed_perplexity"], name)
                )
    return points, original, plain_svd


def plot_p1() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, original, plain_svd = p1_points()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    ratios = sorted({r for cells in points.values() for r in cells})
    for label, *key in METHOD_LINES:
        cells = sorted(points.get(tuple(key), {}).items())
        for ratio, (ppl, name) in cells:
            print(f"{label:36s} ratio {ratio}: {ppl:8.2f}  from {name}")
        if cells:
            healed = key[-1]  # dashed: after `streamsvd heal`, a step of its own
            ppl_at = {r: p for r, (p, _) in cells}  # a line breaks (NaN) where unmeasured
            ax.plot(ratios, [ppl_at.get(r, math.nan) for r in ratios],
                    "--" if healed else "-", marker="o", label=label)  # fmt: skip
    svd_text = ", ".join(f"{p:.3g} at {r}" for r, p in sorted(plain_svd.items()))
    ax.set_title(f"P1, SmolLM2-135M: methods\n(plain svd, off the scale: {svd_text})",
                 fontsize=10)  # fmt: skip
    for allocation in ALLOCATIONS:
        for sequential, style in ((True, "-"), (False, "--")):
            key = ("svdllm-a", allocation, sequential, None, False)
            cells = sorted(points.get(key, {}).items())
            label = f"{allocation}, {'sequential' if sequential else 'together'}"
            for ratio, (ppl, name) in cells:
                print(f"svdllm-a {label:36s} ratio {ratio}: {ppl:8.2f}  from {name}")
            bx.plot([r for r, _ in cells], [p for _, (p, _) in cells], style, marker="o",
                    label=label)  # fmt: skip
    bx.set_title("P1, SmolLM2-135M: svdllm-a's rank allocations,\n"
                 "statistics sequential (solid) or together (dashed)", fontsize=10)  # fmt: skip
    for axis, corner in ((ax, "upper left"), (bx, "upper left")):
        axis.axhline(original, color="gray", ls=":", label=f"original ({original:.2f})")
        axis.set_xlabel("ratio (fraction of the blocks' linear parameters removed)")
        axis.legend(fontsize=8, loc=corner)
        axis.grid(alpha=0.3)
    ax.set_ylabel("perplexity, 128×512 tokens of WikiText-2 test")
    fig.tight_layout()
    fig.savefig(RESULTS / "p1_ratio.png", dpi=110)
    plt.close(fig)
    print(f"original: {original:.2f}; plain svd: {svd_text}; wrote {RESULTS / 'p1_ratio.png'}")


def plot_scale() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from streamsvd.synth import SHAPES  # the shapes scale.py synthesised

    data = json.loads((RESULTS / "scale.json").read_text())
    hidden = {p["width"]: SHAPES[p["width"]].hidden for p in data["plans"]}
    fig, ax = plt.subplots(figsize=(7, 4.8))
    plans = sorted(data["plans"], key=lambda p: hidden[p["width"]])
    xs = [hidden[p["width"]] for p in plans]
    ax.plot(xs, [p["after_host"] / GiB for p in plans], marker="o",
            label="plan: host, CPU run (64×512)")  # fmt: skip
    ax.plot(xs, [p["after_device"] / GiB for p in plans], marker="s",
            label="plan: device, 24 GiB GPU (64×512)")  # fmt: skip
    runs = sorted(data["runs"], key=lambda r: hidden[r["run"].split(":")[0]])
    rx = [hidden[r["run"].split(":")[0]] for r in runs]
    ax.scatter(rx, [r["planned_peak"] / GiB for r in runs], marker="_", s=400, color="k",
               zorder=3, label="plan of each measured run (8×256)")  # fmt: skip
    ax.scatter(rx, [r["peak_rss"] / GiB for r in runs], marker="x", s=60, color="C3",
               zorder=4, label="measured peak RSS, CPU (8×256)")  # fmt: skip
    for r in runs:
        print(f"{r['run']:6s} measured {r['peak_rss'] / GiB:6.2f} GiB, "
              f"plan {r['planned_peak'] / GiB:6.2f} GiB  from scale.json")  # fmt: skip
    ax.axhline(24, color="gray", ls="--", lw=1)
    ax.text(xs[-1], 25.5, "24 GiB GPU", fontsize=8, ha="right")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{p['width'].upper()}\n{hidden[p['width']]}" for p in plans])
    ax.set_yticks([2, 4, 8, 16, 24, 32, 64], ["2", "4", "8", "16", "24", "32", "64"])
    ax.minorticks_off()
    ax.set_xlabel("model width (hidden size)")
    ax.set_ylabel("peak memory per block (GiB)")
    ax.set_title("svdllm-a, ratio 0.2: planned and measured peak per block\n"
                 f"measured runs: {data['calibration']},\n"
                 "statistics taken together (before sequential statistics were the default)",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale_width.png", dpi=110)
    plt.close(fig)
    print(f"wrote {RESULTS / 'scale_width.png'}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help; no options
    plot_p1()
    plot_scale()
